"""The remote base behind one seam: the `Upstream` protocol, and `VLLMUpstream`, its implementation
for an OpenAI-compatible /v1/completions that takes token-id prompts (vLLM's).

The rest of remote mode sees only the protocol (next-token candidates with log-probs for a
prefix, an optional multi-token draft, the upstream's tokenizer if it offers one, reachability,
the calls made, closing). `VLLMUpstream.draw` asks for one token with its top-k log-probs and returns what the upstream drew;
`Upstream.draft` asks for n tokens in a row, with the top-k log-probs at each position. Failures become UpstreamError with the status the
client should get; those that a second try can cure (unreachable, slow, overloaded, a 5xx) are
retried with backoff, since a call has no side effects and its seed makes it repeatable.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import httpx

BANNED = -100  # OpenAI's logit_bias minimum: the token is never drawn
RETRY_BACKOFF_S = 0.25  # first pause before a retry; doubled each time


class UpstreamError(RuntimeError):
    """The upstream failed: `status` is what the client gets (502 bad answer, 503 down, 504 slow);
    `retryable` says whether another try may succeed."""

    def __init__(self, status: int, message: str, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


@dataclass(frozen=True)
class Draw:
    """One step of the base: the token the upstream drew, that token's raw (temperature 1) log-prob,
    and the k best tokens with their raw log-probs, best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@runtime_checkable
class Upstream(Protocol):
    """What remote mode needs of a base behind an API. Invariants every implementation keeps:
    log-probs are raw (temperature 1) whatever the draw's temperature; `top` lists exactly k
    (token id, log-prob) pairs, best first; `calls` counts every HTTP call made for `draw`/`draft`
    (tries included), never decreasing; failures are UpstreamError with the client's status."""

    base_url: str
    model: str

    @property
    def calls(self) -> int:
        """Upstream calls made so far (tries included): the benchmark's calls per token."""

    async def draw(self, context: list[int], k: int, *, temperature: float, banned: list[int] = (),
                   seed: int | None = None) -> Draw:
        """The base's next token after `context` at `temperature` (0: greedy), never one of
        `banned`, with the top-k raw log-probs."""

    async def draft(self, context: list[int], n: int, k: int, *, temperature: float, banned: list[int] = (),
                    seed: int | None = None, ignore_eos: bool = False) -> list[Draw]:
        """Up to n tokens drawn in a row after `context`, each with its position's top-k raw
        log-probs (at least one; an implementation without drafting returns one)."""

    async def tokenize(self, text: str) -> list[int] | None:
        """The upstream's token ids for `text` (no special tokens); None if it offers no tokenizer."""

    async def reachable(self) -> None:
        """Return if the upstream answers HTTP at all; httpx.HTTPError if not."""

    async def aclose(self) -> None:
        """Release the connections; no call is made after it."""


@dataclass
class VLLMUpstream:
    """An `Upstream` on vLLM's OpenAI server (token-id prompts, `return_tokens_as_token_ids`,
    `/tokenize`, `ignore_eos`): the address and what each call may take, `timeout_s` per try,
    `retries` more tries. Owns one httpx client, closed by `aclose`."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 30.0
    retries: int = 2

    def __post_init__(self):
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        # No connection cap: every request in flight has one call outstanding at most.
        self.client = httpx.AsyncClient(base_url=self.base_url.rstrip("/"), headers=headers, timeout=self.timeout_s,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._calls = 0  # upstream calls made (tries included), for the benchmark's calls per token

    @property
    def calls(self) -> int:
        return self._calls

    async def reachable(self) -> None:
        await self.client.get("/models")

    async def tokenize(self, text: str) -> list[int] | None:
        """vLLM's /tokenize (beside /v1, not under it); None where it answers other than 200.
        httpx.HTTPError, ValueError, KeyError or TypeError where the answer is unusable."""
        root = self.base_url.rstrip("/").removesuffix("/v1")
        response = await self.client.post(f"{root}/tokenize", json={
            "model": self.model, "prompt": text, "add_special_tokens": False})
        if response.status_code != 200:
            return None
        tokens = response.json()["tokens"]
        if not all(isinstance(t, int) for t in tokens):
            raise TypeError(f"/tokenize gave non-integer tokens: {tokens[:5]!r}")
        return tokens

    async def aclose(self) -> None:
        await self.client.aclose()

    async def draw(self, context: list[int], k: int, *, temperature: float, banned: list[int] = (),
                   seed: int | None = None) -> Draw:
        """The base's next token after `context` at `temperature` (0: greedy), never one of
        `banned`, with the top-k raw log-probs."""
        return (await self.draft(context, 1, k, temperature=temperature, banned=banned, seed=seed))[0]

    async def draft(self, context: list[int], n: int, k: int, *, temperature: float, banned: list[int] = (),
                    seed: int | None = None, ignore_eos: bool = False) -> list[Draw]:
        """The base's next n tokens after `context`, drawn in a row at `temperature`, each with
        its position's top-k raw log-probs (fewer than n where the upstream stopped at its eos,
        unless `ignore_eos`: the request goes on past eos, and so does its draft, else every eos
        would cost it one more call)."""
        body = {"model": self.model, "prompt": context, "max_tokens": n, "logprobs": k, "temperature": temperature,
                "return_tokens_as_token_ids": True}
        if ignore_eos and n > 1:
            body["ignore_eos"] = True  # vLLM's; it changes where the upstream stops, not what it draws
        if banned:
            body["logit_bias"] = {str(t): BANNED for t in banned}
        if seed is not None:
            body["seed"] = seed
        attempt = 0
        while True:
            try:
                return await self._call(body, k)
            except UpstreamError as e:
                if not e.retryable or attempt == self.retries:
                    raise
            await asyncio.sleep(RETRY_BACKOFF_S * 2 ** attempt)
            attempt += 1

    async def _call(self, body: dict, k: int) -> list[Draw]:
        self._calls += 1
        try:
            response = await self.client.post("/completions", json=body)
        except httpx.TimeoutException:
            raise UpstreamError(504, f"upstream {self.base_url} did not answer within {self.timeout_s:g} s",
                                retryable=True) from None
        except httpx.HTTPError as e:
            raise UpstreamError(503, f"upstream {self.base_url} unreachable: {e}", retryable=True) from None
        if response.status_code != 200:
            raise UpstreamError(502, f"upstream {self.base_url} answered {response.status_code}: "
                                     f"{response.text[:500]}",
                                retryable=response.status_code == 429 or response.status_code >= 500)
        draws = []
        try:
            choice = response.json()["choices"][0]
            logprobs = choice["logprobs"]
            for i in range(len(logprobs["tokens"])):
                token = _token_id(logprobs["tokens"][i])
                logprob = float(logprobs["token_logprobs"][i])
                top = sorted(((_token_id(t), float(lp)) for t, lp in logprobs["top_logprobs"][i].items()),
                             key=lambda pair: -pair[1])
                if len(top) < k:
                    raise UpstreamError(502, f"upstream {self.base_url} gave {len(top)} log-probs, {k} asked (a vLLM "
                                             f"upstream needs --max-logprobs >= {k})")
                # vLLM adds the drawn token's log-prob when it is not among the top k: the k best are the first k.
                draws.append(Draw(token, logprob, top[:k]))
            if not draws and choice.get("finish_reason") == "abort":
                # vLLM answers a request it aborted (it is shutting down) with 200 and no tokens:
                # like a 503, another try finds the upstream back, or down.
                raise UpstreamError(503, f"upstream {self.base_url} aborted the request", retryable=True)
            if not draws:
                raise IndexError("no tokens")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise UpstreamError(502, f"upstream {self.base_url} answered without token log-probs ({e!r})") from None
        return draws


async def wait_until_reachable(upstream: Upstream, timeout_s: float, on_wait: Callable[[str], None]) -> None:
    """Return once the upstream answers HTTP at all (GET /models, which every OpenAI-compatible
    server has): one started beside this server may still be loading its model. `on_wait` hears
    why it is not yet, every 10 s; ValueError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    next_word = time.monotonic()
    while True:
        try:
            await upstream.reachable()
            return
        except httpx.HTTPError as e:
            problem = f"{type(e).__name__}: {e}"
        now = time.monotonic()
        if now > deadline:
            raise ValueError(f"the upstream at {upstream.base_url} did not answer within {timeout_s:g} s ({problem})")
        if now >= next_word:
            on_wait(f"waiting for the upstream at {upstream.base_url} ({problem})")
            next_word = now + 10
        await asyncio.sleep(1)


# A probe with words, digits, punctuation, whitespace runs and non-ASCII text, so that tokenizers
# that differ anywhere in their vocabulary or pre-tokenization give different ids.
TOKENIZER_PROBE = "Value-augmented sampling, 2024: naïve café — 3.14159 tokens!\n\t  ¿Qué? 東京 🙂"


async def check_tokenizer(upstream: Upstream, tokenizer) -> None:
    """The upstream tokenizes a probe string as `tokenizer` does (vLLM's /tokenize): ValueError
    naming the difference, or that the upstream cannot say."""
    try:
        theirs = await upstream.tokenize(TOKENIZER_PROBE)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot check the upstream's tokenizer at {upstream.base_url}: {e}") from None
    if theirs is None:
        raise ValueError(f"the upstream at {upstream.base_url} offers no usable tokenizer; if its "
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
