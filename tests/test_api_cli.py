"""`vas-server serve` argument handling, without starting an engine (the server itself is
exercised end to end in test_api.py)."""

from __future__ import annotations

import json
import shlex

import pytest

from vas_server import cli
from vas_server.config import VASConfig
from vas_server.engine_args import PROCESSOR_FQCN, WORKER_EXTENSION


def _configure(*argv: str):
    """What `vas-server serve ARGV` does before vLLM starts (cli.main)."""
    parser, serve = cli.build_parser()
    args = parser.parse_args(["serve", *argv])
    vas = cli.configure(args, serve.parse_args([]), cli.explicit_args(argv))
    return args, vas


@pytest.mark.parametrize("bad", ["nameonly", "=path", "name="])
def test_value_model_needs_name_equals_path(bad, capsys):
    with pytest.raises(SystemExit):
        _configure("--value-model", bad)
    assert "NAME=PATH" in capsys.readouterr().err


def test_vas_is_wired_through_vllm_flags(value_models, tiny_base):
    args, vas = _configure(str(tiny_base), "--value-model", f"liker={value_models['liker']}",
                           "--value-model", f"prefix={value_models['prefix']}", "--default-top-k", "7",
                           "--max-sequences-per-request", "9", "--served-model-name", "tiny",
                           "--tensor-parallel-size", "1")
    assert args.model == str(tiny_base) and args.served_model_name == ["tiny"]
    assert args.logits_processors == [PROCESSOR_FQCN] and args.worker_extension_cls == WORKER_EXTENSION
    assert args.middleware == [cli.MIDDLEWARE]
    config = VASConfig.from_additional_config(args.additional_config)
    assert config.value_models == {"liker": value_models["liker"], "prefix": value_models["prefix"]}
    assert config.default_top_k == 7 == vas.default_top_k
    assert config.max_sequences_per_request == 9 == vas.max_sequences_per_request
    assert sorted(vas.read_heads()) == ["likes", "s1", "s2", "t1", "t2"]
    assert args.async_scheduling is None  # vLLM's default: on where the platform supports it


@pytest.mark.parametrize("flag, eager", [((), True), (("--no-enforce-eager",), False), (("--enforce-eager",), True)])
def test_enforce_eager_is_only_a_default(value_models, tiny_base, flag, eager):
    """On CPU vas-server defaults to eager mode (seconds to start instead of minutes of inductor
    compilation); `--no-enforce-eager` equals vLLM's own default value and must still win."""
    args, _ = _configure(str(tiny_base), "--value-model", f"liker={value_models['liker']}", *flag)
    assert args.enforce_eager is eager


def test_flags_the_user_gives_win_over_our_defaults(value_models, tiny_base):
    args, _ = _configure(str(tiny_base), "--value-model", f"liker={value_models['liker']}",
                         "--enable-chunked-prefill", "--additional-config", '{"mine": 1}',
                         "--middleware", "my.Middleware")
    assert args.enable_chunked_prefill is True
    assert args.additional_config["mine"] == 1 and "vas" in args.additional_config
    assert args.middleware == ["my.Middleware", cli.MIDDLEWARE]


def test_no_value_models_is_plain_vllm_with_the_middleware(value_models, tiny_base):
    args, vas = _configure(str(tiny_base), "--value-model", f"liker={value_models['liker']}", "--no-value-models")
    assert vas.read_heads() == {} and not args.logits_processors
    assert args.middleware == [cli.MIDDLEWARE] and args.additional_config["vas"]["value_models"] == {}


def test_a_bad_value_model_fails_before_anything_starts(tmp_path, tiny_base):
    with pytest.raises(SystemExit, match="vas.json"):
        _configure(str(tiny_base), "--value-model", f"x={tmp_path}")


def test_other_models_get_no_demo_value_models(tiny_base, monkeypatch):
    monkeypatch.setattr(cli, "demo_value_models", lambda: pytest.fail("demo models are for the embedded base"))
    assert _configure("--model", str(tiny_base))[1].value_models == {}


def test_demo_value_models_ship_as_package_data():
    demo = cli.demo_value_models()
    assert list(demo) == ["smollm2"]
    assert VASConfig(value_models=demo).read_heads().keys() == {"positive", "concise", "simple"}


def test_api_key_defaults_to_the_environment(monkeypatch, tiny_base):
    monkeypatch.setenv(cli.API_KEY_ENV, "from-env")
    assert _configure(str(tiny_base))[0].api_key == ["from-env"]
    assert _configure(str(tiny_base), "--api-key", "flag")[0].api_key == ["flag"]


def test_ready_message_is_a_working_curl_line(value_models, tiny_base):
    args, vas = _configure(str(tiny_base), "--value-model", f"liker={value_models['liker']}", "--api-key", "secret",
                           "--preset", "happy=likes:3")
    first, curl, page = cli.ready_message(args, list(vas.read_heads()), "http://localhost:8000",
                                          list(vas.presets)).splitlines()
    assert page.strip() == "playground: http://localhost:8000/playground"
    assert first.startswith("vas-server ready at http://localhost:8000/v1") and first.endswith("presets: happy)")
    words = shlex.split(curl)
    assert words[:2] == ["curl", "http://localhost:8000/v1/completions"]
    assert "secret" not in curl and "Authorization: Bearer $VAS_SERVER_API_KEY" in words
    body = json.loads(words[words.index("-d") + 1])
    assert body["model"] == str(tiny_base) and body["vas_weights"] == {"likes": 2.0}


@pytest.mark.parametrize("slow_bf16, argv, dtype", [
    (True, [], "float32"),            # emulated bfloat16: float32 is several times faster
    (True, ["--dtype", "bfloat16"], "bfloat16"),  # the user's flag wins
    (False, [], "auto"),              # native bfloat16 (AVX512-BF16, AMX, ARM): the checkpoint's dtype
])
def test_dtype_default_follows_the_cpu(slow_bf16, argv, dtype, tiny_base, monkeypatch):
    from vas_server import engine_args

    monkeypatch.setattr(engine_args, "on_gpu", lambda: False)
    monkeypatch.setattr(engine_args, "cpu_lacks_fast_bfloat16", lambda: slow_bf16)
    args, _ = _configure(str(tiny_base), "--no-value-models", *argv)
    assert args.dtype == dtype
