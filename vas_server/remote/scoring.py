"""The value runtime shared by every remote token loop, scoring in batches.

Each request's loop asks for its candidates' values and waits. Requests that ask in the same
event-loop turn, or while a batch is being scored, are scored together in the next batch: one
value-runtime call (one trunk forward per value model) for all of them, as the in-process
processor does for one engine step. The batch runs in a worker thread, so the event loop keeps
serving HTTP and upstream calls meanwhile (torch releases the GIL).

Invariant: a value-cache slot is only released while no batch is running (`release` defers it
otherwise), and a row whose loop was cancelled is never put into a batch, so a slot is never
reused while a batch still reads it.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from vas_server.core.value_runtime import ScoredRequest, ValueRuntime, to_device


class BatchedScorer:
    def __init__(self, runtime: ValueRuntime):
        self.runtime = runtime
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="vas-values")
        self.pending: list[tuple[ScoredRequest, list[int], asyncio.Future]] = []
        self.drainer: asyncio.Task | None = None
        self.running = False  # a batch is being scored in the worker thread
        self.deferred_releases: list[int] = []
        self.free_slots = asyncio.Semaphore(runtime.max_requests)
        self.batches = 0  # batches scored, and rows in them (the benchmark reports rows per batch)
        self.rows = 0

    async def values(self, row: ScoredRequest, candidates: list[int]) -> torch.Tensor:
        """The values q_h(a) of `row`'s candidates: [n_heads, len(candidates)], float32, on the host."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((row, candidates, future))
        if self.drainer is None:
            self.drainer = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def allocate(self) -> int:
        """A value-cache slot for a new request, once one is free (the runtime has max_requests)."""
        await self.free_slots.acquire()
        return self.runtime.allocate()  # never None: the semaphore counts the free slots

    def release(self, slot: int | None) -> None:
        """Give `slot` back, once no batch is reading it."""
        if slot is None:
            return
        if self.running:
            self.deferred_releases.append(slot)
        else:
            self._release(slot)

    def _release(self, slot: int) -> None:
        self.runtime.release(slot)
        self.free_slots.release()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                await asyncio.sleep(0)  # loops made ready in this turn join the batch
                batch = [item for item in self.pending if not item[2].done()]  # cancelled loops drop out
                self.pending = []
                if not batch:
                    continue
                self.running = True
                try:
                    values = await loop.run_in_executor(self.executor, self._score, batch)
                except Exception as e:  # the loops end with it; the next batch may still succeed
                    values, error = None, e
                else:
                    error = None
                finally:
                    self.running = False
                    for slot in self.deferred_releases:
                        self._release(slot)
                    self.deferred_releases.clear()
                self.batches += 1
                self.rows += len(batch)
                for b, (_, candidates, future) in enumerate(batch):
                    if future.done():
                        continue
                    if error is not None:
                        future.set_exception(error)
                    else:
                        future.set_result(values[b, :, :len(candidates)])
        finally:
            self.drainer = None

    def _score(self, batch: list[tuple[ScoredRequest, list[int], asyncio.Future]]) -> torch.Tensor:
        """[B, n_heads, K_max] on the host; rows with fewer candidates are padded with their first."""
        width = max(len(c) for _, c, _ in batch)
        padded = torch.tensor([c + c[:1] * (width - len(c)) for _, c, _ in batch])
        values = self.runtime.score([row for row, _, _ in batch], to_device(padded, self.runtime.device))
        return values.cpu()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
