"""The value runtime against the uncached reference, value by value (float32, 1e-4)."""

from __future__ import annotations

import random

import pytest
import torch

from reference_vas import ReferenceValueModel
from vas_server.core.model import load_value_model
from vas_server.core.scorer import TokenLists, ValueRow
from vas_server.core.value_runtime import ValueRuntime


@pytest.fixture(params=["preset", "grown"])
def cache_growth(request, monkeypatch):
    """"grown": the value cache starts at 1 slot of 1 + 8 keys, so the tests' steps grow it (slots
    and rows, by copies) many times; the values must not change."""
    if request.param == "grown":
        from vas_server.core import value_cache

        monkeypatch.setattr(value_cache, "INITIAL_SLOTS", 1)
        monkeypatch.setattr(value_cache, "INITIAL_LEN", 1)
        monkeypatch.setattr(value_cache, "MAX_CANDIDATES", 8)
    return request.param


def test_runtime_values_match_reference(tiny_base, value_models, cache_growth):
    names = ["prefix", "alone"]
    models = [load_value_model(value_models[n], tiny_base, name=n) for n in names]
    refs = {n: ReferenceValueModel(value_models[n], str(tiny_base)) for n in names}
    runtime = ValueRuntime(models, max_requests=4, max_len=128, device="cpu", dtype=torch.float32)
    rng = random.Random(0)
    vocab = models[0].trunk.config.vocab_size
    K = 6
    all_heads = frozenset(range(len(runtime.head_names)))

    # Three rows with different prompt lengths; row 2 also uses only one trunk's heads.
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (3, 9, 5)]
    slots = [runtime.allocate() for _ in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    rows = [ValueRow(slot, all_heads, TokenLists(p, o)) for slot, p, o in zip(slots, prompts, outputs)]
    compared = 0
    for step in range(6):
        candidates = torch.tensor([[rng.randrange(vocab) for _ in range(K)] for _ in rows])
        values = runtime.score(rows, candidates)
        if step == 2:  # a repeated step with no new token (as in chunked prefill): same values
            again = runtime.score(rows, candidates)
            torch.testing.assert_close(again, values, atol=1e-5, rtol=0)
        for b, row in enumerate(rows):
            prefix = row.tokens.prompt + row.tokens.outputs
            for g, head in enumerate(runtime.head_names):
                owner = next(r for r in refs.values() if head in r.heads)
                want = owner.values(head, prefix, candidates[b].tolist())
                assert torch.allclose(values[b, g], want, atol=1e-4, rtol=0), (step, b, head)
                compared += K
        for o in outputs:  # commit one token per row (a different count would also work)
            o.append(rng.randrange(vocab))
    assert compared == 6 * 3 * len(runtime.head_names) * K
    if cache_growth == "grown":  # it grew, and by use: 3 slots of 4 allocated, rows shorter than max_len
        assert all(r.cache.k.shape[1] == 3 and 14 < r.cache.k.shape[2] < 128 for r in runtime.scorers)
        assert runtime.cache_bytes < sum(r.max_cache_bytes for r in runtime.scorers)

    # A released slot is rebuilt from scratch for a new request (e.g. a resumed preemption).
    runtime.release(slots[1])
    slot = runtime.allocate()
    resumed = ValueRow(slot, all_heads, TokenLists(prompts[1], outputs[1][:4]))
    candidates = torch.tensor([[rng.randrange(vocab) for _ in range(K)]])
    values = runtime.score([resumed], candidates)
    for g, head in enumerate(runtime.head_names):
        owner = next(r for r in refs.values() if head in r.heads)
        want = owner.values(head, resumed.tokens.prompt + resumed.tokens.outputs, candidates[0].tolist())
        assert torch.allclose(values[0, g], want, atol=1e-4, rtol=0), head


def test_rows_only_run_the_trunks_they_use(tiny_base, value_models):
    models = [load_value_model(value_models[n], tiny_base, name=n) for n in ("prefix", "alone")]
    runtime = ValueRuntime(models, max_requests=2, max_len=64, device="cpu", dtype=torch.float32)
    only_alone = frozenset([runtime.head_index["s3"]])
    slot = runtime.allocate()
    row = ValueRow(slot, only_alone, TokenLists([1, 2, 3]))
    runtime.score([row], torch.tensor([[5, 6, 7, 8]]))
    assert int(runtime.scorers[0].cache.cached[slot]) == 0  # the prefix trunk never ran
    assert int(runtime.scorers[1].cache.cached[slot]) == 3


def _draft_runtime(tiny_base, value_models, max_requests: int):
    """A runtime of the "prefix" and "alone" models (state and token heads), and their uncached
    references by name."""
    names = ["prefix", "alone"]
    models = [load_value_model(value_models[n], tiny_base, name=n) for n in names]
    refs = {n: ReferenceValueModel(value_models[n], str(tiny_base)) for n in names}
    return ValueRuntime(models, max_requests=max_requests, max_len=128, device="cpu", dtype=torch.float32), refs


def _assert_reference_values(runtime, refs, values, prefix, candidates, heads, where=()):
    """values [n_heads, K] of `candidates` after `prefix` equal the reference's, for `heads`."""
    for g, head in enumerate(runtime.head_names):
        if g in heads:
            owner = next(r for r in refs.values() if head in r.heads)
            want = owner.values(head, prefix, candidates)
            assert torch.allclose(values[g], want, atol=1e-4, rtol=0), (*where, head, prefix)


def test_drafted_positions_score_as_if_committed_and_only_accepted_ones_stay(tiny_base, value_models,
                                                                            cache_growth):
    """score_drafts of one row: position i's candidates valued after the prompt and the first i - 1 drafted
    tokens, in one pass; commit_draft keeps the accepted ones, and later steps see exactly the
    accepted tokens (a rejected drafted token never enters the cache)."""
    runtime, refs = _draft_runtime(tiny_base, value_models, max_requests=2)
    rng = random.Random(1)
    vocab = runtime.scorers[0].trunk.config.vocab_size
    all_heads = frozenset(range(len(runtime.head_names)))
    K, n = 5, 4
    runtime.allocate()  # slot 0 taken: the row's slot is not the first
    row = ValueRow(runtime.allocate(), all_heads, TokenLists([rng.randrange(vocab) for _ in range(7)]))

    def check(values, prefix, candidates):
        _assert_reference_values(runtime, refs, values, prefix, candidates, all_heads)

    for accepted in (2, 0, 3):
        runtime.advance([row])
        draft = [rng.randrange(vocab) for _ in range(n)]
        candidates = torch.tensor([[rng.randrange(vocab) for _ in range(K)] for _ in range(n)])
        values = runtime.score_drafts([row], [draft[:-1]], [candidates])[0]
        for i in range(n):
            check(values[i], row.tokens.prompt + row.tokens.outputs + draft[:i], candidates[i].tolist())
        runtime.commit_draft(row, accepted)
        row.tokens.outputs += draft[:accepted] + [rng.randrange(vocab)]  # the accepted run, then VAS's own token
    candidates = torch.tensor([[rng.randrange(vocab) for _ in range(K)]])
    check(runtime.score([row], candidates)[0], row.tokens.prompt + row.tokens.outputs, candidates[0].tolist())


def test_drafts_of_several_rows_score_in_one_batch_as_each_alone(tiny_base, value_models, cache_growth):
    """score_drafts: rows with different prompt lengths, draft lengths and K, in one batch (one
    forward per trunk), give each row's values as score_drafts of that row alone would, against
    the uncached reference; then commit_draft keeps each row's accepted tokens."""
    runtime, refs = _draft_runtime(tiny_base, value_models, max_requests=4)
    rng = random.Random(2)
    vocab = runtime.scorers[0].trunk.config.vocab_size
    all_heads = frozenset(range(len(runtime.head_names)))
    only_alone = frozenset([runtime.head_index["s3"]])
    rows = [ValueRow(runtime.allocate(), heads, TokenLists([rng.randrange(vocab) for _ in range(p)]))
            for p, heads in ((3, all_heads), (9, all_heads), (5, only_alone))]
    for round_, accepted in enumerate(((2, 0, 1), (0, 3, 0))):
        runtime.advance(rows)
        shapes = ((4, 5), (1, 3), (3, 6)) if round_ == 0 else ((2, 4), (5, 5), (1, 2))  # (n, K) per row
        drafts = [[rng.randrange(vocab) for _ in range(n)] for n, _ in shapes]
        candidates = [torch.tensor([[rng.randrange(vocab) for _ in range(K)] for _ in range(n)]) for n, K in shapes]
        values = runtime.score_drafts(rows, [d[:-1] for d in drafts], candidates)
        for b, row in enumerate(rows):
            assert values[b].shape == (shapes[b][0], len(runtime.head_names), shapes[b][1])
            for i in range(shapes[b][0]):
                context = row.tokens.prompt + row.tokens.outputs + drafts[b][:i]
                _assert_reference_values(runtime, refs, values[b][i], context,
                                         candidates[b][i].tolist(), row.head_ids, (round_, b, i))
        for b, row in enumerate(rows):
            runtime.commit_draft(row, accepted[b])
            row.tokens.outputs += drafts[b][:accepted[b]] + [rng.randrange(vocab)]
    candidates = torch.tensor([[rng.randrange(vocab) for _ in range(4)] for _ in rows])
    values = runtime.score(rows, candidates)
    for b, row in enumerate(rows):
        _assert_reference_values(runtime, refs, values[b], row.tokens.prompt + row.tokens.outputs, candidates[b].tolist(),
                                 row.head_ids, (b,))
