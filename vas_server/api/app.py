"""The FastAPI app: vLLM's AsyncLLM embedded in-process, started and stopped with the app."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from vas_server import __version__
from vas_server.api.auth import require_api_key
from vas_server.api.chat import ChatCompletions
from vas_server.api.completions import Completions
from vas_server.api.errors import install_error_handlers
from vas_server.api.metrics import CONTENT_TYPE, Metrics, route_label
from vas_server.api.schemas import (ChatCompletionRequest, CompletionRequest, ErrorResponse, HeadCard, ModelCard,
                                    ModelList)
from vas_server.api.serving import serve
from vas_server.api.state import ServerConfig, ServerState

logger = logging.getLogger(__name__)

WORKER_STATS_TIMEOUT_S = 5.0
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404)}


def start_engine(config: ServerConfig):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from vas_server.engine import engine_kwargs

    kwargs = engine_kwargs(config.model, config.vas, **config.engine_overrides)
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))


async def worker_stats(state: ServerState) -> dict | None:
    """The VAS processor's counters from the engine's worker; None without VAS or on failure
    (a scrape must not fail because the engine is busy or has no processor)."""
    if state.config.vas is None:
        return None
    try:
        # One entry per worker; every tensor-parallel rank runs the same processor, rank 0 speaks.
        results = await asyncio.wait_for(state.engine.collective_rpc("vas_stats"), WORKER_STATS_TIMEOUT_S)
        return results[0] if results else None
    except Exception as e:
        logger.warning("could not read VAS worker stats: %r", e)
        return None


def model_list(state: ServerState) -> ModelList:
    base = ModelCard(id=state.config.served_model_name, created=state.started_at, root=state.config.model,
                     max_model_len=state.max_model_len)
    heads = [ModelCard(id=name, created=state.started_at, root=head.path,
                       vas_head=HeadCard(kind=head.spec.kind, description=head.spec.description,
                                         value_model=head.value_model, trunk=asdict(head.trunk),
                                         reward_mean=head.spec.reward_mean, reward_std=head.spec.reward_std,
                                         num_training_samples=head.spec.num_training_samples))
             for name, head in sorted(state.heads.items())]
    return ModelList(data=[base, *heads])


def record_error(request: Request, status: int) -> None:
    state = getattr(request.app.state, "server", None)
    if state is not None:
        state.metrics.responses.labels(route_label(request), str(status)).inc()


def create_app(config: ServerConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        heads = config.heads()  # reads vas.json only; fails before the engine starts on a bad directory
        engine = start_engine(config)
        try:
            app.state.server = ServerState(
                config=config, engine=engine, tokenizer=engine.get_tokenizer(), heads=heads,
                max_model_len=engine.model_config.max_model_len,
                metrics=Metrics(engine.get_num_unfinished_requests), started_at=int(time.time()))
            yield
        finally:
            # Uvicorn has already stopped accepting and drained (or cancelled) open requests.
            engine.shutdown()

    app = FastAPI(title="vas-server", version=__version__, lifespan=lifespan)
    app.state.config = config
    install_error_handlers(app, record_error)
    completions, chat = Completions(), ChatCompletions()

    def state_of(request: Request) -> ServerState:
        return request.app.state.server

    authorized = [Depends(require_api_key)]

    @app.post("/v1/completions", dependencies=authorized, responses=ERROR_RESPONSES)
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await serve(completions, body, request, state_of(request))

    @app.post("/v1/chat/completions", dependencies=authorized, responses=ERROR_RESPONSES)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await serve(chat, body, request, state_of(request))

    @app.get("/v1/models", dependencies=authorized, response_model=ModelList)
    async def list_models(request: Request) -> ModelList:
        return model_list(state_of(request))

    @app.get("/health")
    async def health(request: Request) -> Response:
        state = state_of(request)
        try:
            await state.engine.check_health()
        except Exception as e:
            return JSONResponse({"status": "unhealthy", "error": str(e)}, status_code=503)
        return JSONResponse({"status": "ok", "model": state.config.served_model_name})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        state = state_of(request)
        return Response(state.metrics.render(await worker_stats(state)), media_type=CONTENT_TYPE)

    return app
