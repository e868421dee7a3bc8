"""VAS inside the real vLLM engine (CPU), tiny models: unweighted rows, greedy against a reference,
preemption, the direction of steering, the value cache."""

from __future__ import annotations

import random

import pytest
from vllm import SamplingParams

from reference_vas import ReferenceValueModel, reference_greedy
from vas_server.params import make_extra_args

STEER_HEADS = ["s1", "s2", "t1", "t2"]  # two state heads and two token heads on one trunk


def _tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def _prompts(token_lists):
    return [{"prompt_token_ids": p} for p in token_lists]


def test_rows_without_weights_match_plain_vllm(vas_llm, plain_llm, prompts):
    """Test 1: unweighted rows sample exactly as plain vLLM, even beside VAS rows (same seeds)."""
    plain_params = [SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=24) for i in range(len(prompts))]
    mixed = []
    for i, p in enumerate(plain_params):
        if i % 2:  # odd rows steer; even rows carry no weights (or all-zero weights)
            extra = make_extra_args({"s1": 1.5, "t1": -2.0})
        else:
            extra = make_extra_args({"s1": 0.0}) if i % 4 == 0 else None
        mixed.append(SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=24, extra_args=extra))
    plain = _tokens(plain_llm.generate(_prompts(prompts), plain_params, use_tqdm=False))
    steered = _tokens(vas_llm.generate(_prompts(prompts), mixed, use_tqdm=False))
    for i in range(0, len(prompts), 2):
        assert steered[i] == plain[i], f"unweighted row {i} differs from plain vLLM"
    assert any(steered[i] != plain[i] for i in range(1, len(prompts), 2)), "steering changed nothing"


def test_greedy_matches_uncached_reference(vas_llm, tiny_base, value_models, prompts):
    """Test 2: vLLM + processor gives the reference's greedy tokens (8 prompts x 32 tokens)."""
    refs = {"prefix": ReferenceValueModel(value_models["prefix"], str(tiny_base)),
            "alone": ReferenceValueModel(value_models["alone"], str(tiny_base))}
    rng = random.Random(0)
    cases = []
    for p in prompts:
        weights = {h: round(rng.uniform(-3, 3), 3) for h in STEER_HEADS}
        if rng.random() < 0.5:
            weights["s3"] = round(rng.uniform(-3, 3), 3)  # a standalone trunk as well
        cases.append((p, weights))
    params = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, extra_args=make_extra_args(w))
              for _, w in cases]
    got = _tokens(vas_llm.generate(_prompts([p for p, _ in cases]), params, use_tqdm=False))
    plain = _tokens(vas_llm.generate(_prompts([p for p, _ in cases]),
                                     SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False))
    for (p, w), tokens, base_tokens in zip(cases, got, plain):
        want = reference_greedy(str(tiny_base), refs, w, p, 32)
        assert tokens == want, f"weights {w}"
    assert sum(g != b for g, b in zip(got, plain)) >= len(cases) // 2, "weights barely changed the output"


def _solo(vas_llm, prompt, params):
    return _tokens(vas_llm.generate(_prompts([prompt]), [params], use_tqdm=False))[0]


def test_batch_dynamics_with_preemption(vas_llm, prompts):
    """Test 3: 16 concurrent requests, varied lengths/weights/max_tokens, some preempted."""
    rng = random.Random(1)
    reqs = []
    for i in range(16):
        p = prompts[i % len(prompts)] * (1 + i % 3)
        weights = {} if i % 5 == 0 else {h: round(rng.uniform(-2, 2), 2) for h in rng.sample(STEER_HEADS + ["s3"], 2)}
        params = SamplingParams(temperature=0, max_tokens=rng.choice([4, 40, 120]), ignore_eos=True,
                                extra_args=make_extra_args(weights, top_k=rng.choice([5, 20, 40])))
        reqs.append((p, params))
    before = vas_llm.collective_rpc("vas_stats")[0]
    together = _tokens(vas_llm.generate(_prompts([p for p, _ in reqs]), [q for _, q in reqs], use_tqdm=False))
    after = vas_llm.collective_rpc("vas_stats")[0]
    assert after["resumed_requests"] > before["resumed_requests"], "no request was preempted; shrink the KV cache"
    for (p, params), tokens in zip(reqs, together):
        assert len(tokens) == params.max_tokens
        assert tokens == _solo(vas_llm, p, params)


def test_steering_raises_and_lowers_a_valued_token(vas_llm, prompts, liked_token):
    """Test 4: a head that values one token shifts its frequency with the sign of the weight."""

    def frequency(weight: float) -> float:
        # K large enough that the liked token is usually among the candidates.
        extra = make_extra_args({"likes": weight}, top_k=128) if weight else None
        params = [SamplingParams(temperature=1.0, seed=s, max_tokens=48, ignore_eos=True, extra_args=extra)
                  for s in range(16)]
        outs = _tokens(vas_llm.generate(_prompts([prompts[s % len(prompts)] for s in range(16)]), params,
                                        use_tqdm=False))
        flat = [t for o in outs for t in o]
        return flat.count(liked_token) / len(flat)

    base, up, down = frequency(0.0), frequency(6.0), frequency(-6.0)
    assert up > 5 * base and up > 0.05, (base, up)
    assert down < base, (base, down)
    assert down <= 0.01, down


def test_restrict_to_top_k_only_samples_candidates(vas_llm, prompts):
    """With vas_restrict_to_top_k and K=1 and weights, sampling is greedy over the base logits."""
    greedy = _tokens(vas_llm.generate(_prompts(prompts[:3]), SamplingParams(temperature=0, max_tokens=16,
                                                                            ignore_eos=True), use_tqdm=False))
    params = SamplingParams(temperature=1.5, seed=3, max_tokens=16, ignore_eos=True,
                            extra_args=make_extra_args({"s1": 1.0}, top_k=1, restrict_to_top_k=True))
    restricted = _tokens(vas_llm.generate(_prompts(prompts[:3]), params, use_tqdm=False))
    assert restricted == greedy


def test_value_cache_slots_are_released_and_reused_clean(vas_llm, prompts):
    """Test 5: after 100 requests every value-cache slot is free again, and a slot that served
    other requests starts clean: a greedy request gives the same tokens before and after."""
    probe = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, extra_args=make_extra_args({"s3": 2.0}))
    first = _solo(vas_llm, prompts[0], probe)
    before = vas_llm.collective_rpc("vas_stats")[0]
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=8 + i % 7,
                             extra_args=make_extra_args({"s1": 1.0, "s3": 0.5} if i % 3 else {"likes": 1.0}))
              for i in range(100)]
    vas_llm.generate(_prompts([prompts[(i + 1) % len(prompts)] for i in range(100)]), params, use_tqdm=False)
    after = vas_llm.collective_rpc("vas_stats")[0]
    assert after["vas_requests_total"] - before["vas_requests_total"] == 100
    assert after["cache_slots_used"] == 0 and after["active_requests"] == 0 and after["dropped_requests"] == 0
    assert _solo(vas_llm, prompts[0], probe) == first


def test_an_unknown_head_runs_unsteered(vas_llm, prompts):
    """vLLM's validate_params has no engine configuration (the middleware refuses an unknown head
    with a 400): on the engine path a request naming a head this engine lacks runs unsteered."""
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    unknown = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                             extra_args=make_extra_args({"nope": 1, "t1": 8.0}))
    steered = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, extra_args=make_extra_args({"t1": 8.0}))
    before = vas_llm.collective_rpc("vas_stats")[0]
    assert _solo(vas_llm, prompts[0], unknown) == _solo(vas_llm, prompts[0], plain)
    assert _solo(vas_llm, prompts[0], steered) != _solo(vas_llm, prompts[0], plain)
    assert vas_llm.collective_rpc("vas_stats")[0]["vas_requests_total"] - before["vas_requests_total"] == 1


def test_invalid_settings_are_refused_at_admission(vas_llm, prompts):
    with pytest.raises(Exception, match="must be a number in -100..100"):
        vas_llm.generate(_prompts(prompts[:1]), SamplingParams(max_tokens=2, extra_args={"vas": {"weights": {"t1": 1e9}}}),
                         use_tqdm=False)
