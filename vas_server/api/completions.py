"""POST /v1/completions: prompt in, text out (the `Endpoint` for the shared request path)."""

from __future__ import annotations

from typing import Sequence

from vllm.outputs import CompletionOutput

from vas_server.api.logprobs import completion_logprobs
from vas_server.api.prompts import completion_prompts
from vas_server.api.sampling import EngineJob
from vas_server.api.schemas import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from vas_server.api.serving import Endpoint, ResponseContext
from vas_server.api.state import ServerState


class Completions(Endpoint):
    name = "completions"
    id_prefix = "cmpl"
    prompt_param = "prompt"
    max_tokens_param = "max_tokens"
    default_max_tokens = 16  # OpenAI's default for this endpoint

    async def prompts(self, request: CompletionRequest, state: ServerState) -> list[list[int]]:
        return await completion_prompts(state.tokenizer, request, state.engine.model_config.get_vocab_size())

    def requested_max_tokens(self, request: CompletionRequest) -> int | None:
        return request.max_tokens

    def logprobs(self, request: CompletionRequest) -> int | None:
        return request.logprobs

    def _choice(self, ctx: ResponseContext, job: EngineJob, output: CompletionOutput) -> CompletionChoice:
        logprobs = None
        if ctx.logprobs is not None and output.logprobs is not None:
            offset = ctx.text_offsets.get(job.index, 0)
            logprobs, ctx.text_offsets[job.index] = completion_logprobs(
                output.token_ids, output.logprobs, ctx.logprobs, offset)
        return CompletionChoice(index=job.index, text=output.text, logprobs=logprobs,
                                finish_reason=output.finish_reason)

    def _response(self, ctx: ResponseContext, choices: list[CompletionChoice], usage: Usage | None
                  ) -> CompletionResponse:
        return CompletionResponse(id=ctx.id, created=ctx.created, model=ctx.model, choices=choices, usage=usage,
                                  vas=ctx.vas)

    def response(self, ctx: ResponseContext, jobs: Sequence[EngineJob], outputs: Sequence[CompletionOutput],
                 usage: Usage) -> CompletionResponse:
        return self._response(ctx, [self._choice(ctx, j, o) for j, o in zip(jobs, outputs)], usage)

    def chunk(self, ctx: ResponseContext, job: EngineJob, delta: CompletionOutput) -> CompletionResponse:
        return self._response(ctx, [self._choice(ctx, job, delta)], None)

    def usage_chunk(self, ctx: ResponseContext, usage: Usage) -> CompletionResponse:
        return self._response(ctx, [], usage)
