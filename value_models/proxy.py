"""The steering proxy: how much reward a value model's steering buys per unit of KL, measured on
base responses alone, without generating with VAS (docs/TRAINING.md).

For a head at weight w, VAS's log-ratio to the base along a response y is
sum_i (w c_i(y_i) - log Z_i), c_i the values of step i's candidates C centred as the processor
centres them (vas_server.core.rule.centred), 0 outside C. To first order in w the reward gain is
w Cov(S, r) and the KL w^2/2 E[sum_i Var_p0(c_i)], with S = sum_i (c_i(y_i) - E_p0 c_i) and y drawn
from the base p0. So corr(S, r) ranks value models by how much reward they buy per unit of KL (an
exact value function gives S = r - V(s_0), a correlation near 1), and `gain_at_kl` is the
first-order gain at a given KL. Used by `benchmarks/steering_proxy.py` and by `fit`'s held-out
validation.
"""

from __future__ import annotations

import math

import torch

from vas_server.core import rule


class ProxySums:
    """Per response and head: S and sum_i Var_p0(c_i), added up one batch of steps at a time."""

    def __init__(self, responses: int, heads: int):
        self.s = torch.zeros(responses, heads, dtype=torch.float64)
        self.var = torch.zeros(responses, heads, dtype=torch.float64)

    def add(self, responses: torch.Tensor, values: torch.Tensor, candidates: torch.Tensor, logp0: torch.Tensor,
            chosen: torch.Tensor) -> None:
        """B steps: step b belongs to response responses[b] (several steps of one response may share
        a batch), has candidates [B, K] with raw base log-probs logp0 [B, K] and their values of every
        head [B, heads, K], and sampled token chosen [B]."""
        p0 = logp0.double().exp()[:, None, :]
        c = rule.centred(values.double())  # [B, heads, K]
        # c is 0 outside the candidates, so sums over them are expectations under the whole p0.
        mean_c, mean_c2 = (p0 * c).sum(-1), (p0 * c * c).sum(-1)
        c_chosen = (c * (candidates == chosen[:, None])[:, None, :]).sum(-1)  # 0 when y_i is no candidate
        self.s.index_add_(0, responses, c_chosen - mean_c)
        self.var.index_add_(0, responses, mean_c2 - mean_c ** 2)

    def corr(self, head: int, rewards: torch.Tensor) -> float:
        """corr(S, r) over the responses; rewards [responses]."""
        return correlation(self.s[:, head], rewards.double())

    def summary(self, head: int, rewards: torch.Tensor, kl: float) -> dict[str, float]:
        """corr(S, r), the first-order reward gain at KL `kl` (nats) and the weight that spends it."""
        s, r, mean_var = self.s[:, head], rewards.double(), self.var[:, head].mean()
        cov = ((s - s.mean()) * (r - r.mean())).mean()
        return {"corr": correlation(s, r),
                "gain_at_kl": float(cov / mean_var.sqrt() * math.sqrt(2 * kl)),
                "weight_at_kl": float(math.sqrt(2 * kl / mean_var))}


def correlation(s: torch.Tensor, r: torch.Tensor) -> float:
    """Pearson's correlation; 0 when S never varies (a head that prefers no candidate, e.g. one
    still at its zero initialisation, buys no reward: its gain Cov(S, r) is 0)."""
    s_std, r_std = s.std(unbiased=False), r.std(unbiased=False)
    if not (s_std > 0 and r_std > 0):
        return 0.0
    return float(((s - s.mean()) * (r - r.mean())).mean() / (s_std * r_std))
