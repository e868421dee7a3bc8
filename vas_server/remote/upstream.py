"""The remote base behind one seam: the `Upstream` protocol, and `CompletionsUpstream`, its
implementation for an OpenAI-compatible /v1/completions (vLLM, SGLang, llama.cpp's server, hosted
legacy-completions APIs), each call shaped by what the upstream accepts
(vas_server.remote.capabilities; the body and the answer's formats: vas_server.remote.wire).

The rest of remote mode sees only the protocol (next-token candidates with log-probs for a
prefix, an optional multi-token draft, the upstream's tokenizer if it offers one, reachability,
the calls made, closing). `draw` asks for one token with its top-k log-probs and returns what the
upstream drew; `draft` asks for n tokens in a row, with the top-k log-probs at each position.
Failures become UpstreamError with the status the client should get; those that a second try can
cure (unreachable, slow, overloaded, a 5xx) are retried with backoff, since a call has no side
effects and its seed makes it repeatable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import httpx

from vas_server.remote.capabilities import Capabilities
from vas_server.remote.wire import Draw, ShortLogprobs, TokenTexts, completion_body, positions

RETRY_BACKOFF_S = 0.25  # first pause before a retry; doubled each time


class UpstreamError(RuntimeError):
    """The upstream failed: `status` is what the client gets (502 bad answer, 503 down, 504 slow);
    `retryable` says whether another try may succeed; `status_code` is the upstream's own HTTP
    status, where it answered."""

    def __init__(self, status: int, message: str, retryable: bool = False, status_code: int | None = None):
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.status_code = status_code


@runtime_checkable
class Upstream(Protocol):
    """What remote mode needs of a base behind an API. Invariants every implementation keeps:
    log-probs are raw (temperature 1) whatever the draw's temperature; `top` lists k (token id,
    log-prob) pairs, best first (fewer only where `mismatches` counts the missing ones); `calls`
    counts every HTTP call made for `draw`/`draft` (tries included), never decreasing; failures
    are UpstreamError with the client's status."""

    base_url: str
    model: str

    @property
    def calls(self) -> int:
        """Upstream calls made so far (tries included): the benchmark's calls per token."""

    @property
    def mismatches(self) -> int:
        """Tokens named by text that MODEL's tokenizer maps to no single id, and contexts sent as
        text that it encodes to other ids (vas_server.remote.wire): 0 where ids go both ways."""

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
class CompletionsUpstream:
    """An `Upstream` on an OpenAI-compatible /v1/completions: the address and what each call may
    take, `timeout_s` per try, `retries` more tries. `capabilities` shapes every call (the
    default: vLLM's, all of them); `tokenizer` (MODEL's) maps text both ways for an upstream
    without token-id prompts or ids in its answers. Owns one httpx client, closed by `aclose`."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 30.0
    retries: int = 2
    tokenizer: object | None = None
    capabilities: Capabilities = Capabilities()

    def __post_init__(self):
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        # No connection cap: every request in flight has one call outstanding at most.
        self.client = httpx.AsyncClient(base_url=self.base_url.rstrip("/"), headers=headers, timeout=self.timeout_s,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._calls = 0  # upstream calls made (tries included), for the benchmark's calls per token
        self.texts = TokenTexts(self.tokenizer) if self.tokenizer is not None else None

    @property
    def calls(self) -> int:
        return self._calls

    @property
    def mismatches(self) -> int:
        return self.texts.mismatches if self.texts is not None else 0

    async def reachable(self) -> None:
        await self.client.get("/models")

    async def tokenize(self, text: str) -> list[int] | None:
        """The /tokenize beside /v1 (not under it): vLLM's takes `prompt`, llama.cpp's `content`,
        and each ignores the other's field. None where it answers other than 200. httpx.HTTPError,
        ValueError, KeyError or TypeError where the answer is unusable."""
        root = self.base_url.rstrip("/").removesuffix("/v1")
        response = await self.client.post(f"{root}/tokenize", json={
            "model": self.model, "prompt": text, "content": text, "add_special_tokens": False})
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
        unless `ignore_eos` and the upstream takes it: the request goes on past eos, and so does
        its draft, else every eos would cost it one more call). One token where the upstream
        does not draft."""
        caps = self.capabilities
        if not caps.draft:
            n = 1
        before = self.mismatches  # counted in the synchronous parts, so no other call's are in it
        if caps.token_prompts:
            prompt = context
        elif self.texts is None:
            raise UpstreamError(500, "an upstream without token-id prompts needs MODEL's tokenizer")
        else:
            prompt = self.texts.prompt_text(context)
        mismatches = self.mismatches - before
        body = completion_body(self.model, prompt, n, k, temperature, token_ids=caps.token_ids,
                               neutral_samplers=caps.neutral_samplers, banned=banned, seed=seed,
                               ignore_eos=ignore_eos and n > 1 and caps.ignore_eos)
        attempt = 0
        while True:
            try:
                draws = await self._call(body, k)
                return [dataclasses.replace(draws[0], mismatches=draws[0].mismatches + mismatches), *draws[1:]]
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
                                retryable=response.status_code == 429 or response.status_code >= 500,
                                status_code=response.status_code)
        before = self.mismatches  # from here on synchronous: only this answer's mismatches are counted
        try:
            choice = response.json()["choices"][0]
            # Short top lists are refused unless the answer named tokens by text: a legacy-format
            # answer lists two candidates with one text once (wire.positions counts them).
            draws = positions(choice, k, self.texts, full=body.get("return_tokens_as_token_ids", False)
                              or self.texts is None)
            if not draws and choice.get("finish_reason") == "abort":
                # vLLM answers a request it aborted (it is shutting down) with 200 and no tokens:
                # like a 503, another try finds the upstream back, or down.
                raise UpstreamError(503, f"upstream {self.base_url} aborted the request", retryable=True)
            if not draws:
                raise IndexError("no tokens")
            draws[0] = dataclasses.replace(draws[0], mismatches=self.mismatches - before)
        except ShortLogprobs as e:
            # A 4xx-like refusal for the log-prob cap's probe: the upstream gives fewer than asked.
            raise UpstreamError(502, f"upstream {self.base_url} gave {e.given} log-probs, {e.asked} asked (a vLLM "
                                     f"upstream needs --max-logprobs >= {e.asked})", status_code=400) from None
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
