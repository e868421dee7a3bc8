"""Unit tests: request-parameter validation, plugin configuration and engine arguments."""

from __future__ import annotations

import json
import math
import os

import pytest

from vas_server.config import VASConfig
from vas_server.engine_args import DEFAULT_VAS_REQUESTS, PROCESSOR_FQCN, engine_kwargs
from vas_server.params import (VASParamError, VASRequest, admitted, is_admitted, make_extra_args)
from vas_server.processor import VASLogitsProcessor

KNOWN = ["positive", "concise"]


def parse(extra_args):
    """The engine path's validation (vLLM's validate_params): no head names to check against."""
    return VASRequest.from_extra_args(extra_args)


def from_api(body):
    """The HTTP path's validation (the middleware), with this server's heads."""
    return VASRequest.from_api(body, KNOWN)


def test_parse_accepts_and_normalises():
    req = parse(make_extra_args({"positive": 2, "concise": 0.0}, top_k=5))
    assert req.weights == {"positive": 2.0} and req.top_k == 5 and req.active and not req.restrict_to_top_k
    assert parse(None) is None and parse({}) is None
    assert not parse(make_extra_args({"positive": 0})).active  # all-zero: plain vLLM
    # A direct engine user may give the settings as a dict instead of a JSON string.
    assert parse({"vas": {"weights": {"concise": -1}, "restrict_to_top_k": True}}) == VASRequest(
        {"concise": -1.0}, None, True)


def test_api_fields_become_one_request():
    assert from_api({"prompt": "x"}) is None
    assert from_api({"prompt": "x", "vas_weights": {"positive": 1}}) == VASRequest({"positive": 1.0}, None, False)
    assert from_api({"vas_weights": {"positive": 1}, "vas_top_k": 3, "vas_restrict_to_top_k": True}) == VASRequest(
        {"positive": 1.0}, 3, True)
    # settings a client put in vllm_xargs itself count too, the top-level fields over them
    body = {"vllm_xargs": make_extra_args({"positive": 1}, top_k=9), "vas_weights": {"concise": 2}}
    assert from_api(body) == VASRequest({"concise": 2.0}, 9, False)
    with pytest.raises(VASParamError, match="unknown field 'vas_weight'") as e:
        from_api({"vas_weight": {"positive": 1}})
    assert e.value.parameter == "vas_weight"


def test_admitted_settings_are_stamped_and_decoded_as_they_were_validated():
    request = VASRequest({"positive": 2.5}, 40, True)
    extra_args = admitted(request)
    assert is_admitted(extra_args) and VASRequest.decode(extra_args) == request
    assert not is_admitted(request.to_extra_args())  # a client's own vllm_xargs carry no stamp
    forged = dict(extra_args, vas=make_extra_args({"positive": 1e9})["vas"])  # unvalidated, as a client may
    assert not is_admitted(forged)  # the stamp is of the settings it came with


def test_validate_params_checks_only_what_the_middleware_did_not():
    from types import SimpleNamespace

    bad = make_extra_args({"positive": 1e9})  # past MAX_ABS_WEIGHT (not validated): a forged request
    with pytest.raises(VASParamError, match="must be a number in"):
        VASLogitsProcessor.validate_params(SimpleNamespace(extra_args=bad))
    with pytest.raises(VASParamError, match="must be a number in"):
        VASLogitsProcessor.validate_params(SimpleNamespace(extra_args=dict(admitted(VASRequest({"positive": 1})),
                                                                           vas=bad["vas"])))
    VASLogitsProcessor.validate_params(SimpleNamespace(extra_args=admitted(VASRequest({"positive": 1}))))
    VASLogitsProcessor.validate_params(SimpleNamespace(extra_args=None))


def _heads_with_default_top_k(**declared):
    from types import SimpleNamespace

    return {name: SimpleNamespace(default_top_k=k) for name, k in declared.items()}


def test_top_k_request_then_server_then_value_model_then_spec():
    heads = _heads_with_default_top_k(positive=256, concise=None, simple=40)
    unset = VASConfig()
    assert unset.top_k_for(VASRequest({"positive": 1.0}, 7), heads) == 7  # the request's vas_top_k
    assert VASConfig(default_top_k=5).top_k_for(VASRequest({"positive": 1.0}), heads) == 5  # --default-top-k
    assert unset.top_k_for(VASRequest({"positive": 1.0}), heads) == 256  # the value model's vas.json
    assert unset.top_k_for(VASRequest({"simple": 1.0, "positive": -1.0}), heads) == 256  # the largest declared
    assert unset.top_k_for(VASRequest({"simple": 1.0, "concise": 1.0}), heads) == 40
    assert unset.top_k_for(VASRequest({"concise": 1.0}), heads) == 20  # none declared: the spec's 20


def test_value_model_declares_its_default_top_k(tmp_path, value_models):
    from vas_server.core.format import ValueModelFormatError, load_spec, save_spec

    spec = load_spec(value_models["prefix"])
    assert spec.default_top_k is None  # optional: older checkpoints have none
    spec.default_top_k = 64
    save_spec(tmp_path / "k64", spec)
    assert load_spec(tmp_path / "k64").default_top_k == 64
    assert {h.default_top_k for h in VASConfig(value_models={"m": str(tmp_path / "k64")}).read_heads().values()} == {64}
    for bad in (0, 257, 2.5, True):
        raw = json.loads((tmp_path / "k64" / "vas.json").read_text())
        raw["default_top_k"] = bad
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "vas.json").write_text(json.dumps(raw))
        with pytest.raises(ValueModelFormatError, match="default_top_k must be an integer in 1..256"):
            load_spec(tmp_path / "bad")


def test_the_demo_model_steers_with_top_k_256_by_default():
    from vas_server.cli import demo_value_models

    heads = VASConfig(value_models=demo_value_models()).read_heads()
    assert VASConfig().top_k_for(VASRequest({"positive": 2.0}), heads) == 256


@pytest.mark.parametrize("extra, param, message", [
    ({"weights": {"positive": math.nan}}, "vas_weights.positive", "must be a number in -100..100"),
    ({"weights": {"positive": math.inf}}, "vas_weights.positive", "must be a number in -100..100"),
    ({"weights": {"positive": 1e39}}, "vas_weights.positive", "must be a number in -100..100"),
    ({"weights": {"positive": -100.5}}, "vas_weights.positive", "must be a number in -100..100"),
    ({"weights": {"positive": 10**400}}, "vas_weights.positive", "must be a number in -100..100"),
    ({"weights": {"positive": "2"}}, "vas_weights.positive", "must be a number"),
    ({"weights": {"positive": True}}, "vas_weights.positive", "must be a number"),
    ({"weights": [1, 2]}, "vas_weights", "must be an object"),
    ({"weights": {"positive": 1}, "top_k": 0}, "vas_top_k", "1..256"),
    ({"weights": {"positive": 1}, "top_k": 257}, "vas_top_k", "1..256"),
    ({"weights": {"positive": 1}, "top_k": 2.5}, "vas_top_k", "1..256"),
    ({"weights": {"positive": 1}, "restrict_to_top_k": "yes"}, "vas_restrict_to_top_k", "boolean"),
    ({"weights": {"positive": 1}, "topk": 5}, "vllm_xargs", "unknown VAS setting"),
    ("{not json", "vllm_xargs", "JSON object"),
    ([1, 2], "vllm_xargs", "JSON object"),
])
@pytest.mark.parametrize("path", ["api", "engine"])
def test_parse_rejects_with_the_field_named(extra, param, message, path):
    with pytest.raises(VASParamError, match=message) as e:
        from_api({"vllm_xargs": {"vas": extra}}) if path == "api" else parse({"vas": extra})
    assert e.value.parameter == param


def test_an_unknown_head_is_refused_on_the_http_path():
    with pytest.raises(VASParamError, match="unknown head 'nope'; known heads: concise, positive") as e:
        from_api({"vas_weights": {"nope": 1}})
    assert e.value.parameter == "vas_weights.nope"
    assert parse(make_extra_args({"nope": 1})).weights == {"nope": 1.0}  # the worker runs it unsteered (logged)


def test_param_error_is_answered_by_vllm_as_a_400_naming_its_field():
    """vLLM's own error builder (what its routes answer a raised exception with) turns a
    VASParamError into OpenAI's 400 with `param` naming the field. The same check on an error
    that is only a ValueError (what VASParamError would be without vLLM's base class) fails:
    vLLM answers that 400 without the field."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    def answered(error: Exception) -> tuple:
        info = create_error_response(error).error
        return info.code, info.type, info.param

    assert answered(VASParamError("vas_top_k", "bad top-K")) == (400, "BadRequestError", "vas_top_k")

    class OnlyAValueError(ValueError):  # the planted change: VASParamError without VLLMValidationError
        pass

    assert answered(OnlyAValueError("bad top-K")) != (400, "BadRequestError", "vas_top_k")


def test_engine_kwargs_plain_and_with_vas(value_models):
    plain = engine_kwargs("/m", None)
    assert "logits_processors" not in plain
    # vLLM's default execution path: no model-runner switch, async scheduling left to vLLM.
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ and "async_scheduling" not in plain
    assert engine_kwargs("/m", None, enforce_eager=False)["enforce_eager"] is False  # a user's choice wins

    vas = engine_kwargs("/m", VASConfig(value_models=value_models))
    assert vas["logits_processors"] == [PROCESSOR_FQCN]
    cfg = VASConfig.from_additional_config(vas["additional_config"])
    assert cfg.value_models == value_models
    # Capacity: the default bounds both the value cache and the engine's concurrency ...
    assert cfg.max_requests == DEFAULT_VAS_REQUESTS and vas["max_num_seqs"] == DEFAULT_VAS_REQUESTS
    # ... follows an explicit max_num_seqs ...
    kw = engine_kwargs("/m", VASConfig(value_models=value_models), max_num_seqs=8)
    assert kw["max_num_seqs"] == 8 and kw["additional_config"]["vas"]["max_requests"] == 8
    # ... and a smaller explicit capacity makes extra requests queue in vLLM.
    kw = engine_kwargs("/m", VASConfig(value_models=value_models, max_requests=4), max_num_seqs=64)
    assert kw["max_num_seqs"] == 4 and kw["additional_config"]["vas"]["max_requests"] == 4


def test_duplicate_head_names_are_refused(value_models):
    with pytest.raises(ValueError, match="head 's1' is defined by both value models"):
        VASConfig(value_models={"a": value_models["prefix"], "b": value_models["prefix"]}).read_heads()


def test_config_rejects_bad_top_k():
    with pytest.raises(ValueError, match="default_top_k"):
        VASConfig(default_top_k=0)


# -- request_guard: the admission checks before vLLM (the HTTP side: tests/test_fuzz.py) ------------


@pytest.mark.parametrize("path, body, param, status", [
    ("/v1/completions", {"max_tokens": "5"}, "max_tokens", 400),
    ("/v1/completions", {"max_tokens": 1.0}, "max_tokens", 400),
    ("/v1/chat/completions", {"n": True}, "n", 400),
    ("/v1/chat/completions", {"temperature": "1"}, "temperature", 400),
    ("/v1/chat/completions", {"stream": "yes"}, "stream", 400),
    ("/v1/completions", {"logprobs": True}, "logprobs", 400),  # an integer for completions
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs", 400),  # a boolean for chat
    ("/v1/completions", {"stop": ["a", 5]}, "stop", 400),
    ("/v1/completions", {"stop": "\ud800"}, "stop", 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]}, "messages[0].content", 400),
    ("/v1/completions", {"top_k": 2**64}, "top_k", 400),
    ("/v1/completions", {"vas_weights": {"likes": 10**400}}, "vas_weights.likes", 400),
    ("/v1/completions", {"vas_weights": {"likes": float("inf")}}, "vas_weights.likes", 400),
    ("/v1/completions", {"logit_bias": {"5": float("nan")}}, "logit_bias.5", 400),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias", 400),
    ("/v1/completions", {"stop_token_ids": ["1"]}, "stop_token_ids", 400),
    ("/v1/completions", {"prompt": json.loads("[" * 80 + "]" * 80)}, "prompt", 400),
    ("/v1/completions", None, "body", 400),
    ("/v1/completions", {"prompt": ["a"] * 64, "n": 3}, "n", 422),
    ("/v1/completions", {"prompt": [[1]] * 200}, "n", 422),
    ("/v1/chat/completions", {"n": 129}, "n", 422),
])
def test_request_guard_refuses(path, body, param, status):
    from vas_server.http.request_guard import RequestRejected, check_request

    with pytest.raises(RequestRejected) as info:
        check_request(path, body, 128)
    assert info.value.parameter == param and info.value.status_code == status


def test_request_guard_passes_well_formed_requests():
    from vas_server.http.request_guard import check_request

    check_request("/v1/completions", {"model": "m", "prompt": ["a", "b"], "n": 64, "max_tokens": 5, "temperature": 1,
                                      "top_p": 0.5, "stop": ["x"], "logprobs": 2, "logit_bias": {"5": -100},
                                      "stop_token_ids": [1, 2], "seed": -1, "vas_weights": {"likes": 2.5},
                                      "stream": False, "user": None}, 128)
    check_request("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "é"}]}],
                                           "logprobs": True, "top_logprobs": 2, "stop": "x", "n": 128}, 128)


def _demo_app_state():
    """A stand-in for vLLM's app.state serving `base` with the demo heads (each also a preset)."""
    from types import SimpleNamespace

    from vas_server.cli import demo_value_models

    config = VASConfig(value_models=demo_value_models())
    return SimpleNamespace(vllm_config=SimpleNamespace(additional_config=config.to_additional_config()),
                           args=SimpleNamespace(api_key=None), engine_client=None,
                           openai_serving_models=SimpleNamespace(base_model_paths=[SimpleNamespace(name="base")],
                                                                 lora_requests={}))


def _through_middleware(body: dict, path: str = "/v1/completions") -> tuple[int, dict, list[dict]]:
    """POST `body` through VASMiddleware (the demo heads) to a stand-in for vLLM that answers `{}`:
    (status, JSON answer, the bodies vLLM got). No engine."""
    import asyncio
    from types import SimpleNamespace

    from vas_server.middleware import VASMiddleware

    state = _demo_app_state()
    seen, sent = [], []

    async def vllm_stand_in(scope, receive, send):
        seen.append(json.loads((await receive())["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    scope = {"type": "http", "method": "POST", "path": path, "root_path": "",
             "headers": [(b"content-type", b"application/json")], "app": SimpleNamespace(state=state)}

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(VASMiddleware(vllm_stand_in)(scope, receive, send))
    answer = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(answer), seen


def test_the_http_path_validates_once(monkeypatch):
    """The middleware validates a request's steering and stamps it; vLLM carries the stamp from
    `vllm_xargs` into `SamplingParams.extra_args`, and validate_params then checks nothing again."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    status, _, seen = _through_middleware({"model": "base", "prompt": "hi", "vas_weights": {"positive": 2}})
    assert status == 200
    params = CompletionRequest(**seen[0]).to_sampling_params(16)
    assert is_admitted(params.extra_args)
    assert VASRequest.decode(params.extra_args) == VASRequest({"positive": 2.0}, 256)  # top-K resolved: vas.json's

    def second_validation(*args):
        raise AssertionError("validated twice")

    monkeypatch.setattr(VASRequest, "from_extra_args", second_validation)
    VASLogitsProcessor.validate_params(params)


def test_a_preset_chosen_alone_is_admitted_once(monkeypatch):
    """A preset chosen with no steering of its own: vLLM gets what the preset's settings written
    out in the request's own fields give, and they are validated at the preset's first request
    only (the preset path's share of the middleware's cost)."""
    from vas_server.http.server_view import ServerView
    from vas_server.http.steering_fields import rewrite_request

    server = ServerView.of(_demo_app_state())
    validations = []
    from_api = VASRequest.from_api
    monkeypatch.setattr(VASRequest, "from_api", lambda body, heads: validations.append(body) or from_api(body, heads))
    written_out = rewrite_request(server, {"model": "base", "prompt": "hi", "vas_weights": {"positive": 2.0}}, b"")
    first, second = (rewrite_request(server, {"model": "positive", "prompt": "hi"}, b"") for _ in range(2))
    assert first.body == second.body == written_out.body and first.report == second.report == written_out.report
    assert first.preset == "positive" and len(validations) == 2  # the written-out request's and the first preset's
    with pytest.raises(VASParamError, match="unknown field 'vas_topk'"):  # the request's own fields: validated
        rewrite_request(server, {"model": "positive", "prompt": "hi", "vas_topk": 5}, b"")


# -- the request contract (VASRequest, a strict pydantic model), as an HTTP client meets it ---------


@pytest.mark.parametrize("steering, param, message", [
    # no field beyond the model's: a misspelt top-level field, or an unknown key inside vllm_xargs
    ({"vas_topk": 5}, "vas_topk", "unknown field 'vas_topk'"),
    ({"vllm_xargs": {"vas": {"weights": {"positive": 1}, "head": True}}}, "vllm_xargs",
     r"unknown VAS setting\(s\) \['head'\]"),
    # strict: no coercion, and the field the client wrote is named
    ({"vas_weights": {"positive": "2"}}, "vas_weights.positive",
     r"vas_weights\.positive must be a number in -100..100, got '2'"),
    ({"vas_weights": {"positive": 1, "nope": 1}}, "vas_weights.nope", "vas_weights: unknown head 'nope'"),
    ({"vas_weights": {"positive": 1}, "vas_top_k": "5"}, "vas_top_k", "vas_top_k must be an integer in 1..256, got '5'"),
    ({"vas_weights": {"positive": 1}, "vas_top_k": 5.0}, "vas_top_k", "vas_top_k must be an integer in 1..256, got 5.0"),
    ({"vas_weights": {"positive": 1}, "vas_restrict_to_top_k": 1}, "vas_restrict_to_top_k",
     "vas_restrict_to_top_k must be a boolean, got 1"),
    ({"vas_weights": "positive"}, "vas_weights", "vas_weights must be an object mapping head names to numbers"),
])
def test_the_contract_refuses_with_the_field_named(steering, param, message):
    import re

    status, answer, seen = _through_middleware({"model": "base", "prompt": "hi", **steering})
    assert status == 400 and not seen, answer
    assert answer["error"]["param"] == param and re.search(message, answer["error"]["message"]), answer


def test_the_contract_takes_null_as_the_default():
    status, _, seen = _through_middleware({"model": "base", "prompt": "hi", "vas_weights": {"positive": 1},
                                           "vas_top_k": None, "vas_restrict_to_top_k": None})
    assert status == 200
    assert VASRequest.decode(seen[0]["vllm_xargs"]) == VASRequest({"positive": 1.0}, 256, False)


def test_the_guard_names_a_standard_field_of_the_wrong_type():
    status, answer, seen = _through_middleware({"model": "base", "prompt": "hi", "max_tokens": "5"})
    assert status == 400 and not seen
    assert answer["error"]["param"] == "max_tokens"
    assert answer["error"]["message"] == "max_tokens must be an integer, got a string '5'"


@pytest.mark.parametrize("value, ok", [(1, True), (10, True), (None, True), (0, False), (11, False), (True, False),
                                       ("5", False), (5.0, False), ([5], False)])
def test_vas_explain_is_validated(value, ok):
    from vas_server.params import Explain

    body = {"vas_explain": value}
    if ok:
        explain = Explain.from_api(body)
        assert (explain is None) == (value is None) and (explain is None or explain.top == value)
    else:
        with pytest.raises(VASParamError) as e:
            Explain.from_api(body)
        assert e.value.parameter == "vas_explain"


def test_vas_explain_needs_one_choice_and_is_a_known_field():
    from vas_server.params import Explain

    with pytest.raises(VASParamError, match="n = 1"):
        Explain.from_api({"vas_explain": 3, "n": 2})
    assert VASRequest.from_api({"vas_explain": 3, "vas_weights": {"a": 1}}, ["a"]).weights == {"a": 1}
    with pytest.raises(VASParamError, match="vas_explain"):  # the list of fields names it
        VASRequest.from_api({"vas_explainn": 3}, ["a"])


def test_explanations_record_the_rule_and_stay_bounded():
    import torch

    from vas_server.core import rule
    from vas_server.engine import explain as ex
    from vas_server.params import Explain

    torch.manual_seed(0)
    logits, values = torch.randn(2, 50), torch.randn(2, 2, 4)
    weights, valid = torch.tensor([[2.0, 0.0], [0.0, -1.0]]), torch.ones(2, 4, dtype=torch.bool)
    candidates = logits.topk(4, dim=1).indices
    steered = logits.clone()
    rule.add_bonus_(steered, candidates, rule.bonus(values, weights, valid), valid, None)
    book = ex.Explanations(["a", "b"])
    outputs = [int(candidates[1, 2])]
    record = book.start(Explain(top=2, id="k"), weights[1], 4, outputs)
    book.record([record], torch.tensor([1]), logits[1:], steered[1:], candidates, values, weights, valid)
    got = book.take("k")
    assert book.take("k") is None  # read once
    assert got["heads"] == ["b"] and len(got["tokens"]) == 1 and len(got["tokens"][0]["candidates"]) == 2
    token = got["tokens"][0]
    assert token["token_id"] == outputs[0]
    j = 2  # the sampled candidate: its numbers by hand
    centred = values[1, 1] - values[1, 1].mean()
    assert token["contributions"]["b"] == pytest.approx(float(-centred[j]), abs=1e-6)
    assert token["base_p"] == pytest.approx(float(torch.softmax(logits[1], -1)[candidates[1, j]]), rel=1e-5)
    assert token["steered_p"] == pytest.approx(float(torch.softmax(steered[1], -1)[candidates[1, j]]), rel=1e-5)
    best = token["candidates"]
    assert best[0]["steered_p"] >= best[1]["steered_p"] >= max(
        float(p) for p in torch.softmax(steered[1], -1)[candidates[1]].sort(descending=True).values[2:])
    for i in range(ex.MAX_PENDING + 5):  # unread records: the oldest go first
        book.start(Explain(top=1, id=str(i)), weights[0], 4, None)
    assert len(book.records) == ex.MAX_PENDING and "0" not in book.records and str(ex.MAX_PENDING + 4) in book.records


def test_each_vas_json_is_read_once_per_process_until_it_changes(value_models, tmp_path, monkeypatch):
    """Every VASConfig in a process (the plugin's, the processor's, the runtime factory's, the
    HTTP side's) shares one read of each value model's vas.json; a rewritten file is read again."""
    import shutil

    import vas_server.config as config_module

    name, source = next(iter(value_models.items()))
    copy = tmp_path / name
    shutil.copytree(source, copy)
    reads = []
    real = config_module.load_spec
    monkeypatch.setattr(config_module, "load_spec", lambda path: reads.append(str(path)) or real(path))
    for _ in range(3):
        config = VASConfig(value_models={name: str(copy)})
        assert list(config.read_heads()) and config.specs()[name] is config.specs()[name]
    assert reads == [str(copy)]
    spec_file = copy / "vas.json"
    spec_file.write_text(spec_file.read_text().replace("\n", "\n ", 1))  # the same spec, another size
    VASConfig(value_models={name: str(copy)}).read_heads()
    assert reads == [str(copy)] * 2
