"""Tensor and pipeline parallelism (TP = 2, PP = 2) on vLLM's CPU backend.

TP: the shared path's token heads score a vocabulary-parallel embedding (vas_server.engine.tp_heads),
and the separate runtime runs on every rank. PP: the last stage receives the earlier stage's aux
states (vas_server.engine.pp_stage) and alone loads the value models and steers.

One tiny random Llama with 2 layers, 4 query heads and 2 KV heads (hidden 256: each TP rank takes
2 query heads and 1 KV head, and half of the 384-token vocabulary; each PP stage one layer), three
engines per session (TP = 1, TP = 2, PP = 2), the same value models on all:
  * "sh1": token heads on the base's layer 1 of 2 (shared path, N < all; under PP computed on
    the first stage and carried to the last);
  * "sh2": token heads on layer 2 = all layers (shared path, N = all);
  * "sep": a state and a token head on a 1-layer base_prefix trunk (separate runtime).
Greedy steered tokens and every row's head values (the probe of test_shared_trunk) at TP = 2 and
PP = 2 equal TP = 1's. The unit test at the bottom checks the sharded scoring itself in one process.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from vllm import SamplingParams

from engine_settings import KV_BLOCKS, MAX_MODEL_LEN
from test_shared_trunk import _install_probe, _take_log
from tiny_models import build_llama
from vas_server.core.format import HeadSpec, TrunkSpec
from vas_server.core.heads import ValueHeads
from vas_server.params import make_extra_args
from value_models.synthetic import random_value_model


@pytest.fixture(scope="module")
def tp_models(tiny_dir) -> tuple[str, dict[str, str]]:
    root = tiny_dir / "tp"
    base = build_llama(root / "base", tiny_dir / "tokenizer", seed=3, hidden=256, num_kv_heads=2)
    vm = root / "value_models"
    models = {
        "sh1": random_value_model(vm / "sh1", base, [("a1", "token"), ("a2", "token")], seed=30,
                                  trunk=TrunkSpec("base_prefix", num_layers=1), scale=3.0),
        "sh2": random_value_model(vm / "sh2", base, [("b1", "token")], seed=31,
                                  trunk=TrunkSpec("base_prefix", num_layers=2), scale=3.0),
        "sep": random_value_model(vm / "sep", base, [("cs", "state"), ("c1", "token")], seed=32,
                                  trunk=TrunkSpec("base_prefix", num_layers=1), scale=3.0),
    }
    return str(base), {k: str(v) for k, v in models.items()}


def _engine(tp_models, tp: int = 1, pp: int = 1):
    from vllm import LLM

    from vas_server.config import VASConfig
    from vas_server.engine_args import engine_kwargs

    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the probe is a pickled function
    base, models = tp_models
    llm = LLM(**engine_kwargs(base, VASConfig(value_models=models), dtype="float32", max_model_len=MAX_MODEL_LEN,
                              num_gpu_blocks_override=KV_BLOCKS, max_num_seqs=16, seed=0, disable_log_stats=True,
                              tensor_parallel_size=tp, pipeline_parallel_size=pp))
    names = llm.collective_rpc(_install_probe)
    assert len(names) == tp * pp
    # Under PP only the last stage (the last workers) loads the value models.
    assert names[:-tp] == [None] * (tp * (pp - 1)) and all(n == names[-1] for n in names[-tp:])
    llm.vas_head_names = names[-1]
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def tp1_llm(tp_models):
    yield from _engine(tp_models, 1)


@pytest.fixture(scope="module", params=["TP=2", "PP=2"])
def parallel_llm(tp_models, request):
    """One parallel engine at a time (pytest finishes one parameter's tests before the next's).
    On CPU vas_server.engine_args runs PP with Dynamo's eager backend (vLLM's eager CPU PP fails)."""
    size = {"TP=2": {"tp": 2}, "PP=2": {"pp": 2}}[request.param]
    yield from _engine(tp_models, **size)


@pytest.fixture(scope="module")
def tp_prompts(tp_models) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tp_models[0])
    texts = ["Hello, how are you", "The quick brown fox", "What is the capital of France?", "Good",
             "I love sunny days and happy people. This is", "Paris is the"]
    return [tok.encode(t, add_special_tokens=False) for t in texts]


CASES = {  # name -> weights, one per prompt (None: a plain row)
    "shared N<all": [{"a1": 2.5}, {"a2": -2.0}, {"a1": 1.5, "a2": 1.5}, {"a1": -3.0}, {"a2": 2.0}, {"a1": 2.0}],
    "shared N=all": [{"b1": 2.5}, {"b1": -2.5}, {"b1": 3.0}, {"b1": -1.5}, {"b1": 2.0}, {"b1": -3.0}],
    "separate": [{"c1": 2.5, "cs": 1.0}, {"c1": -2.5}, {"cs": 2.0}, {"c1": 3.0}, {"c1": 2.0, "cs": -1.0}, {"c1": -3.0}],
    "mixed": [{"a1": 2.5}, None, {"b1": -2.5, "a2": 1.0}, {"c1": 2.0}, None, {"a1": 1.0, "b1": 1.0, "c1": 1.0}],
}


def _run(llm, prompts, weights, max_tokens=24):
    params = [SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                             extra_args=make_extra_args(w) if w else None) for w in weights]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    logs = llm.collective_rpc(_take_log)
    return [list(o.outputs[0].token_ids) for o in outs], logs


def _by_row(log):
    """The probe's log keyed by (prompt, outputs so far): candidates and values."""
    return {(tuple(p), tuple(o)): (c, v) for p, o, c, v in log}


@pytest.mark.parametrize("case", list(CASES))
def test_parallel_steers_like_one_device(tp1_llm, parallel_llm, tp_prompts, case):
    weights = CASES[case]
    one, (log1,) = _run(tp1_llm, tp_prompts, weights)
    two, logs2 = _run(parallel_llm, tp_prompts, weights)
    plain, _ = _run(tp1_llm, tp_prompts, [None] * len(tp_prompts))
    assert sum(a != b for a, b, w in zip(one, plain, weights) if w) >= 2, "steering changed little"
    assert two == one
    # Every worker that samples (both TP ranks; the last PP stage) scored every row with the same
    # values, equal to the single device's; an earlier PP stage scored nothing.
    tp = parallel_llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size
    sampling = logs2[-tp:]  # vLLM's ranks: the last stage's TP ranks come last
    assert all(log == sampling[0] for log in sampling) and not any(logs2[:-tp])
    rows1, rows2 = _by_row(log1), _by_row(sampling[0])
    assert rows1.keys() == rows2.keys() and len(rows1) == sum(24 for w in weights if w)
    names = tp1_llm.vas_head_names
    assert names == parallel_llm.vas_head_names
    for key, (c1, v1) in rows1.items():
        c2, v2 = rows2[key]
        assert c1 == c2
        for name, a, b in zip(names, v1, v2):
            assert max((abs(x - y) for x, y in zip(a, b)), default=0.0) < 1e-4, (case, name, key, a, b)


def test_parallel_metrics_speak_once(parallel_llm):
    """/metrics reads the first non-empty `vas_stats` (vas_server.http.metrics): under TP every rank
    counts the same steps; under PP only the last stage counts, the first answers {}."""
    stats = parallel_llm.collective_rpc("vas_stats")
    counted = [s for s in stats if s]
    assert len(counted) in (1, 2) and counted[0]["steps"] > 0 and counted[0]["vas_requests_total"] > 0
    counts = ("vas_requests_total", "steps", "cache_slots_total", "dropped_requests")
    assert all({k: s[k] for k in counts} == {k: counted[0][k] for k in counts} for s in counted)
    tp = parallel_llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size
    assert len(counted) == tp


class _Shard:
    """A VocabParallelEmbedding's interface as vas_server.engine.tp_heads reads it: `weight` (this
    rank's rows, padded) and `shard_indices`."""

    def __init__(self, embed: torch.Tensor, start: int, end: int, padded: int, total_padded: int):
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbeddingShardIndices

        V = embed.shape[0]
        self.weight = torch.cat([embed[start:end], torch.full((padded - (end - start), embed.shape[1]), 7.0)])
        # vLLM's layout without added (LoRA) tokens: an empty added range at the vocabulary's end.
        self.shard_indices = VocabParallelEmbeddingShardIndices(start, start + padded, total_padded, total_padded,
                                                                start, end, V, V)


def test_vocab_parallel_values_equal_one_device():
    """Two shards of an uneven vocabulary (the second padded), summed by a simulated all-reduce:
    token heads' values on VocabShards equal their values on the whole matrix; either shard alone
    does not."""
    from vas_server.engine.tp_heads import VocabShard

    torch.manual_seed(0)
    V, H, B, K = 100, 16, 5, 30
    heads = ValueHeads([HeadSpec("x", "token", ""), HeadSpec("y", "token", "")], H, V)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_()
    embed, hidden = torch.randn(V, H), torch.randn(B, H)
    tokens = torch.randint(0, V, (B, K))
    expected = heads.token(hidden, embed, tokens)
    shards = [_Shard(embed, 0, 56, 56, 112), _Shard(embed, 56, 100, 56, 112)]
    projected = torch.einsum("bh,nhg->nbg", hidden, heads.token.proj)
    local = [VocabShard(s, lambda t: t).dots(projected, tokens) for s in shards]  # each rank's own part
    for rank, shard in enumerate(shards):  # the all-reduce adds the other rank's part
        reduced = VocabShard(shard, lambda t, other=local[1 - rank]: t + other)
        torch.testing.assert_close(heads.token(hidden, reduced, tokens), expected, rtol=1e-5, atol=1e-5)
    parts = [heads.token(hidden, VocabShard(s, lambda t: t), tokens) for s in shards]  # no all-reduce
    for part in parts:
        assert not torch.allclose(part, expected, atol=1e-3)
