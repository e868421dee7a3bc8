"""Run engine jobs on vLLM's AsyncLLM and stop them when the client goes away.

Cancelling the task that iterates `AsyncLLM.generate()` is what aborts a request in the engine
(vLLM catches the CancelledError and aborts). Everything here therefore makes sure that a client
disconnect becomes a cancellation promptly, also while the request is still queued and no
bytes are being sent (which is when a plain StreamingResponse would not notice).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send
from vllm.outputs import CompletionOutput
from vllm.utils.async_utils import merge_async_iterators
from vllm.v1.engine.async_llm import AsyncLLM

from vas_server.api.sampling import EngineJob

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


async def wait_for_disconnect(receive: Receive) -> None:
    # The body has been read already, so the next message is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`; cancel it and raise ClientDisconnected if the client leaves first."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work_task.done():
            work_task.cancel()
            await asyncio.gather(work_task, return_exceptions=True)
            raise ClientDisconnected()
    return work_task.result()


class DisconnectAwareStreamingResponse(StreamingResponse):
    """A StreamingResponse that stops as soon as the client disconnects, and always closes its
    body iterator (so the generators under it abort their engine requests)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            try:
                await self.stream_response(send)
            except OSError:  # the client went away while we were writing
                pass

        try:
            await run_unless_disconnected(receive, stream())
        except ClientDisconnected:
            pass
        finally:
            await self.body_iterator.aclose()


async def stream_outputs(engine: AsyncLLM, jobs: list[EngineJob], request_id: str
                         ) -> AsyncIterator[tuple[EngineJob, CompletionOutput]]:
    """(job, output) as the engine produces them, all jobs interleaved."""
    generators = [engine.generate({"prompt_token_ids": job.prompt_ids}, job.params, f"{request_id}-{job.index}")
                  for job in jobs]
    async for i, result in merge_async_iterators(*generators):
        yield jobs[i], result.outputs[0]


async def final_outputs(engine: AsyncLLM, jobs: list[EngineJob], request_id: str) -> list[CompletionOutput]:
    """The finished output of every job, in job order."""
    finals: dict[int, CompletionOutput] = {}
    async for job, output in stream_outputs(engine, jobs, request_id):
        finals[job.index] = output
    return [finals[job.index] for job in jobs]
