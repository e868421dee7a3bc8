"""From (prompt, response) token ids to the states of docs/VAS_RULE.md §2 and their head values.

A response y of T tokens after prompt x gives the states s_i = x + y[:i], i = 0..T-1. Both head
kinds read the trunk's final hidden state at the last position of s_i, which is position
len(x) - 1 + i of the sequence x + y:
  * state head: V(s_i) = head(hidden there);
  * token head: Q(s_i)[y_i] = token head(hidden there) at the token y_i that followed.
So one causal pass over x + y[:-1] (the last response token is never an input) serves every
state, and training and serving read the very same positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from vas_server.core.heads import ValueHeads


@dataclass
class StateBatch:
    tokens: torch.Tensor  # [B, L] inputs x + y[:-1], right-padded
    positions: torch.Tensor  # [B, T] position of the last token of s_i (0 where padded)
    next_tokens: torch.Tensor  # [B, T] y_i (0 where padded)
    lengths: torch.Tensor  # [B] T of each sequence
    mask: torch.Tensor  # [B, T] True at real states


def make_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int = 0) -> StateBatch:
    if any(len(p) == 0 for p in prompts) or any(len(r) == 0 for r in responses):
        raise ValueError("every sample needs a non-empty prompt and a non-empty response")
    inputs = [list(p) + list(r)[:-1] for p, r in zip(prompts, responses, strict=True)]
    B, L, T = len(inputs), max(map(len, inputs)), max(map(len, responses))
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    next_tokens = torch.zeros(B, T, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        tokens[b, :len(inputs[b])] = torch.tensor(inputs[b])
        positions[b, :len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
        next_tokens[b, :len(r)] = torch.tensor(list(r))
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return StateBatch(tokens, positions, next_tokens, lengths, mask)


def gather_states(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, H], positions [B, T] -> hidden at the states [B, T, H]."""
    return torch.gather(hidden, 1, positions[..., None].expand(-1, -1, hidden.shape[-1]))


def head_values(value_heads: ValueHeads, state_hidden: torch.Tensor, embed: torch.Tensor,
                next_tokens: torch.Tensor) -> torch.Tensor:
    """Values of every head at every state, in `value_heads.names` order: [n_heads, B, T]
    (standardised reward units)."""
    B, T, H = state_hidden.shape
    parts = []
    if value_heads.state.names:
        parts.append(value_heads.state(state_hidden).permute(2, 0, 1))
    if value_heads.token.names:
        flat = value_heads.token(state_hidden.reshape(B * T, H), embed, next_tokens.reshape(B * T, 1))
        parts.append(flat.reshape(len(value_heads.token.names), B, T))
    return torch.cat(parts, dim=0)
