"""The sampling rule (vas_server.core.rule, docs/VAS_RULE.md §1) against hand-worked numbers."""

from __future__ import annotations

import math

import torch

from vas_server.core import rule


def test_bonus_is_the_weighted_centred_value():
    values = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]]])  # one row, heads h0 and h1, 3 candidates
    weights = torch.tensor([2.0, -1.0])
    # h0 centred: -1, 0, 1 (x2); h1 centred: -1, -1, 2 (x-1)
    assert rule.bonus(values, weights).tolist() == [[-1.0, 1.0, 0.0]]


def test_only_valid_candidates_count():
    values = torch.tensor([[[1.0, 3.0, 100.0]]])
    valid = torch.tensor([[True, True, False]])
    assert rule.bonus(values, torch.tensor([1.0]), valid).tolist() == [[-1.0, 1.0, 0.0]]


def test_weight_vector_places_weights_by_head_index():
    assert rule.weight_vector({"b": 2.0}, {"a": 0, "b": 1, "c": 2}).tolist() == [0.0, 2.0, 0.0]


def test_bonus_is_finite_whatever_the_values():
    values = torch.tensor([[[math.inf, 0.0], [math.nan, 1.0]], [[3e38, -3e38], [0.0, 1.0]]])
    b = rule.bonus(values, torch.tensor([100.0, 100.0]))
    assert torch.isfinite(b).all() and b.abs().max() <= rule.MAX_BONUS


def test_add_bonus_adds_the_bonus_to_candidates_and_restricts():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0], [0.0, 5.0, 1.0, 4.0]])
    candidates = torch.tensor([[1, 3], [1, 3]])
    b = torch.tensor([[-2.0, 2.0], [-2.0, 2.0]])
    valid = torch.tensor([[True, True], [True, False]])
    out = rule.add_bonus_(logits.clone(), candidates, b, valid, torch.tensor([False, True]))
    assert out[0].tolist() == [0.0, 3.0, 1.0, 6.0]  # unrestricted: the rest keeps its logits
    assert out[1].tolist() == [-math.inf, 3.0, -math.inf, -math.inf]  # restricted to its one valid candidate
    # No restricted row (restrict None): the same as an all-False mask; the logits are steered in place.
    unrestricted = rule.add_bonus_(logits, candidates, b, valid, None)
    assert unrestricted is logits and logits[0].tolist() == [0.0, 3.0, 1.0, 6.0]
    assert logits[1].tolist() == [0.0, 3.0, 1.0, 4.0]  # its invalid candidate keeps its logit
