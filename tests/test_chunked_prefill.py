"""VAS under chunked prefill: prompts split over several engine steps give the same greedy tokens.

A separate engine with a tiny per-step token budget forces the split. Greedy requests only:
vLLM 0.32's CPU build cannot chunk seeded requests (see vas_server/engine_args.py).
"""

from __future__ import annotations

import random

import pytest
from vllm import SamplingParams

from engine_settings import engine_overrides
from vas_server.params import make_extra_args

BUDGET = 16  # tokens per engine step, shared by all requests


@pytest.fixture(scope="module")
def chunked_llm(tiny_base, value_models):
    from vllm import LLM

    from vas_server.config import VASConfig
    from vas_server.engine_args import engine_kwargs

    llm = LLM(**engine_kwargs(str(tiny_base), VASConfig(value_models=value_models), **engine_overrides(),
                              enable_chunked_prefill=True, max_num_batched_tokens=BUDGET))
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_chunked_prefill_gives_the_unchunked_tokens(chunked_llm, vas_llm, prompts):
    rng = random.Random(5)
    # Prompts longer than the budget, sent together: each is prefilled over several steps.
    long_prompts = [p * (BUDGET // len(p) + 2) for p in prompts]
    assert all(len(p) > BUDGET for p in long_prompts)
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                             extra_args=make_extra_args({"s1": rng.uniform(-2, 2), "t1": rng.uniform(-2, 2),
                                                         "s3": rng.uniform(-2, 2)}))
              for _ in long_prompts]
    inputs = [{"prompt_token_ids": p} for p in long_prompts]
    before = chunked_llm.collective_rpc("vas_stats")[0]
    chunked = [list(o.outputs[0].token_ids) for o in chunked_llm.generate(inputs, params, use_tqdm=False)]
    whole = [list(o.outputs[0].token_ids) for o in vas_llm.generate(inputs, params, use_tqdm=False)]
    plain = [list(o.outputs[0].token_ids) for o in chunked_llm.generate(
        inputs, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)]
    assert chunked == whole
    # Steering happened on the chunked engine: it changed most answers, every request was steered.
    assert sum(c != p for c, p in zip(chunked, plain)) >= len(long_prompts) // 2, "steering changed little"
    stats = chunked_llm.collective_rpc("vas_stats")[0]
    assert stats["vas_requests_total"] - before["vas_requests_total"] >= len(long_prompts)
    assert stats["cache_slots_used"] == 0
