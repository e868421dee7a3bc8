"""Finding the upstream's capabilities (vas_server.remote.capabilities) at startup, with one tiny
request per capability.

Invariants: at most 4 (prompt format) + 1 (neutral samplers) + 2 (logit_bias, required: refused if not honoured) +
len(LOGPROB_TRIES) + 2 (ignore_eos and drafting) + 1 (tokenize) calls, each of one or two tokens; a capability given by the flag is never probed; a
failure other than the upstream refusing a request (a 4xx) ends startup with its reason.
"""

from __future__ import annotations

import httpx

from vas_server.remote.capabilities import Capabilities
from vas_server.remote.upstream import CompletionsUpstream, UpstreamError

# Tried largest first; each is a cap some upstream documents (vLLM at 256 as README asks, vLLM's
# default 20, OpenAI's 5) or a step between them, so one of at most six calls finds the cap's
# bracket. An upstream with a cap between two tries is used at the lower one.
LOGPROB_TRIES = (256, 100, 50, 20, 5, 1)
PROBE_CONTEXT_TEXT = "Hello"  # the probe's prompt: any short text; its tokens come from MODEL's tokenizer


async def probe(upstream: CompletionsUpstream, context: list[int], given: dict) -> Capabilities:
    """The upstream's capabilities, each one in `given` taken as given, the others probed with
    one tiny request each (the prompt format first, since every other probe uses it). Leaves
    `upstream.capabilities` set to the result. ValueError naming what the upstream refused."""
    found = Capabilities(**given, given=frozenset(given))
    if "neutral_samplers" not in found.given:  # the format's probe sends only what every upstream takes
        found = found.model_copy(update={"neutral_samplers": False})
    upstream.capabilities = found
    if not {"token_prompts", "token_ids"} <= found.given:
        found = await _probe_format(upstream, context, found)
    if "neutral_samplers" not in found.given:
        upstream.capabilities = found.model_copy(update={"neutral_samplers": True})
        found = found.model_copy(update={"neutral_samplers": await _accepted(upstream, context, "top_k, top_p, min_p")})
    upstream.capabilities = found
    await check_logit_bias(upstream, context)
    if "logprob_cap" not in found.given:
        found = found.model_copy(update={"logprob_cap": await probe_logprob_cap(upstream, context)})
    upstream.capabilities = found
    if not {"ignore_eos", "draft"} <= found.given:
        found = await _probe_drafting(upstream, context, found)
    if "tokenize" not in found.given:
        try:
            found = found.model_copy(update={"tokenize": await upstream.tokenize(PROBE_CONTEXT_TEXT) is not None})
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            found = found.model_copy(update={"tokenize": False})
    upstream.capabilities = found
    return found


async def _probe_format(upstream: CompletionsUpstream, context: list[int], found: Capabilities) -> Capabilities:
    """The first of (ids, ids asked back), (ids, text back), (text, ids back), (text, text back)
    that the upstream answers, within what `found.given` fixes."""
    refusals = []
    for token_prompts in (True, False):
        for token_ids in (True, False):
            trial = found.model_copy(update={"token_prompts": token_prompts, "token_ids": token_ids})
            if any(getattr(trial, f) != getattr(found, f) for f in ("token_prompts", "token_ids") if f in found.given):
                continue
            upstream.capabilities = trial
            try:
                await upstream.draw(context, 1, temperature=0.0)
                return trial
            except UpstreamError as e:
                _refused_unless_client_error(e, "its prompt format")
                refusals.append(str(e))
                if e.status_code == 404:
                    raise ValueError(f"the upstream at {upstream.base_url} has no /v1/completions route "
                                     f"({e}); remote mode needs completions with token log-probs: an upstream that "
                                     "offers only chat completions is not supported (docs/SERVER.md, "
                                     "\"VAS over a remote base\")") from None
    raise ValueError("the upstream refused every prompt format remote mode can send (token ids or text, with "
                     "and without return_tokens_as_token_ids): " + " | ".join(refusals)[:1200])


async def check_logit_bias(upstream: CompletionsUpstream, context: list[int]) -> None:
    """The upstream honours `logit_bias` -100 (a greedy draw with its greedy token banned draws
    another), which an exact draw from outside the top-K needs (vas_server.remote.sampling):
    ValueError naming it if refused or ignored. Two calls."""
    greedy = await upstream.draw(context, 1, temperature=0.0)
    try:
        other = await upstream.draw(context, 1, temperature=0.0, banned=[greedy.token])
    except UpstreamError as e:
        _refused_unless_client_error(e, "logit_bias")
        raise ValueError(f"the upstream refuses logit_bias ({e}), which remote mode needs to draw exactly outside "
                         "the top-K candidates") from None
    if other.token == greedy.token:
        raise ValueError(f"the upstream ignores logit_bias (token {greedy.token} banned at -100 was drawn again), "
                         "which remote mode needs to draw exactly outside the top-K candidates")


async def _probe_drafting(upstream: CompletionsUpstream, context: list[int], found: Capabilities) -> Capabilities:
    """ignore_eos and drafting from one two-token call with ignore_eos (unless given false), and
    a second without it if the upstream refused that field: drafting is two positions of log-probs."""
    for ignore_eos in (True, False):
        if "ignore_eos" in found.given and found.ignore_eos != ignore_eos:
            continue
        upstream.capabilities = found.model_copy(update={"ignore_eos": ignore_eos, "draft": True})
        try:
            drafted = await upstream.draft(context, 2, 1, temperature=0.0, ignore_eos=ignore_eos)
        except UpstreamError as e:
            _refused_unless_client_error(e, "ignore_eos and drafting")
            continue
        update = {"ignore_eos": ignore_eos, "draft": len(drafted) == 2}
        return found.model_copy(update={k: v for k, v in update.items() if k not in found.given})
    return found.model_copy(update={k: False for k in ("ignore_eos", "draft") if k not in found.given})


async def _accepted(upstream: CompletionsUpstream, context: list[int], what: str) -> bool:
    """Whether the upstream answers a one-token call shaped by `upstream.capabilities` (False: a 4xx)."""
    try:
        await upstream.draw(context, 1, temperature=0.0)
        return True
    except UpstreamError as e:
        _refused_unless_client_error(e, what)
        return False


def _refused_unless_client_error(e: UpstreamError, what: str) -> None:
    """A probe's failure other than the upstream refusing the request (4xx) ends startup."""
    if e.retryable or e.status_code is None or not 400 <= e.status_code < 500:
        raise ValueError(f"the upstream failed while {what} was probed: {e}") from None


async def probe_logprob_cap(upstream: CompletionsUpstream, context: list[int]) -> int:
    """The largest of LOGPROB_TRIES that `upstream` answers with that many top log-probs after
    `context`: a refusal (the upstream's 4xx) or a short list means the cap is lower. ValueError
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


