"""The VAS sampling rule (docs/VAS_RULE.md §1, steps 2-4) as pure tensor functions.

The processor steers with them, and the evaluation (exact KL of the steered policy) and the
steering-proxy benchmark replay them, so the three can never disagree. Shapes: B rows, H heads,
K candidates per row (row b uses its first k_b; `valid[b, j]` says whether candidate j counts).
"""

from __future__ import annotations

from typing import Mapping

import torch

# Largest value bonus, in logits, that the rule adds to a candidate. Weights are bounded
# (params.MAX_ABS_WEIGHT) and values are in reward standard deviations, so real bonuses are far
# smaller; the clip only guarantees that no value model, however broken, makes a logit infinite.
MAX_BONUS = 1e4


def weight_vector(weights: Mapping[str, float], head_index: Mapping[str, int], *,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """[H]: each head's weight at its index, 0 for heads the request does not weight."""
    vector = torch.zeros(len(head_index), dtype=dtype, device=device)
    for name, w in weights.items():
        vector[head_index[name]] = w
    return vector


def centred(values: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """§1.3: values [B, H, K] minus their mean over each row's valid candidates; 0 where invalid."""
    if valid is None:
        return values - values.mean(-1, keepdim=True)
    mask = valid[:, None, :].to(values.dtype)
    mean = (values * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)
    return (values - mean) * mask


def bonus(values: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """§1.4: the logit bonus sum_h w_h c_h(a), [B, K], from values [B, H, K] and weights [B, H]
    or [H]. Always finite: a non-finite value contributes 0 and the sum is clipped to MAX_BONUS."""
    total = (centred(values, valid) * weights[..., :, None]).sum(-2)
    return torch.nan_to_num(total, nan=0.0, posinf=0.0, neginf=0.0).clamp(-MAX_BONUS, MAX_BONUS)


def add_bonus_(row_logits: torch.Tensor, candidates: torch.Tensor, row_bonus: torch.Tensor, valid: torch.Tensor,
              restrict: torch.Tensor | None) -> torch.Tensor:
    """§1.4, in place: row_logits [B, V] become the steered logits of B rows (and are returned).
    candidates [B, K] with bonus and validity [B, K]; restrict [B] bool, or None when no row is
    restricted: outside its candidates a restricted row is -inf, an unrestricted one keeps its
    logits. In place because a step's logits are [B, V]: each extra copy of them cost more than
    the value heads themselves (measured at batch 64 on a 2-core CPU)."""
    base = row_logits.gather(1, candidates)
    if restrict is None:
        outside = base
    else:
        row_logits.masked_fill_(restrict[:, None], float("-inf"))
        outside = row_logits.gather(1, candidates)
    return row_logits.scatter_(1, candidates, torch.where(valid, base + row_bonus, outside))
