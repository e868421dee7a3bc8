"""The shared-trunk path (vas_server.engine.hidden_states): token heads on the base's own layer-N states.

Two engines, both real vLLM on CPU in float32:
  * `mixed_llm`: separate-runtime models ("prefix": N = 1, the conftest model; "deep": N = 2 =
    all layers of the tiny base) next to shared-path copies of their token heads ("u1", "u2" =
    "t1", "t2"; "e1" = "d1"). A request that steers with both heads of a pair gets both values in
    the same row of the same step, so the probe below compares them directly (1e-4).
  * `chunked_llm`: only the shared copies, chunked prefill, no max_num_seqs given.
The probe wraps the worker's `ValueRuntime.score` and logs every row's candidates and values.
"""

from __future__ import annotations

import gc
import os
import random
import sys

import cloudpickle
import pytest
from vllm import SamplingParams

from engine_settings import engine_overrides
from reference_vas import ReferenceValueModel, reference_greedy
from tiny_models import token_copy
from vas_server.core.format import TrunkSpec
from value_models.synthetic import random_value_model
from vas_server.params import make_extra_args

PAIRS = [("t1", "u1"), ("t2", "u2"), ("d1", "e1")]  # (separate-runtime head, its shared-path copy)
BUDGET = 64  # chunked_llm: tokens per engine step

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the probe functions run in the worker


@pytest.fixture(scope="module")
def shared_models(tiny_dir, tiny_base, value_models) -> dict[str, str]:
    vm = tiny_dir / "shared_value_models"
    deep = str(random_value_model(vm / "deep", tiny_base, [("ds", "state"), ("d1", "token")], seed=20,
                                  trunk=TrunkSpec("base_prefix", num_layers=2), scale=3.0))
    return {
        "deep": deep,  # separate (has a state head), all layers
        "shared1": token_copy(value_models["prefix"], vm / "shared1", {"t1": "u1", "t2": "u2"}),
        "shared2": token_copy(deep, vm / "shared2", {"d1": "e1"}),
    }


def _install_probe(worker):
    from vas_server.core.scorer import TokenLists

    runner = worker.model_runner
    if hasattr(runner, "input_batch"):  # the V1 runner (CPU)
        procs = runner.input_batch.logitsprocs.non_argmax_invariant
    else:  # Model Runner V2 (GPU default): token history on the device
        procs = runner.sampler.logits_processors
    proc = next(p for p in procs if type(p).__name__ in ("V1Processor", "V2Processor"))
    runtime, log = proc.steering.runtime, []
    worker.vas_probe_log = log
    if runtime is None:  # a pipeline stage that does not sample: no value models, nothing to log
        return None
    score = runtime.score

    def history(row) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if isinstance(row.tokens, TokenLists):
            return tuple(row.tokens.prompt), tuple(row.tokens.outputs)
        req_idx = row.tokens.req_idx
        tokens = runner.req_states.all_token_ids.gpu[req_idx, :row.tokens.length].tolist()
        prompt_len = int(runner.req_states.prompt_len.np[req_idx])
        return tuple(tokens[:prompt_len]), tuple(tokens[prompt_len:])

    def logged(rows, candidates, *args):
        values = score(rows, candidates, *args)
        for row, c, v in zip(rows, candidates.tolist(), values.tolist()):
            log.append((*history(row), c, v))
        return values

    runtime.score = logged
    return list(runtime.head_names)


def _take_log(worker):
    out = list(worker.vas_probe_log)
    worker.vas_probe_log.clear()
    return out


def _engine(tiny_base, models, **overrides):
    from vllm import LLM

    # collective_rpc with a function (the probe) is pickled; vLLM refuses that unless allowed. Read
    # by this process at each call and inherited by the engine's processes, so set before start.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"

    from vas_server.config import VASConfig
    from vas_server.engine_args import engine_kwargs

    llm = LLM(**engine_kwargs(str(tiny_base), VASConfig(value_models=models), **overrides))
    llm.vas_head_names = llm.collective_rpc(_install_probe)[0]
    return llm


@pytest.fixture(scope="module")
def mixed_llm(tiny_base, value_models, shared_models):
    # Eager on any device (vas-server's CPU default; on GPUs vLLM would compile and capture
    # CUDA graphs): the reference for compiled_llm.
    models = {"prefix": value_models["prefix"], **shared_models}
    yield from _shut_down_after(_engine(tiny_base, models, **engine_overrides(), enforce_eager=True))


@pytest.fixture(scope="module")
def compiled_llm(tiny_base, value_models, shared_models):
    """mixed_llm's value models on vLLM's compiled forward (torch.compile with inductor; on GPUs
    the same path CUDA graphs capture): the tap's states are outputs of the compiled graph."""
    models = {"prefix": value_models["prefix"], **shared_models}
    yield from _shut_down_after(_engine(tiny_base, models, **engine_overrides(), enforce_eager=False))


@pytest.fixture(scope="module")
def chunked_llm(tiny_base, shared_models):
    overrides = {k: v for k, v in engine_overrides().items() if k != "max_num_seqs"}
    models = {"shared1": shared_models["shared1"], "shared2": shared_models["shared2"]}
    yield from _shut_down_after(_engine(tiny_base, models, **overrides, enable_chunked_prefill=True,
                                        max_num_batched_tokens=BUDGET))


def _shut_down_after(llm):
    """Yield the engine to the module's tests, then stop it and free its memory (this generator
    holds the only reference, so `del` lets gc.collect free it)."""
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _run(llm, prompts, params):
    """Generate; return (token lists, the probe's log of this run)."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return outs, llm.collective_rpc(_take_log)[0]


def _tokens(outs) -> list[list[int]]:
    return [list(c.token_ids) for o in outs for c in o.outputs]


def _assert_pairs_match(log, names) -> int:
    """In every logged row that uses both heads of a pair, their values agree; returns how many
    (row, pair) comparisons were made."""
    compared = 0
    for prompt, outputs, _, values in log:
        for separate, shared in PAIRS:
            a, b = values[names.index(separate)], values[names.index(shared)]
            if not any(a) and not any(b):
                continue
            assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (separate, shared, len(prompt), len(outputs), a, b)
            compared += 1
    return compared


def _weights(rng, heads) -> dict[str, float]:
    return {h: round(rng.uniform(-3, 3), 3) for h in heads}


def _both(weights: dict[str, float]) -> dict[str, float]:
    """Half of each weight on the separate-runtime head, half on its shared copy: the values are
    compared row by row, and the tokens must be those of the whole weight on the shared copy."""
    copy = dict(PAIRS)
    return {**{h: w / 2 for h, w in weights.items()}, **{copy[h]: w / 2 for h, w in weights.items()}}


def _shared(weights: dict[str, float]) -> dict[str, float]:
    copy = dict(PAIRS)
    return {copy[h]: w for h, w in weights.items()}


def _greedy(weights, max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                          extra_args=make_extra_args(weights) if weights else None)


def test_shared_path_matches_separate_runtime(mixed_llm, prompts):
    """8 prompts x 32 greedy tokens: the same values (1e-4) and the same tokens on both paths."""
    rng = random.Random(0)
    cases = [_weights(rng, ["t1", "t2"] if i % 2 else ["d1"]) for i in range(len(prompts))]
    both, log = _run(mixed_llm, prompts, [_greedy(_both(w), 32) for w in cases])
    # Every row of every step: pairs (t1, u1) and (t2, u2), or (d1, e1).
    assert _assert_pairs_match(log, mixed_llm.vas_head_names) == sum(2 if "t1" in w else 1 for w in cases) * 32
    shared, _ = _run(mixed_llm, prompts, [_greedy(_shared(w), 32) for w in cases])
    plain, _ = _run(mixed_llm, prompts, _greedy(None, 32))
    assert _tokens(shared) == _tokens(both)
    assert sum(a != b for a, b in zip(_tokens(shared), _tokens(plain))) >= len(prompts) // 2, "steering changed little"


def test_preemption_mixed_plain_rows_and_n(mixed_llm, prompts):
    """16 concurrent requests in a KV cache too small for them (preempted and resumed), plain rows
    between VAS rows, n = 2 with seeds: shared values equal separate ones in every row of every step,
    and the plain rows sample as they do alone."""
    rng = random.Random(1)
    reqs, plain_ids = [], []
    for i in range(16):
        p = prompts[i % len(prompts)] * (1 + i % 3)
        if i % 5 == 0:
            reqs.append((p, SamplingParams(temperature=0.9, seed=i, max_tokens=100, ignore_eos=True)))
            plain_ids.append(i)
        else:
            weights = _both(_weights(rng, ["t1"] if i % 3 else ["d1"]))
            reqs.append((p, SamplingParams(temperature=0.9, seed=i, max_tokens=rng.choice([40, 120, 120]), n=1 + i % 2,
                                           ignore_eos=True, extra_args=make_extra_args(weights, top_k=5))))
    before = mixed_llm.collective_rpc("vas_stats")[0]
    outs, log = _run(mixed_llm, [p for p, _ in reqs], [q for _, q in reqs])
    after = mixed_llm.collective_rpc("vas_stats")[0]
    assert after["resumed_requests"] > before["resumed_requests"], "no VAS request was preempted; shrink the KV cache"
    assert _assert_pairs_match(log, mixed_llm.vas_head_names) > 500
    alone, _ = _run(mixed_llm, [reqs[i][0] for i in plain_ids], [reqs[i][1] for i in plain_ids])
    assert _tokens(alone) == _tokens([outs[i] for i in plain_ids])
    assert after["cache_slots_used"] == 0


def test_prefix_cache_hit(mixed_llm, prompts):
    """The same long prompt twice: the second is served from vLLM's prefix cache (only its last
    block is recomputed) and gets the same values and tokens."""
    long_prompt = (prompts[4] * 40)[:300]  # > 2 CPU KV blocks of 128 tokens
    params = _greedy(_both({"t1": 2.0, "d1": -1.5}), 16)
    first, log1 = _run(mixed_llm, [long_prompt], [params])
    second, log2 = _run(mixed_llm, [long_prompt], [params])
    assert (second[0].num_cached_tokens or 0) >= 256, second[0].num_cached_tokens
    assert _tokens(second) == _tokens(first)
    assert _assert_pairs_match(log2, mixed_llm.vas_head_names) == 3 * 16  # t1 brings t2's values along
    for a, b in zip(log1, log2):
        assert a[2] == b[2] and max(abs(x - y) for va, vb in zip(a[3], b[3]) for x, y in zip(va, vb)) < 1e-4


@pytest.mark.parametrize("heads", [{"u1": 2.5, "u2": -2.0}, {"e1": 3.0}], ids=["N=1", "N=2 (all layers)"])
def test_shared_path_matches_uncached_reference(mixed_llm, tiny_base, shared_models, prompts, heads):
    """The HF no-cache reference gives the same greedy tokens at every trunk depth of the tiny base."""
    model = shared_models["shared1" if "u1" in heads else "shared2"]
    refs = {"m": ReferenceValueModel(model, str(tiny_base))}
    outs, _ = _run(mixed_llm, prompts[:4], _greedy(heads, 16))
    for p, tokens in zip(prompts[:4], _tokens(outs)):
        assert tokens == reference_greedy(str(tiny_base), refs, heads, p, 16)


def test_only_shared_models_no_cap_no_cache(chunked_llm, mixed_llm, tiny_base, shared_models, value_models, prompts):
    """Only shared-path models: engine_kwargs leaves max_num_seqs to vLLM and no value cache exists.
    Under chunked prefill (prompts split over several steps) the values and greedy tokens are those
    of the unchunked engine, whose shared values match the separate runtime."""
    from vas_server.config import VASConfig
    from vas_server.engine_args import DEFAULT_VAS_REQUESTS, engine_kwargs

    only_shared = {"shared1": shared_models["shared1"], "shared2": shared_models["shared2"]}
    assert "max_num_seqs" not in engine_kwargs(str(tiny_base), VASConfig(value_models=only_shared))
    mixed = engine_kwargs(str(tiny_base), VASConfig(value_models={**only_shared, "prefix": value_models["prefix"]}))
    assert mixed["max_num_seqs"] == DEFAULT_VAS_REQUESTS
    # vLLM's own choice with chunked prefill: min(CPU default 256, max_num_batched_tokens).
    assert chunked_llm.llm_engine.vllm_config.scheduler_config.max_num_seqs == BUDGET > DEFAULT_VAS_REQUESTS

    rng = random.Random(5)
    long_prompts = [p * (BUDGET // len(p) + 2) for p in prompts]
    assert all(len(p) > BUDGET for p in long_prompts)
    weights = [_weights(rng, ["t1", "t2", "d1"]) for _ in long_prompts]
    chunked, chunked_log = _run(chunked_llm, long_prompts, [_greedy(_shared(w), 20) for w in weights])
    whole, both_log = _run(mixed_llm, long_prompts, [_greedy(_both(w), 20) for w in weights])
    assert _tokens(chunked) == _tokens(whole)
    assert _assert_pairs_match(both_log, mixed_llm.vas_head_names) >= len(long_prompts) * 20 * 3
    # A partial prefill step is sampled too (and its token dropped): keep each state's last entry.
    reference = {(tuple(p), tuple(o)): v for p, o, _, v in both_log}  # (lists after the RPC)
    final = {(tuple(p), tuple(o)): v for p, o, _, v in chunked_log}
    assert len(final) == len(reference)
    chunked_names, mixed_names = chunked_llm.vas_head_names, mixed_llm.vas_head_names
    for key, values in final.items():
        for _, head in PAIRS:
            a, b = values[chunked_names.index(head)], reference[key][mixed_names.index(head)]
            assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (head, key)
    stats = chunked_llm.collective_rpc("vas_stats")[0]
    assert stats["cache_bytes"] == 0 and stats["cache_slots_total"] == 0 and stats["steps"] > 0


@pytest.mark.parametrize("num_layers", [1, 2])
def test_training_states_are_the_served_states(tiny_base, prompts, num_layers):
    """`vas-train fit --num-layers N` (HF, N layers + final norm) computes the states the server
    reads, for every depth of the tiny base (the engine tests above tie the server to vas_server.core.trunk)."""
    import torch

    from value_models.training_trunk import TrainingTrunk, TrunkPlan
    from vas_server.core.trunk import load_trunk

    tokens = torch.tensor([(prompts[4] * 4)[:24], (prompts[0] * 8)[:24]])
    trained = TrainingTrunk(TrunkPlan("base_prefix", str(tiny_base), num_layers=num_layers)).hidden_states(tokens)
    served = load_trunk(tiny_base, num_layers).forward_causal(tokens)
    torch.testing.assert_close(trained.detach(), served, atol=1e-5, rtol=0)


def test_compiled_forward_steers_like_eager_and_the_reference(compiled_llm, mixed_llm, tiny_base, shared_models,
                                                              value_models, prompts):
    """One batch on the compiled forward: shared heads at N = 1 and N = all layers, separate-runtime
    heads (own trunk, state and token heads), a plain row. Greedy tokens equal the eager engine's,
    the shared rows equal the HF no-cache reference, and steering changed what it steered."""
    from vllm.config import CompilationMode

    config = compiled_llm.llm_engine.vllm_config
    assert not config.model_config.enforce_eager and config.compilation_config.mode != CompilationMode.NONE
    cases = [{"u1": 2.5, "u2": -2.0}, {"e1": 3.0}, None, {"t1": 2.0, "s1": -1.5}, {"d1": 2.0, "ds": 1.0},
             {"u1": -3.0, "e1": 2.0, "t2": 1.0}]
    batch = [prompts[i % len(prompts)] for i in range(len(cases))]
    params = [_greedy(w, 16) for w in cases]
    compiled, _ = _run(compiled_llm, batch, params)
    eager, _ = _run(mixed_llm, batch, params)
    plain, _ = _run(mixed_llm, batch, _greedy(None, 16))
    assert _tokens(compiled) == _tokens(eager)
    assert _tokens(compiled)[2] == _tokens(plain)[2]
    assert sum(a != b for a, b in zip(_tokens(compiled), _tokens(plain))) >= 4, "steering changed little"
    refs = {"shared1": ReferenceValueModel(shared_models["shared1"], str(tiny_base)),
            "shared2": ReferenceValueModel(shared_models["shared2"], str(tiny_base))}
    for i in (0, 1, 5):
        if "t2" in cases[i]:
            refs["prefix"] = ReferenceValueModel(value_models["prefix"], str(tiny_base))
        assert _tokens(compiled)[i] == reference_greedy(str(tiny_base), refs, cases[i], batch[i], 16)
