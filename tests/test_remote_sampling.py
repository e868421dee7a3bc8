"""Remote-mode sampling (vas_server.remote.sampling) against VAS's exact distribution.

The upstream is a fake base over a 10-token vocabulary with known logits, drawing as an
OpenAI-compatible server does (temperature, logit_bias bans, raw top-k log-probs). For each
temperature, 8,000 steps must fit softmax((l + bonus on C) / T) by a chi-square test: the tail
included, and whichever way steering moves the candidates' mass (the Bernoulli factory's two sides).
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from vas_server.remote.sampling import steered_step
from vas_server.remote.wire import Draw

LOGITS = torch.tensor([2.0, 1.5, 1.2, 0.3, 0.1, 0.0, -0.2, -0.5, -1.0, -3.0], dtype=torch.float64)
LOGPROBS = LOGITS.log_softmax(0)
K = 4  # the candidates are tokens 0-3, the base's best; the tail (6 tokens) holds about 30% of the mass
RAISE = torch.tensor([1.0, -0.5, 1.5, -2.0], dtype=torch.float64)  # s' > s at the temperatures below
LOWER = torch.tensor([-1.5, -1.0, -0.5, 0.5], dtype=torch.float64)  # s' < s
DRAWS = 8_000


class FakeBase:
    """Draws of the base as an upstream makes them, from its own seeded generator."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0

    def draw(self, k: int, temperature: float, banned: list[int] = ()) -> Draw:
        self.calls += 1
        logits = LOGITS.clone()
        logits[list(banned)] = -math.inf
        if temperature == 0:
            token = int(logits.argmax())
        else:
            token = int(torch.multinomial((logits / temperature).softmax(0), 1, generator=self.generator))
        order = LOGPROBS.argsort(descending=True)[:k].tolist()  # raw log-probs: the bans do not change them
        return Draw(token, float(LOGPROBS[token]), [(t, float(LOGPROBS[t])) for t in order])


def exact(bonus: torch.Tensor, temperature: float, restrict: bool = False) -> torch.Tensor:
    steered = LOGITS.clone()
    steered[:K] += bonus
    if restrict:
        steered[K:] = -math.inf
    return (steered / temperature).softmax(0)


def run_steps(bonus, temperature: float, restrict: bool = False, draws: int = DRAWS, seed: int = 0):
    base = FakeBase(seed)
    generator = torch.Generator().manual_seed(seed + 1)

    async def redraw(banned: bool) -> Draw:
        return base.draw(1, temperature, list(range(K)) if banned else ())

    async def steps():
        return [await steered_step(base.draw(K, temperature), K, bonus, temperature, restrict, generator, redraw)
                for _ in range(draws)]

    return asyncio.run(steps()), base.calls


def goodness_of_fit_p(tokens: list[int], probs: torch.Tensor) -> float:
    """Chi-square test that `tokens` are draws from `probs` (bins expected fewer than 5 times pooled)."""
    counts = torch.bincount(torch.tensor(tokens), minlength=len(probs)).double()
    expected = probs * len(tokens)
    assert counts[expected == 0].sum() == 0, "a token of probability 0 was drawn"
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big & (expected > 0)].sum()[None]])
    expect = torch.cat([expected[big], expected[~big & (expected > 0)].sum()[None]])
    keep = expect > 0
    chi2 = float(((observed[keep] - expect[keep]) ** 2 / expect[keep]).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                          torch.tensor(chi2 / 2, dtype=torch.float64)))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("bonus", [RAISE, LOWER], ids=["raise", "lower"])
def test_steps_are_draws_from_the_steered_distribution(bonus, temperature):
    steps, calls = run_steps(bonus, temperature)
    probs = exact(bonus, temperature)
    tokens = [s.token for s in steps]
    p = goodness_of_fit_p(tokens, probs)
    assert p > 1e-4, (p, torch.bincount(torch.tensor(tokens), minlength=10) / DRAWS, probs)
    # The test sees the tail (160 draws expected at least) and the factory's redraws (T != 1) or the
    # tail call (T = 1).
    assert float(probs[K:].sum()) > 0.02 and sum(t >= K for t in tokens) > 0
    assert calls > DRAWS and not any(s.capped for s in steps)
    # What the logprobs report: the token's raw log-prob, its rank among the base's top K, else K + 1.
    for s in steps[:200]:
        assert s.logprob == pytest.approx(float(LOGPROBS[s.token]))
        assert s.rank == (s.token + 1 if s.token < K else K + 1)


def test_unsteered_steps_are_base_draws_in_one_call_where_the_first_draw_serves():
    steps, calls = run_steps(None, 0.7)
    assert goodness_of_fit_p([s.token for s in steps], exact(torch.zeros(K), 0.7)) > 1e-4
    assert calls == DRAWS  # s = s': every first draw is accepted


def test_restricted_steps_stay_among_the_candidates():
    steps, calls = run_steps(LOWER, 0.7, restrict=True)
    assert goodness_of_fit_p([s.token for s in steps], exact(LOWER, 0.7, restrict=True)) > 1e-4
    assert calls == DRAWS


@pytest.mark.parametrize("bonus, token, calls", [
    (torch.tensor([0.0, 0.0, 0.0, 0.0]), 0, 0),  # the base's best
    (torch.tensor([-5.0, 3.0, -5.0, -5.0]), 1, 0),  # steered above the K-th base log-prob: no tail call
    (torch.tensor([-3.0, -3.0, -3.0, -3.0]), 4, 1),  # every candidate below the tail's best (token 4)
    (torch.tensor([-1.85, -1.85, -1.85, -1.85]), 0, 1),  # below the K-th (0.3) but above the tail's best (0.1)
])
def test_greedy_takes_the_tail_only_when_its_best_beats_every_steered_candidate(bonus, token, calls):
    steps, used = run_steps(bonus.double(), 0.0, draws=1)
    assert steps[0].token == token
    assert used - 1 == calls == steps[0].extra_calls
