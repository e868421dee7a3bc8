"""What the upstream accepts, found at startup (docs/SERVER.md, "VAS over a remote base"), and
what follows from it for one request. Today: the log-prob cap, the most top log-probs one call
returns per position (vLLM's --max-logprobs, default 20; OpenAI's legacy completions 5).

Invariants: `probe_logprob_cap` makes at most len(LOGPROB_TRIES) one-token calls and returns the
largest tried value the upstream answers in full (at least 1), or raises ValueError naming what
it refused; `clamp` never asks more than the cap and never fewer than one candidate."""

from __future__ import annotations

from dataclasses import dataclass

from vas_server.remote.upstream import Upstream, UpstreamError

# Tried largest first; each is a cap some upstream documents (vLLM at 256 as README asks, vLLM's
# default 20, OpenAI's 5) or a step between them, so one of at most six calls finds the cap's
# bracket. An upstream with a cap between two tries is used at the lower one.
LOGPROB_TRIES = (256, 100, 50, 20, 5, 1)
PROBE_CONTEXT_TEXT = "Hello"  # the probe's prompt: any short text; its tokens come from MODEL's tokenizer


@dataclass(frozen=True)
class Capabilities:
    """What the upstream was found (or told, by a flag) to accept: `logprob_cap` top log-probs
    per position; `detected` says it was probed rather than given."""

    logprob_cap: int
    detected: bool

    def describe(self) -> str:
        """The startup log line's body."""
        return f"top log-probs up to {self.logprob_cap} per position ({'probed' if self.detected else 'from the flag'})"


async def probe_logprob_cap(upstream: Upstream, context: list[int]) -> int:
    """The largest of LOGPROB_TRIES that `upstream` answers with that many top log-probs after
    `context`: a refusal (the upstream's 400) or a short list means the cap is lower. ValueError
    if it answers none of them, or fails other than by refusing (down, broken)."""
    refusals = []
    for k in LOGPROB_TRIES:
        try:
            await upstream.draw(context, k, temperature=0.0)
            return k
        except UpstreamError as e:
            if e.retryable:
                raise ValueError(f"the upstream failed while its log-prob cap was probed: {e}") from None
            refusals.append(f"{k}: {e}")
    raise ValueError("the upstream returns no token log-probs, which remote mode needs (tried "
                     + "; ".join(refusals)[:800] + ")")


def clamp(top_k: int, client_logprobs: int | None, cap: int) -> tuple[int, int]:
    """(C, log-probs asked per call) for a request whose VAS top-K is `top_k` and whose client
    asked `client_logprobs` top log-probs, on an upstream capped at `cap`: C = min(K, cap); the
    call asks max(C, client_logprobs), which the caller has checked is within the cap."""
    candidates = max(1, min(top_k, cap))
    return candidates, max(candidates, client_logprobs or 0)
