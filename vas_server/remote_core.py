"""VAS over a base that runs elsewhere, behind an OpenAI-compatible API (work in progress).

vLLM's `AsyncLLM` (tokenization, chat templates, detokenization, stop strings, `n`, streaming,
usage) runs here unchanged; only its engine core is replaced. `RemoteEngineCore` has the three
calls AsyncLLM's output handler makes (`add_request_async`, `get_output_async`,
`abort_requests_async`) and decodes each request with its own token loop:

  1. POST the upstream's /v1/completions with the context as token ids, `max_tokens` 1,
     `logprobs` K, `temperature` 1 and `return_tokens_as_token_ids`: the base's top-K candidates
     C and their raw log-probs.
  2. Score C with the local value runtime (the separate runtime: its own trunk and value cache).
  3. Steer with the VAS rule (vas_server.core.rule): l'(a) = log p0(a) + bonus(a) on C; tokens
     outside C keep the base's probabilities, whose total is the tail mass 1 - sum_C p0.
  4. Sample. Temperature 1: among C by p0 e^bonus, or the tail by its mass; a tail draw is a
     second call with `logit_bias` -100 on C, an exact draw from the base's tail.
     Temperature 0: the best steered candidate, unless the tail's best token (a second call,
     greedy, with C banned) has a higher base log-prob than every steered candidate.
  5. Hand the token to AsyncLLM as an EngineCoreOutput.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from types import SimpleNamespace

import httpx
import torch

from vllm.exceptions import GracefulHTTPError, VLLMValidationError
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, FinishReason

from vas_server.core import rule
from vas_server.config import VASConfig
from vas_server.core.value_runtime import ScoredRequest, ValueRuntime
from vas_server.params import VASRequest

BANNED = -100  # OpenAI's logit_bias minimum: the token is never drawn


class UpstreamError(RuntimeError):
    """The upstream failed: `status` is what the client gets (502 bad answer, 503 down, 504 slow)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Upstream:
    """The remote base: an OpenAI-compatible /v1/completions that takes token-id prompts."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 30.0

    def __post_init__(self):
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.client = httpx.AsyncClient(base_url=self.base_url.rstrip("/"), headers=headers, timeout=self.timeout_s)

    async def next_token_logprobs(self, context: list[int], k: int, *, temperature: float = 1.0,
                                  banned: list[int] = (), seed: int | None = None) -> tuple[int, list[tuple[int, float]]]:
        """One step: (the token the upstream drew, its top-k (token id, log-prob), best first)."""
        body = {"model": self.model, "prompt": context, "max_tokens": 1, "logprobs": k, "temperature": temperature,
                "return_tokens_as_token_ids": True}
        if banned:
            body["logit_bias"] = {str(t): BANNED for t in banned}
        if seed is not None:
            body["seed"] = seed
        try:
            response = await self.client.post("/completions", json=body)
        except httpx.TimeoutException:
            raise UpstreamError(504, f"upstream {self.base_url} did not answer within {self.timeout_s:g} s") from None
        except httpx.HTTPError as e:
            raise UpstreamError(503, f"upstream {self.base_url} unreachable: {e}") from None
        if response.status_code != 200:
            raise UpstreamError(502, f"upstream {self.base_url} answered {response.status_code}: {response.text[:500]}")
        try:
            logprobs = response.json()["choices"][0]["logprobs"]
            chosen = _token_id(logprobs["tokens"][0])
            top = sorted(((_token_id(t), float(lp)) for t, lp in logprobs["top_logprobs"][0].items()),
                         key=lambda pair: -pair[1])
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise UpstreamError(502, f"upstream {self.base_url} answered without token log-probs ({e!r})") from None
        if len(top) < k:
            raise UpstreamError(502, f"upstream {self.base_url} gave {len(top)} log-probs, {k} asked (a vLLM upstream "
                                     f"needs --max-logprobs >= {k})")
        # vLLM adds the drawn token's log-prob when it is not among the top k: the candidates are the k best.
        return chosen, top[:k]


# A probe with words, digits, punctuation, whitespace runs and non-ASCII text, so that tokenizers
# that differ anywhere in their vocabulary or pre-tokenization give different ids.
TOKENIZER_PROBE = "Value-augmented sampling, 2024: naïve café — 3.14159 tokens!\n\t  ¿Qué? 東京 🙂"


async def check_tokenizer(upstream: Upstream, tokenizer) -> None:
    """The upstream tokenizes a probe string as `tokenizer` does (vLLM's /tokenize): ValueError
    naming the difference, or that the upstream cannot say."""
    root = upstream.base_url.rstrip("/").removesuffix("/v1")
    try:
        response = await upstream.client.post(f"{root}/tokenize", json={
            "model": upstream.model, "prompt": TOKENIZER_PROBE, "add_special_tokens": False})
        theirs = response.json()["tokens"] if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot check the upstream's tokenizer at {root}/tokenize: {e}") from None
    if theirs is None:
        raise ValueError(f"the upstream has no usable {root}/tokenize (answered {response.status_code}); if its "
                         "tokenizer is MODEL's, pass --remote-skip-tokenizer-check")
    ours = tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
    if theirs != ours:
        first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        raise ValueError(f"the upstream's tokenizer differs from MODEL's: a probe string gives {len(theirs)} "
                         f"tokens there and {len(ours)} here, first different at token {first}; serve MODEL as "
                         "a local copy of the upstream's model")


def _token_id(token: str) -> int:
    """`token_id:123` (vLLM's return_tokens_as_token_ids) -> 123."""
    if not token.startswith("token_id:"):
        raise ValueError(f"not a token id: {token!r} (the upstream must honour return_tokens_as_token_ids)")
    return int(token.removeprefix("token_id:"))


class RemoteEngineCore:
    """The engine core AsyncLLM talks to, decoding every request against `upstream`."""

    def __init__(self, upstream: Upstream, runtime: ValueRuntime, config: VASConfig, eos_token_id: int | None):
        self.upstream = upstream
        self.runtime = runtime
        self.config = config
        self.heads = config.read_heads()
        self.eos_token_id = eos_token_id
        self.outputs: asyncio.Queue[EngineCoreOutput] = asyncio.Queue()
        # fail(request_id, error): end one request with `error` as its answer (set by
        # vas_server.remote once AsyncLLM exists: it reaches AsyncLLM's per-request queues).
        self.fail: Callable[[str, Exception], None] | None = None
        self.loops: dict[str, asyncio.Task] = {}
        self.engine_ranks_managed = [0]
        # What AsyncLLM reads of an engine core's state (`errored`: resources.engine_dead).
        self.resources = SimpleNamespace(engine_dead=False)

    async def get_supported_tasks_async(self) -> tuple[str, ...]:
        return ("generate",)

    async def add_request_async(self, request: EngineCoreRequest) -> None:
        steering = VASRequest.decode(request.sampling_params.extra_args) or VASRequest({})
        problem = unsupported(request.sampling_params, steering.restrict_to_top_k)
        if problem:
            raise VLLMValidationError(f"remote-base mode: {problem}")
        self.loops[request.request_id] = asyncio.get_running_loop().create_task(self._decode(request, steering))

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            task = self.loops.pop(request_id, None)
            if task is not None:
                task.cancel()

    async def get_output_async(self) -> EngineCoreOutputs:
        outputs = [await self.outputs.get()]
        while not self.outputs.empty():
            outputs.append(self.outputs.get_nowait())
        return EngineCoreOutputs(outputs=outputs)

    def shutdown(self, timeout: float | None = None) -> None:
        for task in self.loops.values():
            task.cancel()

    async def _decode(self, request: EngineCoreRequest, steering: VASRequest) -> None:
        params = request.sampling_params
        weights, restrict = steering.weights, steering.restrict_to_top_k
        top_k = self.config.top_k_for(steering, self.heads)  # unsteered too: the candidates of an exact draw
        stop_ids = set(params.all_stop_token_ids or ()) | (
            {self.eos_token_id} if self.eos_token_id is not None and not params.ignore_eos else set())
        generator = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed() % 2**31)
        heads = frozenset(self.runtime.head_index[name] for name in weights)
        slot = self.runtime.allocate() if heads and self.runtime.needs_slot(heads) else None
        row = ScoredRequest(slot, list(request.prompt_token_ids), [], heads)
        weight_vector = rule.weight_vector(weights, self.runtime.head_index)[None]
        try:
            for step in range(params.max_tokens):
                token = await self._next_token(row, weight_vector, heads, top_k, restrict, params, generator)
                row.outputs.append(token)
                finished = None
                if token in stop_ids and len(row.outputs) > params.min_tokens:
                    finished = FinishReason.STOP
                elif step + 1 == params.max_tokens:
                    finished = FinishReason.LENGTH
                stop_reason = token if finished == FinishReason.STOP and token != self.eos_token_id else None
                self.outputs.put_nowait(EngineCoreOutput(request.request_id, [token], finish_reason=finished,
                                                         stop_reason=stop_reason))
                if finished is not None:
                    return
        except UpstreamError as e:
            # The client gets the upstream's failure as its status (502/503/504) and message.
            self.fail(request.request_id, GracefulHTTPError(str(e), HTTPStatus(e.status)))
        finally:
            self.loops.pop(request.request_id, None)
            self.runtime.release(slot)

    async def _next_token(self, row: ScoredRequest, weight_vector: torch.Tensor, heads: frozenset[int],
                          top_k: int, restrict: bool, params, generator: torch.Generator) -> int:
        context = row.prompt + row.outputs
        greedy = params.temperature == 0
        _, top = await self.upstream.next_token_logprobs(context, top_k, seed=_step_seed(generator))
        candidates = torch.tensor([[t for t, _ in top]])
        base = torch.tensor([[lp for _, lp in top]], dtype=torch.float64)
        steered = base.clone()
        if heads:
            values = self.runtime.score([row], candidates)
            valid = torch.ones_like(candidates, dtype=torch.bool)
            steered += rule.bonus(values, weight_vector, valid).double()
        tail_mass = max(0.0, 1.0 - float(base.exp().sum()))
        if greedy:
            best = int(steered.argmax())
            if restrict or tail_mass <= 0 or float(steered[0, best]) >= float(base.min()):
                return int(candidates[0, best])
            tail_token, tail_top = await self.upstream.next_token_logprobs(
                context, 1, temperature=0, banned=candidates[0].tolist())
            return tail_token if tail_top and tail_top[0][1] > float(steered[0, best]) else int(candidates[0, best])
        # At temperature T the candidates weigh exp(l'/T); only T = 1 knows the tail's weight
        # (`unsupported` refuses other temperatures unless the tail is excluded).
        candidate_weights = (steered[0] / params.temperature).exp()
        weights = torch.cat([candidate_weights, torch.tensor([0.0 if restrict else tail_mass], dtype=torch.float64)])
        choice = int(torch.multinomial(weights / weights.sum(), 1, generator=generator))
        if choice < candidates.shape[1]:
            return int(candidates[0, choice])
        tail_token, _ = await self.upstream.next_token_logprobs(context, 1, temperature=1.0,
                                                                banned=candidates[0].tolist(),
                                                                seed=_step_seed(generator))
        return tail_token


def unsupported(params, restrict: bool) -> str | None:
    """Why the remote token loop cannot serve these sampling parameters exactly; None if it can.
    The upstream gives the base's top-K log-probs at temperature 1, so the tail's weight is known
    at temperature 1 only; vLLM's other sampling controls are not applied by the loop yet."""
    if params.temperature not in (0.0, 1.0) and not restrict:
        return ("temperature must be 0 or 1 (the upstream's top-K log-probs give the rest of the vocabulary's "
                "weight at temperature 1 only), or set vas_restrict_to_top_k")
    if params.top_p < 1 or params.top_k not in (0, -1, None) or params.min_p > 0:
        return "top_p, top_k and min_p are not supported yet"
    if (params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1
            or params.logit_bias or params.allowed_token_ids or params.bad_words):
        return "penalties, logit_bias, allowed_token_ids and bad_words are not supported yet"
    if params.logprobs is not None or params.prompt_logprobs is not None:
        return "logprobs are not supported yet"
    return None


def _step_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
