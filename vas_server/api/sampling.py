"""One request -> the engine jobs that answer it: one per (prompt, choice), each with its own
SamplingParams. Completions and chat both build their jobs here.

Why the server fans out `n` itself instead of passing `n` to vLLM: vLLM copies one
SamplingParams into all `n` children, so they would share the VAS request key the processor
keeps its per-request state under. One engine request per choice keeps keys unique. Seeds follow
vLLM's own rule for `n` children: choice i samples with `seed + i`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from vas_server.api.errors import bad_request
from vas_server.api.schemas import GenerationRequest, VASApplied
from vas_server.params import EXTRA_ARGS_KEY, VASParamError, VASRequest, make_extra_args, parse_request


@dataclass
class EngineJob:
    index: int  # the choice's index in the response
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams


def parse_vas(request: GenerationRequest, known_heads: Mapping[str, Any]) -> VASRequest | None:
    """The request's steering, validated; None when it asks for none (no non-zero weight)."""
    if request.vas_weights is None and request.vas_top_k is None and request.vas_restrict_to_top_k is None:
        return None
    raw = {EXTRA_ARGS_KEY: {"weights": request.vas_weights, "top_k": request.vas_top_k,
                            "restrict_to_top_k": request.vas_restrict_to_top_k}}
    try:
        vas = parse_request(raw, known_heads)
    except VASParamError as e:
        weights = request.vas_weights
        unknown = isinstance(weights, Mapping) and any(name not in known_heads for name in weights)
        code = "unknown_head" if unknown else "invalid_value"
        raise bad_request(str(e), e.param, code=code) from e
    return vas if vas is not None and vas.active else None


def vas_applied(vas: VASRequest | None, default_top_k: int) -> VASApplied | None:
    if vas is None:
        return None
    return VASApplied(weights=dict(vas.weights), top_k=vas.top_k or default_top_k,
                      restrict_to_top_k=vas.restrict_to_top_k)


def _logit_bias(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if raw is None:
        return None
    out = {}
    for key, bias in raw.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        if not 0 <= token < vocab_size or not -100 <= bias <= 100:
            raise bad_request(f"logit_bias[{key}] needs a token id in 0..{vocab_size - 1} and a bias in "
                              "-100..100", "logit_bias")
        out[token] = bias
    return out


def build_jobs(request: GenerationRequest, prompts: list[list[int]], max_tokens: list[int], *,
               logprobs: int | None, vas: VASRequest | None, vocab_size: int, request_id: str) -> list[EngineJob]:
    """Engine jobs in response order: prompt-major, then choice (OpenAI's index order)."""
    common: dict[str, Any] = dict(
        stop=request.stop,
        logprobs=logprobs,
        logit_bias=_logit_bias(request.logit_bias, vocab_size),
        output_kind=RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY,
    )
    # Unset OpenAI fields keep vLLM's defaults, which are OpenAI's defaults.
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = getattr(request, name)
        if value is not None:
            common[name] = value
    jobs = []
    for prompt_index, (ids, limit) in enumerate(zip(prompts, max_tokens)):
        for choice in range(request.n):
            index = prompt_index * request.n + choice
            extra_args = None
            if vas is not None:
                extra_args = make_extra_args(vas.weights, vas.top_k, vas.restrict_to_top_k,
                                             key=f"{request_id}-{index}")
            seed = None if request.seed is None else request.seed + choice
            try:
                params = SamplingParams(max_tokens=limit, seed=seed, extra_args=extra_args, **common)
            except ValueError as e:  # vLLM's own checks (e.g. an empty stop string)
                raise bad_request(str(e), getattr(e, "parameter", None)) from e
            jobs.append(EngineJob(index, prompt_index, ids, params))
    return jobs
