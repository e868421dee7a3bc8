"""The value runtime shared by every remote token loop, working in batches.

A loop asks for two kinds of work: `advance` (feed the token it just chose to its value trunks;
it asks right after choosing, and the work overlaps its next upstream call) and `values` (score
its next candidates, once the upstream returned them). Work asked in the same event-loop turn,
or while a batch is running, forms the next batch: one `ValueRuntime.advance` for all its
advances, then one `ValueRuntime.score` for all its candidates (one trunk forward per value model
each), as the in-process processor does for one engine step. A drafting loop asks for a third
kind, `draft_values` (its round's drafted positions; the batch's drafted rows are scored
together, one ValueRuntime.score_drafts forward per value model, after the batch's scoring), and
its next `advance` first commits the accepted drafted tokens. A row's advance always precedes its
values: it is asked first, and batches run one at a time, in order. The batch runs in a worker
thread, so the event loop keeps serving HTTP and upstream calls meanwhile (torch releases the GIL).

Invariant: a value-cache slot is only released while no batch is running (`release` defers it
otherwise), and its queued work is dropped when it is released, so a slot is never fed or read
for a request that has ended.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from vas_server.core.device import to_device
from vas_server.core.scorer import ValueRow
from vas_server.core.value_runtime import ValueRuntime


@dataclass(eq=False)
class Work:
    row: ValueRow
    candidates: list[int] | list[list[int]] | None  # None: advance the row; else score these candidates
    done: asyncio.Future
    draft: list[int] | None = None  # drafted tokens: candidates are then one list per drafted position
    commit: int | None = None  # advance: first commit this many drafted tokens of the last draft


class BatchedScorer:
    def __init__(self, runtime: ValueRuntime):
        self.runtime = runtime
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="vas-values")
        self.pending: list[Work] = []
        self.drainer: asyncio.Task | None = None
        self.running = False  # a batch is running in the worker thread
        self.deferred_releases: list[int] = []
        self.free_cache_slots = asyncio.Semaphore(runtime.max_requests)
        self.batches = 0  # batches with candidates to score, and their rows (the benchmark reports both)
        self.rows = 0

    def advance(self, row: ValueRow, commit: int | None = None) -> asyncio.Future:
        """Feed `row`'s newly committed tokens to its value trunks; done when fed. `commit`: the
        row's last draft had that many tokens accepted, committed first (ValueRuntime.commit_draft)."""
        return self._ask(row, None, commit=commit)

    async def draft_values(self, row: ValueRow, draft: list[int], candidates: list[list[int]]) -> torch.Tensor:
        """The values of each drafted position's candidates, `draft` being the drafted tokens
        before the last (ValueRuntime.score_drafts): [n, n_heads, K_max], K_max the longest list."""
        return await self._ask(row, candidates, draft=draft)

    async def values(self, row: ValueRow, candidates: list[int]) -> torch.Tensor:
        """The values q_h(a) of `row`'s candidates: [n_heads, len(candidates)], float32, on the host."""
        return await self._ask(row, candidates)

    def _ask(self, row: ValueRow, candidates, draft: list[int] | None = None,
             commit: int | None = None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        work = Work(row, candidates, loop.create_future(), draft, commit)
        self.pending.append(work)
        if self.drainer is None:
            self.drainer = loop.create_task(self._drain())
        return work.done

    async def allocate(self) -> int:
        """A value-cache slot for a new request, once one is free (the runtime has max_requests)."""
        await self.free_cache_slots.acquire()
        return self.runtime.allocate()  # never None: the semaphore counts the free slots

    def release(self, cache_slot: int | None) -> None:
        """Give `cache_slot` back, dropping its queued work, once no batch is reading it."""
        if cache_slot is None:
            return
        for work in self.pending:
            if work.row.cache_slot == cache_slot:
                work.done.cancel()
        if self.running:
            self.deferred_releases.append(cache_slot)
        else:
            self._release(cache_slot)

    def _release(self, cache_slot: int) -> None:
        self.runtime.release(cache_slot)
        self.free_cache_slots.release()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                await asyncio.sleep(0)  # loops made ready in this turn join the batch
                batch = [work for work in self.pending if not work.done.done()]  # ended loops drop out
                self.pending = []
                if not batch:
                    continue
                advancing = [work for work in batch if work.candidates is None]
                scored = [work for work in batch if work.candidates is not None and work.draft is None]
                drafted = [work for work in batch if work.draft is not None]
                self.running = True
                try:
                    values, draft_values = await loop.run_in_executor(self.executor, self._run, advancing, scored,
                                                                      drafted)
                except Exception as e:  # the loops end with it; the next batch may still succeed
                    results, error = None, e
                else:
                    results, error = ([None] * len(advancing) + [values[b, :, :len(work.candidates)]
                                                                 for b, work in enumerate(scored)]
                                      + draft_values), None
                finally:
                    self.running = False
                    for cache_slot in self.deferred_releases:
                        self._release(cache_slot)
                    self.deferred_releases.clear()
                self.batches += bool(scored or drafted)
                self.rows += len(scored) + len(drafted)
                for b, work in enumerate(advancing + scored + drafted):
                    if work.done.done():  # its loop ended meanwhile
                        continue
                    if error is not None:
                        work.done.set_exception(error)
                    else:
                        work.done.set_result(results[b])
        finally:
            self.drainer = None

    def _run(self, advancing: list[Work], scored: list[Work], drafted: list[Work]):
        """Advance the advancing rows (committing their accepted drafted tokens first), then score
        the candidates of the scored ones: [B, n_heads, K_max] on the host, rows with fewer
        candidates padded with their first (None if none); then the drafted rows' positions, in
        one forward per value model: a list of [n, n_heads, K_max]."""
        for work in advancing:
            if work.commit is not None:
                self.runtime.commit_draft(work.row, work.commit)
        if advancing:
            self.runtime.advance([work.row for work in advancing])
        values = None
        if scored:
            values = self.runtime.score([work.row for work in scored],
                                        to_device(_padded(work.candidates for work in scored), self.runtime.device)).cpu()
        draft_values = []
        if drafted:
            draft_values = [v.cpu() for v in self.runtime.score_drafts(
                [work.row for work in drafted], [work.draft for work in drafted],
                [to_device(_padded(work.candidates), self.runtime.device) for work in drafted])]
        return values, draft_values

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _padded(lists) -> torch.Tensor:
    """Candidate lists as one [B, K_max] tensor, shorter lists padded with their first."""
    lists = list(lists)
    width = max(len(c) for c in lists)
    return torch.tensor([c + c[:1] * (width - len(c)) for c in lists])
