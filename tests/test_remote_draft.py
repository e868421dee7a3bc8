"""Drafting (vas_server.remote.draft) against VAS's exact distribution over several positions.

The fake base is a Markov chain over 10 tokens: its logits at a position are LOGITS shifted by
the previous token, so every position has its own candidates (its top K) and tail. A draft is n
tokens the base draws in a row, with the top-K raw log-probs at each; the bonus at a position
depends on the previous token too. 6,000 sequences of 3 tokens, made of rounds of draft and
verify, must fit VAS's exact joint law of the first two tokens and marginal of the third
(chi-square), with steering that raises the candidates, lowers them (the residual's tail part),
and both alternately.
"""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest
import torch

from test_remote_sampling import LOWER, RAISE, goodness_of_fit_p
from vas_server.remote.draft import DraftLength, drafts_at, verify
from vas_server.remote.sampling import steered_step
from vas_server.remote.wire import Draw

LOGITS = torch.tensor([2.0, 1.5, 1.2, 0.3, 0.1, 0.0, -0.2, -0.5, -1.0, -3.0], dtype=torch.float64)
V, K, LENGTH, SEQUENCES = 10, 4, 3, 6_000
PROMPT = [3]


def logits_after(context: list[int]) -> torch.Tensor:
    return LOGITS.roll(3 * context[-1])


def top(context: list[int], k: int) -> list[tuple[int, float]]:
    logprobs = logits_after(context).log_softmax(0)
    return [(t, float(logprobs[t])) for t in logprobs.argsort(descending=True)[:k].tolist()]


class FakeBase:
    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0
        self.drafted = 0

    def token(self, context: list[int], temperature: float, banned=()) -> int:
        logits = logits_after(context).clone()
        logits[list(banned)] = -math.inf
        if temperature == 0:
            return int(logits.argmax())
        return int(torch.multinomial((logits / temperature).softmax(0), 1, generator=self.generator))

    def draft(self, context: list[int], n: int, temperature: float) -> list[Draw]:
        self.calls += 1
        self.drafted += n
        out = []
        for _ in range(n):
            token = self.token(context, temperature)
            out.append(Draw(token, float(logits_after(context).log_softmax(0)[token]), top(context, K)))
            context = context + [token]
        return out

    def banned(self, context: list[int], temperature: float) -> Draw:
        self.calls += 1
        token = self.token(context, temperature, [t for t, _ in top(context, K)])
        return Draw(token, float(logits_after(context).log_softmax(0)[token]), top(context, 1))


def steering(kind: str):
    """bonus(context) -> [K] or None."""
    if kind == "none":
        return lambda context: None
    if kind == "raise":
        return lambda context: RAISE
    if kind == "lower":
        return lambda context: LOWER
    return lambda context: RAISE if context[-1] % 2 == 0 else LOWER


def vas_probs(context: list[int], bonus, temperature: float = 1.0, restrict: bool = False) -> torch.Tensor:
    steered = logits_after(context).clone()
    candidates = [t for t, _ in top(context, K)]
    if bonus is not None:
        steered[candidates] += bonus
    if restrict:
        outside = torch.ones(V, dtype=torch.bool)
        outside[candidates] = False
        steered[outside] = -math.inf
    return (steered / temperature).softmax(0)


def generate(base: FakeBase, bonus_of, temperature: float, length: int, draft_len: int, generator,
             restrict: bool = False) -> tuple[list[int], int]:
    """One sequence of `length` tokens in rounds of draft and verify; and the accepted drafted tokens."""
    context = list(PROMPT)
    accepted_total = 0

    async def rounds():
        nonlocal context, accepted_total
        while len(context) - len(PROMPT) < length:
            n = min(draft_len, length - (len(context) - len(PROMPT)))
            draft = base.draft(context, n, temperature)
            prefix = [context + [d.token for d in draft[:i]] for i in range(n)]

            async def tail(i: int) -> Draw:
                return base.banned(prefix[i], temperature)

            steps, accepted = await verify(draft, K, [bonus_of(p) for p in prefix], temperature, restrict,
                                           generator, tail)
            assert [s.token for s in steps[:accepted]] == [d.token for d in draft[:accepted]]
            assert len(steps) == accepted + (accepted < n)
            context = context + [s.token for s in steps]
            accepted_total += accepted

    asyncio.run(rounds())
    return context[len(PROMPT):][:length], accepted_total


def exact_joint(bonus_of, restrict: bool = False) -> torch.Tensor:
    """VAS's law of the first three tokens, [V, V, V]."""
    joint = torch.zeros(V, V, V, dtype=torch.float64)
    for a, b in itertools.product(range(V), repeat=2):
        p_a = vas_probs(PROMPT, bonus_of(PROMPT), restrict=restrict)[a]
        p_b = vas_probs(PROMPT + [a], bonus_of(PROMPT + [a]), restrict=restrict)[b]
        joint[a, b] = p_a * p_b * vas_probs(PROMPT + [a, b], bonus_of(PROMPT + [a, b]), restrict=restrict)
    return joint


@pytest.mark.parametrize("kind", ["raise", "lower", "alternate"])
def test_drafted_sequences_follow_vas_over_several_positions(kind):
    base, generator = FakeBase(0), torch.Generator().manual_seed(1)
    bonus_of = steering(kind)
    sequences, accepted = [], 0
    for _ in range(SEQUENCES):
        tokens, a = generate(base, bonus_of, 1.0, LENGTH, LENGTH, generator)
        sequences.append(tokens)
        accepted += a
    joint = exact_joint(bonus_of)
    pairs = [a * V + b for a, b, _ in sequences]
    p_pairs = goodness_of_fit_p(pairs, joint.sum(2).reshape(-1))
    p_third = goodness_of_fit_p([c for _, _, c in sequences], joint.sum((0, 1)))
    assert p_pairs > 1e-4 and p_third > 1e-4, (p_pairs, p_third)
    # The test sees rejections, residual tail draws (lowering steering) and multi-token rounds.
    assert 0 < accepted < SEQUENCES * LENGTH
    assert base.calls < SEQUENCES * LENGTH
    tail_tokens = sum(t not in [c for c, _ in top(PROMPT, K)] for t, _, _ in sequences)
    assert tail_tokens > 0


def test_restricted_drafts_stay_among_the_candidates():
    base, generator = FakeBase(2), torch.Generator().manual_seed(3)
    bonus_of = steering("lower")
    sequences = [generate(base, bonus_of, 1.0, LENGTH, LENGTH, generator, restrict=True)[0]
                 for _ in range(SEQUENCES)]
    joint = exact_joint(bonus_of, restrict=True)
    assert goodness_of_fit_p([a * V + b for a, b, _ in sequences], joint.sum(2).reshape(-1)) > 1e-4
    assert goodness_of_fit_p([c for _, _, c in sequences], joint.sum((0, 1))) > 1e-4


def test_unsteered_drafts_are_accepted_whole_in_ceil_tokens_over_n_calls():
    base, generator = FakeBase(4), torch.Generator().manual_seed(5)
    tokens, accepted = generate(base, steering("none"), 1.0, 10, 4, generator)
    assert accepted == 10 and base.calls == 3  # ceil(10 / 4)


@pytest.mark.parametrize("kind", ["none", "raise", "lower", "alternate"])
def test_greedy_drafts_give_vas_greedy_tokens(kind):
    """T = 0: the tokens equal sampling.steered_step's greedy choice, one position at a time."""
    bonus_of = steering(kind)
    want = list(PROMPT)
    for _ in range(8):
        base = FakeBase(0)

        async def redraw(banned: bool, context=list(want)) -> Draw:
            return base.banned(context, 0.0)

        first = Draw(base.token(want, 0.0), 0.0, top(want, K))
        step = asyncio.run(steered_step(first, K, bonus_of(want), 0.0, False, torch.Generator(), redraw))
        want.append(step.token)
    base = FakeBase(0)
    got, _ = generate(base, bonus_of, 0.0, 8, 4, torch.Generator())
    assert got == want[len(PROMPT):]
    if kind == "none":
        assert base.calls == 2


def test_drafting_is_refused_where_it_is_not_exact():
    assert drafts_at(0.0) and drafts_at(1.0) and not drafts_at(0.7)
    with pytest.raises(ValueError, match="not exact"):
        asyncio.run(verify([], K, [], 0.7, False, torch.Generator(), None))


def test_the_draft_length_follows_acceptance_within_its_cap():
    length = DraftLength(8)
    assert length.next() == 8  # before any observation
    length.observe(100, 95)
    assert length.next() == 8
    length = DraftLength(8)
    length.observe(100, 50)
    assert length.next() == 2
    length.observe(1000, 0)
    assert length.next() == 1
    assert DraftLength(1).next() == 1 and DraftLength(5, adaptive=False).next() == 5
