"""The one request path shared by /v1/completions and /v1/chat/completions.

validate (model, prompt, VAS, sampling) -> engine jobs -> either one JSON response or an SSE
stream. What differs between the two endpoints (how prompts are read, how choices and chunks
look) is behind the `Endpoint` interface that `completions.py` and `chat.py` implement.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from vllm.exceptions import VLLMClientError
from vllm.outputs import CompletionOutput
from vllm.v1.engine.exceptions import EngineDeadError

from vas_server.api.errors import APIError
from vas_server.api.metrics import route_label
from vas_server.api.prompts import max_tokens_for
from vas_server.api.runner import (ClientDisconnected, DisconnectAwareStreamingResponse, final_outputs,
                                   run_unless_disconnected, stream_outputs)
from vas_server.api.sampling import EngineJob, build_jobs, parse_vas, vas_applied
from vas_server.api.schemas import ErrorResponse, GenerationRequest, Usage, VASApplied
from vas_server.api.state import ServerState

logger = logging.getLogger(__name__)


@dataclass
class ResponseContext:
    """What every response (or chunk) of one request repeats."""

    id: str
    created: int
    model: str
    vas: VASApplied | None
    logprobs: int | None  # top-logprobs count, None when not requested
    prompt_tokens: int
    include_usage: bool
    text_offsets: dict[int, int] = field(default_factory=dict)  # completions logprobs, per choice


class Endpoint(ABC):
    name: str
    id_prefix: str
    prompt_param: str
    max_tokens_param: str
    default_max_tokens: int | None  # None: the rest of the context

    @abstractmethod
    async def prompts(self, request: GenerationRequest, state: ServerState) -> list[list[int]]: ...

    @abstractmethod
    def requested_max_tokens(self, request: GenerationRequest) -> int | None: ...

    @abstractmethod
    def logprobs(self, request: GenerationRequest) -> int | None: ...

    @abstractmethod
    def response(self, ctx: ResponseContext, jobs: Sequence[EngineJob], outputs: Sequence[CompletionOutput],
                 usage: Usage) -> BaseModel: ...

    def stream_start(self, ctx: ResponseContext, jobs: Sequence[EngineJob]) -> list[BaseModel]:
        return []

    @abstractmethod
    def chunk(self, ctx: ResponseContext, job: EngineJob, delta: CompletionOutput) -> BaseModel: ...

    @abstractmethod
    def usage_chunk(self, ctx: ResponseContext, usage: Usage) -> BaseModel: ...


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def _engine_error(e: Exception) -> APIError:
    if isinstance(e, VLLMClientError):  # the engine's own request validation
        return APIError(400, str(e), param=getattr(e, "parameter", None), code="invalid_value")
    if isinstance(e, EngineDeadError):
        return APIError(503, "The engine has stopped; the server must be restarted.", type="server_error")
    logger.error("generation failed: %r", e)
    return APIError(500, f"Generation failed: {type(e).__name__}", type="server_error")


async def serve(endpoint: Endpoint, request: GenerationRequest, http: Request, state: ServerState) -> Response:
    if request.model != state.config.served_model_name:
        raise APIError(404, f"The model {request.model!r} does not exist. This server serves "
                       f"{state.config.served_model_name!r}; value heads are not models but are "
                       "selected with vas_weights.", param="model", code="model_not_found")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
    vas = parse_vas(request, state.heads)
    prompts = await endpoint.prompts(request, state)
    limits = [max_tokens_for(len(ids), endpoint.requested_max_tokens(request), endpoint.default_max_tokens,
                             state.max_model_len, endpoint.prompt_param, endpoint.max_tokens_param)
              for ids in prompts]
    request_id = f"{endpoint.id_prefix}-{uuid.uuid4().hex}"
    logprobs = endpoint.logprobs(request)
    jobs = build_jobs(request, prompts, limits, logprobs=logprobs, vas=vas,
                      vocab_size=state.engine.model_config.get_vocab_size(), request_id=request_id)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    ctx = ResponseContext(id=request_id, created=int(time.time()), model=state.config.served_model_name,
                          vas=vas_applied(vas, state.config.default_top_k), logprobs=logprobs,
                          prompt_tokens=sum(len(ids) for ids in prompts), include_usage=include_usage)

    metrics = state.metrics
    metrics.requests.labels(endpoint.name).inc()
    if vas is not None:
        metrics.vas_requests.labels(endpoint.name).inc()
    metrics.prompt_tokens.inc(ctx.prompt_tokens)
    logger.debug("%s: %d job(s), user=%r, vas=%s", request_id, len(jobs), request.user, ctx.vas)

    if request.stream:
        metrics.responses.labels(route_label(http), "200").inc()
        return DisconnectAwareStreamingResponse(_sse(endpoint, ctx, jobs, state), media_type="text/event-stream")

    metrics.in_flight.inc()
    try:
        outputs = await run_unless_disconnected(http.receive, final_outputs(state.engine, jobs, request_id))
    except ClientDisconnected:
        logger.info("%s: client disconnected; engine requests aborted", request_id)
        return Response(status_code=499)  # never delivered: the client is gone
    except Exception as e:
        raise _engine_error(e) from e
    finally:
        metrics.in_flight.dec()
    completion_tokens = sum(len(o.token_ids) for o in outputs)
    metrics.completion_tokens.inc(completion_tokens)
    metrics.responses.labels(route_label(http), "200").inc()
    response = endpoint.response(ctx, jobs, outputs, _usage(ctx.prompt_tokens, completion_tokens))
    return JSONResponse(response.model_dump(mode="json"))


def _event(payload: BaseModel) -> str:
    data = payload.model_dump(mode="json")
    if "usage" in data and data["usage"] is None:
        # Only the last chunk carries usage (when asked for); the others omit the key, which
        # clients read as null and which the spec's non-nullable completions usage allows.
        del data["usage"]
    return f"data: {json.dumps(data)}\n\n"


async def _sse(endpoint: Endpoint, ctx: ResponseContext, jobs: list[EngineJob], state: ServerState
               ) -> AsyncIterator[str]:
    metrics = state.metrics
    completion_tokens = 0
    metrics.in_flight.inc()
    try:
        for chunk in endpoint.stream_start(ctx, jobs):
            yield _event(chunk)
        async for job, delta in stream_outputs(state.engine, jobs, ctx.id):
            completion_tokens += len(delta.token_ids)
            yield _event(endpoint.chunk(ctx, job, delta))
        if ctx.include_usage:
            yield _event(endpoint.usage_chunk(ctx, _usage(ctx.prompt_tokens, completion_tokens)))
    except Exception as e:  # headers are sent: report in the stream, as OpenAI does
        error = _engine_error(e)
        yield _event(ErrorResponse(error=error.detail))
    finally:
        metrics.in_flight.dec()
        metrics.completion_tokens.inc(completion_tokens)
    yield "data: [DONE]\n\n"
