"""One remote decoding step: a draw from VAS's steered distribution, exact, from what an
OpenAI-compatible upstream can give (the base's top-K raw log-probs, draws of the base at a
temperature, draws with candidates banned by `logit_bias`).

VAS's distribution at temperature T (docs/VAS_RULE.md §1.4, as in-process: the bonus is added to
the logits, vLLM then divides by T) puts weight exp((l_a + b_a)/T) on each candidate a of C and
exp(l_a/T) on every other token (the tail). Write s = sum_C exp(l/T), s' = sum_C exp((l + b)/T)
and t for the tail's sum, all in the units of the upstream's raw log-probs. The candidates' part
is known; only t is not, except at T = 1, where t = 1 - sum_C p0. So:

  * T = 1: the tail has probability t / (t + s'); a tail draw is the first call's own draw when it
    fell outside C, else a call with C banned (an exact draw from the tail).
  * other T > 0: the upstream's draw x ~ base at T is a coin that lands in the tail with
    probability q = t / (t + s). A Bernoulli factory turns it into the steered coin t / (t + s'):
    if s <= s', accept a tail x with probability s / s' and redraw otherwise; if s > s', accept a
    candidate x with probability s' / s and redraw otherwise. Either way P(tail) = t / (t + s').
    An accepted tail x is an exact tail draw, a candidate outcome is drawn locally from C.
  * T = 0: the best steered candidate, unless the tail's best token (a greedy call with C banned)
    has a higher base log-prob; it can only when the best steered candidate is below the K-th
    base log-prob.
  * vas_restrict_to_top_k: C alone, no further call.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from vas_server.remote.wire import Draw

# The most draws one step may ask for at a temperature other than 0 and 1. The expected number is
# 1 / (1 - q (1 - s/s')) or 1 / (q + (1 - q) s'/s), a few at most unless steering moves most of the
# mass off confident candidates; past the cap the step is drawn from C (the one inexact outcome,
# counted in `Step.capped`).
MAX_DRAWS = 64


@dataclass(frozen=True)
class Step:
    """The token chosen, its raw log-prob, its rank among the base's tokens (a lower bound, K + 1,
    for a tail token beyond the top list), and the upstream calls it took after the first."""

    token: int
    logprob: float
    rank: int
    extra_calls: int = 0
    capped: bool = False


# redraw(banned_candidates) -> another draw of the base at the step's temperature, the candidates
# banned or not (the first draw of the step was made without bans).
Redraw = Callable[[bool], Awaitable[Draw]]


async def steered_step(first: Draw, k: int, bonus: torch.Tensor | None, temperature: float, restrict: bool,
                       generator: torch.Generator, redraw: Redraw) -> Step:
    """A token from VAS's distribution over C = first.top[:k] steered by `bonus` [k] (None: no
    steering) and the tail. `first` is the step's first draw, made at `temperature` without bans."""
    base = torch.tensor([lp for _, lp in first.top[:k]], dtype=torch.float64)
    steered = base if bonus is None else base + bonus.double()
    candidates = [t for t, _ in first.top[:k]]
    ranks = {t: r + 1 for r, (t, _) in enumerate(first.top)}

    def candidate(index: int, calls: int = 0, capped: bool = False) -> Step:
        return Step(candidates[index], float(base[index]), index + 1, calls, capped)

    def tail(draw: Draw, calls: int) -> Step:
        return Step(draw.token, draw.logprob, ranks.get(draw.token, len(first.top) + 1), calls)

    if temperature == 0:
        best = int(steered.argmax())
        if restrict or float(steered[best]) >= float(base.min()):
            return candidate(best)
        best_tail = await redraw(True)
        return tail(best_tail, 1) if best_tail.logprob > float(steered[best]) else candidate(best, 1)

    def draw_candidate(calls: int = 0, capped: bool = False) -> Step:
        weights = ((steered - steered.max()) / temperature).exp()
        return candidate(int(torch.multinomial(weights, 1, generator=generator)), calls, capped)

    if restrict:
        return draw_candidate()
    in_c = set(candidates)
    log_s = float(torch.logsumexp(base / temperature, 0))
    log_s_steered = float(torch.logsumexp(steered / temperature, 0))
    if temperature == 1:
        t = max(0.0, 1.0 - math.exp(log_s))
        if _uniform(generator) * (t + math.exp(log_s_steered)) >= t:
            return draw_candidate()
        if first.token not in in_c:
            return tail(first, 0)
        return tail(await redraw(True), 1)
    draw, calls = first, 0
    while calls < MAX_DRAWS:
        if draw.token in in_c:
            if log_s > log_s_steered and math.log(_uniform(generator)) >= log_s_steered - log_s:
                draw, calls = await redraw(False), calls + 1
                continue
            return draw_candidate(calls)
        if log_s < log_s_steered and math.log(_uniform(generator)) >= log_s - log_s_steered:
            draw, calls = await redraw(False), calls + 1
            continue
        return tail(draw, calls)
    return draw_candidate(calls, capped=True)


def _uniform(generator: torch.Generator) -> float:
    """A uniform draw in (0, 1]."""
    return 1.0 - float(torch.rand((), generator=generator, dtype=torch.float64))
