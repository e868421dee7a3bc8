"""POST /v1/chat/completions: messages in, an assistant message out (the `Endpoint` for the
shared request path)."""

from __future__ import annotations

from typing import Sequence

from vllm.outputs import CompletionOutput

from vas_server.api.errors import bad_request
from vas_server.api.logprobs import chat_logprobs
from vas_server.api.prompts import chat_prompt
from vas_server.api.sampling import EngineJob
from vas_server.api.schemas import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                                    ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatResponseMessage, Usage)
from vas_server.api.serving import Endpoint, ResponseContext
from vas_server.api.state import ServerState


class ChatCompletions(Endpoint):
    name = "chat"
    id_prefix = "chatcmpl"
    prompt_param = "messages"
    max_tokens_param = "max_completion_tokens"
    default_max_tokens = None  # OpenAI's default here: as much as the context allows

    async def prompts(self, request: ChatCompletionRequest, state: ServerState) -> list[list[int]]:
        return [await chat_prompt(state.tokenizer, request.messages, state.engine.model_config.get_vocab_size())]

    def requested_max_tokens(self, request: ChatCompletionRequest) -> int | None:
        # `max_tokens` is the deprecated name of `max_completion_tokens`; the new one wins.
        return request.max_completion_tokens or request.max_tokens

    def logprobs(self, request: ChatCompletionRequest) -> int | None:
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        return (request.top_logprobs or 0) if request.logprobs else None

    def _logprobs(self, ctx: ResponseContext, output: CompletionOutput) -> ChatLogprobs | None:
        if ctx.logprobs is None or output.logprobs is None:
            return None
        return ChatLogprobs(content=chat_logprobs(output.token_ids, output.logprobs, ctx.logprobs))

    def response(self, ctx: ResponseContext, jobs: Sequence[EngineJob], outputs: Sequence[CompletionOutput],
                 usage: Usage) -> ChatCompletionResponse:
        choices = [ChatChoice(index=job.index, message=ChatResponseMessage(content=output.text),
                              logprobs=self._logprobs(ctx, output), finish_reason=output.finish_reason)
                   for job, output in zip(jobs, outputs)]
        return ChatCompletionResponse(id=ctx.id, created=ctx.created, model=ctx.model, choices=choices,
                                      usage=usage, vas=ctx.vas)

    def _chunk(self, ctx: ResponseContext, choices: list[ChatChunkChoice], usage: Usage | None = None
               ) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=ctx.id, created=ctx.created, model=ctx.model, choices=choices, usage=usage,
                                   vas=ctx.vas)

    def stream_start(self, ctx: ResponseContext, jobs: Sequence[EngineJob]) -> list[ChatCompletionChunk]:
        # OpenAI opens each choice with a chunk that carries only the role.
        return [self._chunk(ctx, [ChatChunkChoice(index=job.index, delta=ChatDelta(role="assistant", content=""))])
                for job in jobs]

    def chunk(self, ctx: ResponseContext, job: EngineJob, delta: CompletionOutput) -> ChatCompletionChunk:
        return self._chunk(ctx, [ChatChunkChoice(index=job.index, delta=ChatDelta(content=delta.text),
                                                 logprobs=self._logprobs(ctx, delta),
                                                 finish_reason=delta.finish_reason)])

    def usage_chunk(self, ctx: ResponseContext, usage: Usage) -> ChatCompletionChunk:
        return self._chunk(ctx, [], usage)
