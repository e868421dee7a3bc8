"""Unit tests: request-parameter validation, plugin configuration and engine arguments."""

from __future__ import annotations

import math
import os

import pytest

from vas_server.config import VASConfig
from vas_server.engine import DEFAULT_VAS_REQUESTS, PROCESSOR_FQCN, engine_kwargs
from vas_server.params import VASParamError, make_extra_args, parse_request

KNOWN = ["positive", "concise"]


def test_parse_accepts_and_normalises():
    req = parse_request(make_extra_args({"positive": 2, "concise": 0.0}, top_k=5, key="abc"), KNOWN)
    assert req.key == "abc" and req.weights == {"positive": 2.0} and req.top_k == 5 and req.active
    assert parse_request(None, KNOWN) is None and parse_request({}, KNOWN) is None
    assert not parse_request(make_extra_args({"positive": 0}), KNOWN).active  # all-zero: plain vLLM


@pytest.mark.parametrize("extra, param, message", [
    ({"weights": {"nope": 1}}, "vas_weights", "unknown head 'nope'; known heads: concise, positive"),
    ({"weights": {"positive": math.nan}}, "vas_weights", "must be a finite number"),
    ({"weights": {"positive": math.inf}}, "vas_weights", "must be a finite number"),
    ({"weights": {"positive": "2"}}, "vas_weights", "must be a finite number"),
    ({"weights": {"positive": True}}, "vas_weights", "must be a finite number"),
    ({"weights": [1, 2]}, "vas_weights", "must be an object"),
    ({"weights": {"positive": 1}, "top_k": 0}, "vas_top_k", "1..256"),
    ({"weights": {"positive": 1}, "top_k": 257}, "vas_top_k", "1..256"),
    ({"weights": {"positive": 1}, "top_k": 2.5}, "vas_top_k", "1..256"),
    ({"weights": {"positive": 1}, "restrict_to_top_k": "yes"}, "vas_restrict_to_top_k", "boolean"),
])
def test_parse_rejects_with_the_field_named(extra, param, message):
    with pytest.raises(VASParamError, match=message) as e:
        parse_request({"vas": extra}, KNOWN)
    assert e.value.param == param and param in str(e.value)


def test_engine_kwargs_plain_and_with_vas(value_models):
    plain = engine_kwargs("/m", None)
    assert "logits_processors" not in plain and plain["async_scheduling"] is False
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"

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
        VASConfig(value_models={"a": value_models["prefix"], "b": value_models["prefix"]}).heads()


def test_config_rejects_bad_top_k():
    with pytest.raises(ValueError, match="default_top_k"):
        VASConfig(default_top_k=0)
