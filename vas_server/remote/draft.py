"""Several tokens per upstream call, exactly: the base drafts, VAS verifies (speculative sampling).

One upstream call returns n tokens x_1..x_n drawn by the base at the request's temperature T,
with the top-K raw log-probs at every position. Position i's candidates C_i are its top K, and
VAS's distribution there, q_i, is the one vas_server.remote.sampling draws from: weight
exp((l_a + b_a)/T) on a in C_i, exp(l_a/T) on every other token (the tail), with l the raw
log-probs given the context and x_1..x_{i-1}, b the value bonus. p_i is the base's distribution
at T, the one x_i was drawn from.

`verify` goes through the positions in order and accepts x_i with probability
min(1, q_i(x_i) / p_i(x_i)); at the first rejection it emits a token drawn from the residual
r_i = max(0, q_i - p_i) / sum max(0, q_i - p_i) and drops the rest of the draft.

Claim: every emitted token is distributed as VAS's next token given the tokens before it.
Proof (the speculative-sampling argument, per position): given the accepted prefix, x_i ~ p_i
with fresh randomness, so P(emit y at i) = p_i(y) min(1, q_i(y)/p_i(y)) + P(reject) r_i(y)
= min(p_i(y), q_i(y)) + (1 - sum_z min(p_i(z), q_i(z))) r_i(y). Since
1 - sum min(p, q) = sum (q - min(p, q)) = sum max(0, q - p), the second term is max(0, q_i(y) -
p_i(y)), and the sum is q_i(y). A rejection ends the round, so the tokens after it are never
conditioned on anything but the emitted prefix; the next round starts a fresh draft there. By
induction over positions and rounds the emitted sequence is VAS's.

What the ratio and the residual need, at T = 1 (raw log-probs are the sampling distribution):
write s = sum_C p, s' = sum_C p e^b, t = 1 - s (the tail's mass) and Z = t + s'. Then q(a) =
p(a) e^{b_a} / Z on C and q(y) = p(y) / Z on the tail, so
  * q/p = e^{b_a} / Z for a drafted candidate, 1 / Z for a drafted tail token: both known;
  * the residual on C is max(0, p(a) (e^{b_a} / Z - 1)), known; on the tail it is
    p(y) max(0, 1/Z - 1), proportional to the base restricted to the tail, so its mass is
    t max(0, 1/Z - 1) and a draw from it is the upstream's draw with C banned (`tail_draw`).
    It is non-zero only when steering lowers the candidates (s' < s: Z < 1).
  * vas_restrict_to_top_k: q = p e^b / s' on C and 0 on the tail (t taken as 0, the tail's
    factor 0): a drafted tail token is always rejected, the residual has no tail part.

At T = 0 VAS's token is deterministic (sampling.steered_step's greedy rule, which may make one
banned greedy call); the drafted token x_i is the base's argmax and is accepted iff it equals
VAS's token, which is emitted either way. Exact by construction.

Other temperatures: p_i(x) = exp(l_x / T) / sum_V exp(l / T) needs the whole vocabulary's
normaliser, which raw top-K log-probs do not give, so neither the ratio nor the tail residual is
known. Remote mode does not draft there: it keeps one token per call with sampling.py's
Bernoulli factory (exact), and says so (`drafts_at`). No approximation is made anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import torch

from vas_server.remote.sampling import Step, _uniform, steered_step
from vas_server.remote.wire import Draw

# tail_draw(i) -> the base's draw at position i (context + draft[:i]) with C_i banned:
# at T = 1 a sample, at T = 0 the greedy token.
TailDraw = Callable[[int], Awaitable[Draw]]


def drafts_at(temperature: float) -> bool:
    """Whether drafting is exact at `temperature` (module docstring): T = 0 and T = 1 only."""
    return temperature in (0.0, 1.0)


def acceptance_ratio_log(position: Draw, k: int, bonus: torch.Tensor | None, restrict: bool) -> float:
    """log min(1, q(x)/p(x)) for the drafted token x of `position` at T = 1 (-inf: never)."""
    base, steered, log_z = _parts(position, k, bonus, restrict)
    candidates = [t for t, _ in position.top[:k]]
    if position.token in candidates:
        j = candidates.index(position.token)
        return min(0.0, float(steered[j] - base[j]) - log_z)
    return -math.inf if restrict else min(0.0, -log_z)


def residual(position: Draw, k: int, bonus: torch.Tensor | None, restrict: bool) -> tuple[torch.Tensor, float]:
    """The unnormalised residual max(0, q - p) at T = 1: [k] on C, and the tail's total mass."""
    base, steered, log_z = _parts(position, k, bonus, restrict)
    on_c = ((steered - log_z).exp() - base.exp()).clamp(min=0)
    tail = 0.0 if restrict else _tail_mass(base) * max(0.0, math.exp(-log_z) - 1.0)
    return on_c, tail


def _tail_mass(base: torch.Tensor) -> float:
    return max(0.0, 1.0 - float(base.exp().sum()))


def _parts(position: Draw, k: int, bonus: torch.Tensor | None, restrict: bool):
    """The candidates' raw log-probs, their steered log-weights, and log Z (module docstring)."""
    base = torch.tensor([lp for _, lp in position.top[:k]], dtype=torch.float64)
    steered = base if bonus is None else base + bonus.double()
    log_s_steered = float(torch.logsumexp(steered, 0))
    t = 0.0 if restrict else _tail_mass(base)
    log_z = math.log(t + math.exp(log_s_steered))
    return base, steered, log_z


async def verify(draft: list[Draw], k: int, bonuses: list[torch.Tensor | None], temperature: float, restrict: bool,
                 generator: torch.Generator, tail_draw: TailDraw) -> tuple[list[Step], int]:
    """The tokens to emit for one draft (its positions' draws, bonuses [k] or None each), and how
    many of them are accepted drafted tokens; the last emitted token is VAS's own choice when
    fewer than len(draft) were accepted. T must be 0 or 1 (`drafts_at`)."""
    if not drafts_at(temperature):
        raise ValueError(f"drafting is not exact at temperature {temperature}")
    steps: list[Step] = []
    for i, (position, bonus) in enumerate(zip(draft, bonuses)):
        ranks = {t: r + 1 for r, (t, _) in enumerate(position.top)}
        drafted = Step(position.token, position.logprob, ranks.get(position.token, len(position.top) + 1))
        if temperature == 0:
            async def redraw(banned: bool, i=i) -> Draw:
                return await tail_draw(i)

            chosen = await steered_step(position, k, bonus, 0.0, restrict, generator, redraw)
            if chosen.token != position.token:
                return steps + [chosen], i
            steps.append(drafted)
            continue
        log_ratio = acceptance_ratio_log(position, k, bonus, restrict)
        if math.log(_uniform(generator)) <= log_ratio:
            steps.append(drafted)
            continue
        on_c, tail = residual(position, k, bonus, restrict)
        total = float(on_c.sum()) + tail
        if total <= 0:  # rejection has probability sum max(0, q - p) = 0: only rounding gets here
            steps.append(drafted)
            continue
        if _uniform(generator) * total <= tail:
            other = await tail_draw(i)
            steps.append(Step(other.token, other.logprob, ranks.get(other.token, len(position.top) + 1), 1))
        else:
            j = int(torch.multinomial(on_c, 1, generator=generator))
            token, logprob = position.top[j]
            steps.append(Step(token, logprob, j + 1))
        return steps, i
    return steps, len(draft)


class DraftLength:
    """A request's draft length, adapted to its observed acceptance.

    With acceptance a per drafted position, a round of n emits (1 - a^n) / (1 - a) tokens on
    average: it emits at least j tokens (1 <= j <= n) iff the first j - 1 positions were accepted,
    with probability a^(j-1), and the sum over j is that. An unbounded draft emits 1 / (1 - a) (the
    accepted run and the residual's token at the rejection), so the next draft asks that many,
    rounded, within [1, cap]: longer drafts would mostly be dropped after a rejection.

    a is estimated as (accepted + 1) / (verified + 2) (the posterior mean under a uniform prior),
    counting the verified positions: the accepted ones and the one rejected, not the dropped rest.
    The first draft, before any observation, asks `cap` (unsteered and lightly steered requests
    accept most drafted tokens). `adaptive` False: always `cap` (the engine core's choice for an
    unsteered request, whose every drafted token is accepted).

    Tried and dropped (docs/BENCHMARKS.md, "Draft length"): choosing the n that maximises
    E(n) / (fixed + per_token * n) with the round cost fitted online to this server's rounds. On
    the real base behind the 50 ms proxy the fitted line chose 2-token drafts where this rule's
    3-4 token drafts ran faster: the cost is not linear enough in n for the fit to be trusted."""

    def __init__(self, cap: int, adaptive: bool = True):
        self.cap = max(1, cap)
        self.adaptive = adaptive
        self.verified = 0
        self.accepted = 0

    def next(self) -> int:
        if not self.adaptive or not self.verified:
            return self.cap
        a = (self.accepted + 1) / (self.verified + 2)
        return max(1, min(self.cap, round(1 / (1 - a))))

    def observe(self, verified: int, accepted: int) -> None:
        self.verified += verified
        self.accepted += accepted
