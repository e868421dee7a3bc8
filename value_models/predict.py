"""Values of a saved value model at the states of samples, computed the way the server loads it
(vas_server.core.model / vas_server.core.trunk), for evaluation and for round-trip tests."""

from __future__ import annotations

from typing import Sequence

import torch

from vas_server.core.model import ValueModel
from value_models.states import gather_states, head_values, make_batch


@torch.no_grad()
def state_values(model: ValueModel, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                 batch_size: int = 16, reward_units: bool = True) -> list[torch.Tensor]:
    """Per sample, values [n_heads, T] at s_0..s_{T-1}, heads in `model.value_heads.names` order.
    `reward_units`: undo the standardisation (value * std + mean), else standardised units."""
    specs = {h.name: h for h in model.spec.heads}
    scale = torch.tensor([specs[n].reward_std for n in model.value_heads.names])[:, None]
    shift = torch.tensor([specs[n].reward_mean for n in model.value_heads.names])[:, None]
    embed = model.trunk.embed_tokens.weight
    out: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        batch = make_batch(prompts[start:start + batch_size], responses[start:start + batch_size])
        hidden = model.trunk.forward_causal(batch.tokens)
        values = head_values(model.value_heads, gather_states(hidden, batch.positions), embed, batch.next_tokens).float()
        for b in range(values.shape[1]):
            v = values[:, b, :int(batch.lengths[b])]
            out.append(v * scale + shift if reward_units else v)
    return out
