"""TD(λ) targets for value training (docs/VAS_RULE.md §2).

A response of T tokens gives states s_0..s_{T-1}. The only reward is the response's scalar reward,
given at the last step (i = T-1), and the value after the end is 0. With the current values v_i:
    delta_i = r_i + γ v_{i+1} - v_i
    A_i     = delta_i + γ λ A_{i+1}        (A_T = 0)
    G_i     = A_i + v_i
λ = 1 gives Monte-Carlo targets (the reward everywhere when γ = 1); λ = 0 gives one-step targets.

`value_loss` is what the values are fitted to the targets with: the spec's squared error (the value
becomes the mean return, the base policy's value), or its soft form (the value becomes the
KL-regularised optimum's value, for steering at one weight).
"""

from __future__ import annotations

import torch

DEFAULT_LAMBDA = 0.95
DEFAULT_GAMMA = 1.0


def td_lambda_returns(values: torch.Tensor, rewards: torch.Tensor, lengths: torch.Tensor, *,
                      lam: float = DEFAULT_LAMBDA, gamma: float = DEFAULT_GAMMA) -> torch.Tensor:
    """TD(λ) returns for a right-padded batch.

    values [B, T_max] (v_i of each sequence; entries at i >= length are ignored), rewards [B]
    (the terminal reward), lengths [B] (number of states T of each sequence, >= 1).
    Returns G [B, T_max], with 0 at padded positions. No gradient flows through the result.
    """
    values = values.detach()
    B, T_max = values.shape
    steps = torch.arange(T_max, device=values.device)
    valid = steps[None, :] < lengths[:, None]
    v = torch.where(valid, values, torch.zeros_like(values))
    is_last = steps[None, :] == (lengths[:, None] - 1)
    r = torch.where(is_last, rewards[:, None].to(values.dtype), torch.zeros_like(values))
    returns = torch.zeros_like(values)
    advantage = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    for i in reversed(range(T_max)):
        delta = r[:, i] + gamma * next_value - v[:, i]
        # Padded steps contribute nothing: their advantage is reset so it cannot leak backwards.
        advantage = torch.where(valid[:, i], delta + gamma * lam * advantage, torch.zeros_like(advantage))
        returns[:, i] = advantage + v[:, i]
        next_value = v[:, i]
    return torch.where(valid, returns, torch.zeros_like(returns))


def value_loss(values: torch.Tensor, targets: torch.Tensor, soft_beta: float = 0.0) -> torch.Tensor:
    """Per-state loss of values against (detached) targets, elementwise.

    soft_beta = 0: the spec's 0.5 (G - v)^2, minimised by v = E[G], the base policy's value Q^p0.
    soft_beta = β != 0: (exp(β e) - 1 - β e) / β^2 with e = G - v, whose β -> 0 limit is the
    squared error. Its gradient in v is -(exp(β e) - 1) / β, zero on average where
    E[exp(β (G - v))] = 1, so the minimiser is the soft value v = (1/β) log E[exp(β G)]. With
    Monte-Carlo targets (λ = 1) on base samples, a token head then learns
    Q*(s, a) = (1/β) log E_p0[exp(β r) | s, a], and steering with exp(β Q*) (VAS at weight β, all
    candidates) samples the optimum of E[r] - KL(p || p0) / β exactly (the soft Bellman equation),
    where Q^p0 is its first-order approximation. β > 0 is in standardised reward units, like a
    weight: a head trained with β is meant to steer at weight β.
    """
    error = targets - values
    if soft_beta == 0.0:
        return 0.5 * error ** 2
    x = soft_beta * error
    return (torch.expm1(x) - x) / soft_beta ** 2
