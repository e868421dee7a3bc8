"""Finding the upstream's capabilities (vas_server.remote.capabilities) at startup, with one tiny
request per capability.

Invariants: at most 4 (prompt format) + 1 (neutral samplers) + 2 (logit_bias; 1 when the neutral
samplers' call gave its greedy draw) + 2 (raw log-probs; both required: refused if not honoured) +
len(LOGPROB_TRIES) + 4 (drafting, and ignore_eos at a context whose greedy token is eos) + 1
(tokenize) calls, each of one or two tokens; a capability given by the flag is never probed; a
failure other than the upstream refusing a request (a 4xx) ends startup with its reason.
"""

from __future__ import annotations

import math

import httpx

from vas_server.remote.capabilities import Capabilities
from vas_server.remote.upstream import CompletionsUpstream, UpstreamError
from vas_server.remote.wire import Draw

# Tried largest first; each is a cap some upstream documents (vLLM at 256 as README asks, vLLM's
# default 20, OpenAI's 5) or a step between them, so one of at most six calls finds the cap's
# bracket. An upstream with a cap between two tries is used at the lower one.
LOGPROB_TRIES = (256, 100, 50, 20, 5, 1)
PROBE_CONTEXT_TEXT = "Hello"  # the probe's prompt: any short text; its tokens come from MODEL's tokenizer
RAW_TOLERANCE = 1e-3  # log-probs that move less between temperatures than this are raw (kernels differ by less)
STOP_PROMPT = "Say OK."  # a chat turn the base ends soon, for ignore_eos's probe
STOP_SEARCH = 48  # greedy tokens that probe waits for the base's eos


async def probe(upstream: CompletionsUpstream, context: list[int], given: dict, stop_context: list[int] | None = None,
                eos: int | None = None) -> Capabilities:
    """The upstream's capabilities, each one in `given` taken as given, the others probed with
    one tiny request each (the prompt format first, since every other probe uses it), on
    `context`; `stop_context` (a prompt the base soon ends with `eos`, e.g. a short chat turn)
    serves ignore_eos's. Leaves `upstream.capabilities` set to the result. ValueError naming what
    the upstream refused."""
    found = Capabilities(**given, given=frozenset(given))
    if "neutral_samplers" not in found.given:  # the format's probe sends only what every upstream takes
        found = found.model_copy(update={"neutral_samplers": False})
    upstream.capabilities = found
    if not {"token_prompts", "token_ids"} <= found.given:
        found = await _probe_format(upstream, context, found)
    greedy = None  # a greedy draw at `context` under the capabilities found, once there is one
    if "neutral_samplers" not in found.given:
        upstream.capabilities = found.model_copy(update={"neutral_samplers": True})
        greedy = await _answer(upstream, context, "top_k, top_p, min_p")
        found = found.model_copy(update={"neutral_samplers": greedy is not None})
    upstream.capabilities = found
    await check_logit_bias(upstream, context, greedy)
    await check_raw_logprobs(upstream, context)
    if "logprob_cap" not in found.given:
        found = found.model_copy(update={"logprob_cap": await probe_logprob_cap(upstream, context)})
    upstream.capabilities = found
    if not {"ignore_eos", "draft"} <= found.given:
        found = await _probe_drafting(upstream, context, found, stop_context, eos)
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


async def check_logit_bias(upstream: CompletionsUpstream, context: list[int], greedy: Draw | None = None) -> None:
    """The upstream honours `logit_bias` -100 (a greedy draw with its greedy token banned draws
    another), which an exact draw from outside the top-K needs (vas_server.remote.sampling):
    ValueError naming it if refused or ignored. `greedy`: the greedy draw at `context` under the
    upstream's capabilities, when the caller made it (one call), else drawn here (two calls)."""
    if greedy is None:
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


async def check_raw_logprobs(upstream: CompletionsUpstream, context: list[int]) -> None:
    """The upstream's log-probs are raw (temperature 1) whatever the call's temperature, as
    remote mode's sampling needs (vLLM's default logprobs_mode, llama.cpp's; SGLang's unless
    configured are after temperature): the top-5 at temperatures 1 and 0.5 agree within
    RAW_TOLERANCE. ValueError naming it otherwise. Two calls."""
    one, half = [await upstream.draw(context, 5, temperature=t, seed=0) for t in (1.0, 0.5)]
    ones, halves = dict(one.top), dict(half.top)
    gap = max((abs(ones[t] - halves[t]) for t in ones.keys() & halves.keys()), default=math.inf)
    if gap > RAW_TOLERANCE:
        raise ValueError(f"the upstream's log-probs change with the temperature (by up to {gap:.3g} between "
                         "temperatures 1 and 0.5): remote mode needs the raw (temperature 1) log-probs; configure "
                         "the upstream to return them (SGLang: return log-probs before temperature scaling)")


async def _probe_drafting(upstream: CompletionsUpstream, context: list[int], found: Capabilities,
                          stop_context: list[int] | None, eos: int | None) -> Capabilities:
    """Drafting: a two-token call answers two positions of log-probs. ignore_eos: only where it
    changes where the upstream stops and not what it draws (vLLM's; llama.cpp's bans eos, so its
    drafts would not be the base's): at a context whose greedy next token is eos (`stop_context`
    continued greedily until the upstream stopped), a two-token greedy draft with ignore_eos must
    begin with eos. Not found so (no eos seen within STOP_SEARCH tokens, or a refusal): not sent."""
    if "draft" not in found.given:
        upstream.capabilities = found.model_copy(update={"ignore_eos": False, "draft": True})
        try:
            found = found.model_copy(update={"draft": len(await upstream.draft(context, 2, 1, temperature=0.0)) == 2})
        except UpstreamError as e:
            _refused_unless_client_error(e, "drafting")
            found = found.model_copy(update={"draft": False})
    if "ignore_eos" in found.given:
        return found
    if not found.draft or stop_context is None or eos is None:
        return found.model_copy(update={"ignore_eos": False})
    upstream.capabilities = found.model_copy(update={"ignore_eos": False})
    answer = [draw.token for draw in await upstream.draft(stop_context, STOP_SEARCH, 1, temperature=0.0)]
    if eos in answer:
        at_eos = stop_context + answer[:answer.index(eos)]
    elif len(answer) < STOP_SEARCH and (await upstream.draw(stop_context + answer, 1, temperature=0.0)).token == eos:
        at_eos = stop_context + answer  # an upstream that leaves eos out of its answer
    else:
        return found.model_copy(update={"ignore_eos": False})
    upstream.capabilities = found.model_copy(update={"ignore_eos": True})
    try:
        drafted = await upstream.draft(at_eos, 2, 1, temperature=0.0, ignore_eos=True)
    except UpstreamError as e:
        _refused_unless_client_error(e, "ignore_eos")
        return found.model_copy(update={"ignore_eos": False})
    return found.model_copy(update={"ignore_eos": len(drafted) == 2 and drafted[0].token == eos})


async def _answer(upstream: CompletionsUpstream, context: list[int], what: str) -> Draw | None:
    """The upstream's greedy draw for a one-token call shaped by `upstream.capabilities`; None
    when it refuses the call (a 4xx)."""
    try:
        return await upstream.draw(context, 1, temperature=0.0)
    except UpstreamError as e:
        _refused_unless_client_error(e, what)
        return None


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


