"""`vas-server serve` argument handling, without starting an engine (the server itself is
exercised end to end in test_api.py)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from vas_server import cli


def _args(*argv: str):
    return cli.build_parser().parse_args(["serve", *argv])


def test_engine_args_are_read_as_json_else_strings():
    args = _args("--engine-arg", "max_num_seqs=64", "--engine-arg", "enforce-eager=true",
                 "--engine-arg", "dtype=float32", "--engine-arg", "gpu_memory_utilization=0.8",
                 "--max-model-len", "256")
    assert cli.engine_overrides(args) == {"max_num_seqs": 64, "enforce_eager": True, "dtype": "float32",
                                          "gpu_memory_utilization": 0.8, "max_model_len": 256}


def test_unknown_engine_arg_is_refused():
    with pytest.raises(SystemExit, match="no_such_option"):
        cli.engine_overrides(_args("--engine-arg", "no_such_option=1"))


@pytest.mark.parametrize("bad", ["nameonly", "=path"])
def test_value_model_needs_name_equals_path(bad, capsys):
    with pytest.raises(SystemExit):
        _args("--value-model", bad)
    assert "NAME=VALUE" in capsys.readouterr().err


def test_value_models_and_names(value_models, tiny_base):
    args = _args("--model", str(tiny_base), "--value-model", f"liker={value_models['liker']}",
                 "--value-model", f"prefix={value_models['prefix']}", "--default-top-k", "7", "--api-key", "k")
    config = cli.server_config(args)
    assert config.vas.value_models == {"liker": value_models["liker"], "prefix": value_models["prefix"]}
    assert config.vas.default_top_k == 7 and config.default_top_k == 7
    assert sorted(config.heads()) == ["likes", "s1", "s2", "t1", "t2"]
    assert config.served_model_name == str(tiny_base) and config.api_key == "k"
    without = cli.server_config(_args("--model", str(tiny_base), "--value-model", f"liker={value_models['liker']}",
                                      "--no-value-models"))
    assert without.vas is None and without.heads() == {}


def test_a_bad_value_model_fails_before_anything_starts(tmp_path, tiny_base):
    with pytest.raises(SystemExit, match="vas.json"):
        cli.server_config(_args("--model", str(tiny_base), "--value-model", f"x={tmp_path}"))


def test_other_models_get_no_demo_value_models(tiny_base, monkeypatch):
    monkeypatch.setattr(cli, "demo_value_models", lambda: pytest.fail("demo models are for the embedded base"))
    assert cli.server_config(_args("--model", str(tiny_base))).vas is None


def test_demo_value_models_are_the_demo_directories_with_a_spec(tmp_path, monkeypatch):
    import value_models

    package = tmp_path / "value_models"
    (package / "demo" / "b").mkdir(parents=True)
    (package / "demo" / "b" / "vas.json").write_text("{}")
    (package / "demo" / "a").mkdir()
    (package / "demo" / "a" / "vas.json").write_text("{}")
    (package / "demo" / "notes").mkdir()  # no vas.json: not a value model
    monkeypatch.setattr(value_models, "__file__", str(package / "__init__.py"))
    assert cli.demo_value_models() == {"a": str(package / "demo" / "a"), "b": str(package / "demo" / "b")}
    monkeypatch.setattr(value_models, "__file__", str(tmp_path / "elsewhere" / "__init__.py"))
    assert cli.demo_value_models() == {}


def test_api_key_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv(cli.API_KEY_ENV, "from-env")
    assert _args().api_key == "from-env"
    assert _args("--api-key", "flag").api_key == "flag"


def test_ready_message_is_a_working_curl_line(value_models, tiny_base):
    config = cli.server_config(_args("--model", str(tiny_base), "--value-model", f"liker={value_models['liker']}",
                                     "--api-key", "secret"))
    first, curl = cli.ready_message(config, "http://localhost:8000").splitlines()
    assert first.startswith("vas-server ready at http://localhost:8000/v1")
    words = shlex.split(curl)
    assert words[:2] == ["curl", "http://localhost:8000/v1/completions"]
    assert "secret" not in curl and "Authorization: Bearer $VAS_SERVER_API_KEY" in words
    body = json.loads(words[words.index("-d") + 1])
    assert body["model"] == str(tiny_base) and body["vas_weights"] == {"likes": 2.0}
