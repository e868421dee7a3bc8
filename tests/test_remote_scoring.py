"""The remote token loops' shared value runtime (vas_server.remote.scoring), on the tiny models:
loops ready together are scored in one batch, with the values each would get alone; a cancelled
loop never reaches a batch; a slot is not reused while a batch reads it; slots are waited for."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch

from vas_server.core.model import load_value_model
from vas_server.core.scorer import TokenLists, ValueRow
from vas_server.core.value_runtime import ValueRuntime
from vas_server.remote.scoring import BatchedScorer


@pytest.fixture
def make_runtime(tiny_base, value_models):
    models = [load_value_model(value_models[n], tiny_base, name=n) for n in ("prefix", "alone")]
    return lambda max_requests=8: ValueRuntime(models, max_requests, 128, "cpu", torch.float32)


def _requests(runtime: ValueRuntime, count: int, seed: int = 0):
    rng = random.Random(seed)
    vocab = runtime.scorers[0].trunk.config.vocab_size
    head_ids = frozenset(range(len(runtime.head_names)))
    prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(2, 12))] for _ in range(count)]
    candidates = [[rng.randrange(vocab) for _ in range(k)] for k in rng.choices([3, 5, 8], k=count)]
    return prompts, candidates, head_ids


def test_loops_ready_together_are_one_batch_with_the_values_each_gets_alone(make_runtime):
    runtime, alone = make_runtime(), make_runtime()
    prompts, candidates, head_ids = _requests(runtime, 5)
    scorer = BatchedScorer(runtime)

    async def loops():
        rows = [ValueRow(await scorer.allocate(), head_ids, TokenLists(p)) for p in prompts]
        return await asyncio.gather(*(scorer.values(r, c) for r, c in zip(rows, candidates)))

    batched = asyncio.run(loops())
    assert (scorer.batches, scorer.rows) == (1, 5)
    for p, c, values in zip(prompts, candidates, batched):
        want = alone.score([ValueRow(alone.allocate(), head_ids, TokenLists(p))], torch.tensor([c]))[0]
        assert values.shape == (len(runtime.head_names), len(c))
        torch.testing.assert_close(values, want, atol=1e-4, rtol=0)


class BlockingRuntime:
    """The runtime, its score() held until `go` is set (so a test can act while a batch runs)."""

    def __init__(self, runtime: ValueRuntime):
        self.runtime, self.go, self.scored = runtime, threading.Event(), []

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def score(self, rows, candidates):
        self.scored.append([r.cache_slot for r in rows])
        assert self.go.wait(30)
        return self.runtime.score(rows, candidates)


def test_a_cancelled_loop_is_not_scored_and_a_slot_waits_for_the_running_batch(make_runtime):
    runtime = BlockingRuntime(make_runtime(max_requests=2))
    prompts, candidates, head_ids = _requests(runtime.runtime, 3)
    scorer = BatchedScorer(runtime)

    async def scenario():
        a = ValueRow(await scorer.allocate(), head_ids, TokenLists(prompts[0]))
        b = ValueRow(await scorer.allocate(), head_ids, TokenLists(prompts[1]))
        first = asyncio.create_task(scorer.values(a, candidates[0]))
        await asyncio.sleep(0.2)  # the batch [a] is running, held
        cancelled = asyncio.create_task(scorer.values(b, candidates[1]))
        await asyncio.sleep(0)
        cancelled.cancel()  # b's loop ends while queued: b must never be scored...
        scorer.release(b.cache_slot)  # ...and its slot, given back while [a] runs, is not free until [a] ends
        waiting = asyncio.create_task(scorer.allocate())
        await asyncio.sleep(0.2)
        assert not waiting.done() and b.cache_slot not in runtime.free_cache_slots
        runtime.go.set()
        await first
        assert await asyncio.wait_for(waiting, 10) == b.cache_slot
        await asyncio.sleep(0.3)  # time for a batch with b to start, were b queued
        return a.cache_slot

    a_slot = asyncio.run(scenario())
    assert runtime.scored == [[a_slot]] and (scorer.batches, scorer.rows) == (1, 1)


def test_rows_advanced_before_scoring_get_the_values_of_scoring_alone(make_runtime):
    """The loops' pattern: advance (the chosen token; the prompt at first) without waiting, then
    score; over three steps, each row's values equal those of a runtime that only scores."""
    runtime, alone = make_runtime(), make_runtime()
    prompts, candidates, head_ids = _requests(runtime, 3, seed=1)
    scorer = BatchedScorer(runtime)

    async def steps():
        rows = [ValueRow(await scorer.allocate(), head_ids, TokenLists(p)) for p in prompts]
        twins = [ValueRow(alone.allocate(), head_ids, TokenLists(p, r.tokens.outputs)) for p, r in zip(prompts, rows)]
        for step in range(3):
            advanced = [scorer.advance(r) for r in rows]
            got = await asyncio.gather(*(scorer.values(r, c) for r, c in zip(rows, candidates)))
            assert all(a.done() for a in advanced)
            width = max(map(len, candidates))
            want = alone.score(twins, torch.tensor([c + c[:1] * (width - len(c)) for c in candidates]))
            for b, (g, c) in enumerate(zip(got, candidates)):
                torch.testing.assert_close(g, want[b, :, :len(c)], atol=1e-4, rtol=0)
            for r, c in zip(rows, candidates):
                r.tokens.outputs.append(c[step % len(c)])

    asyncio.run(steps())
