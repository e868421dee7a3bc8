"""Value heads on a trunk's final hidden state (docs/VAS_RULE.md §1.2).

All heads of one value model live in one `ValueHeads` module so that they share the trunk's
forward and are evaluated with one matmul per kind:
  * state heads: `V(x) = w . h_last(x) + b`, stacked as `state_weight` [n_state, H];
  * token heads: `Q(s)[a] = c . h_last(s) + (P h_last(s)) . E[a] + bias[a]`, where E is the
    trunk's own embedding matrix (tied, not stored), P a [H, H] projection, bias a per-token vector
    and c the state baseline (`token_baseline`). Only c, P and the bias are saved, so token heads
    stay small on disk. The baseline `c . h` is the same for every candidate, so centring (§1.3) removes it and it
    never changes sampling; it is there for training: it carries V(s), the part of the return
    that the state alone predicts, so that P and the bias learn what the token adds to it (the
    advantage) instead of absorbing the reward level of the contexts a token happens to occur in.

Head values are in standardised reward units (docs/VAS_RULE.md §2): weight 1.0 means one standard
deviation of that head's training reward.

Saved tensors (heads.safetensors): "<name>.weight" [H] and "<name>.bias" [] for a state head,
"<name>.proj" [H, H], "<name>.bias" [V] and "<name>.baseline" [H] for a token head (a file without
the baseline, written before it existed, loads with a zero baseline: same centred values).
"""

from __future__ import annotations

import torch
from torch import nn

from vas_server.core.format import HeadSpec


class ValueHeads(nn.Module):
    def __init__(self, specs: list[HeadSpec], hidden_size: int, vocab_size: int):
        super().__init__()
        self.specs = list(specs)
        self.state_names = [h.name for h in specs if h.kind == "state"]
        self.token_names = [h.name for h in specs if h.kind == "token"]
        self.state_weight = nn.Parameter(torch.zeros(len(self.state_names), hidden_size))
        self.state_bias = nn.Parameter(torch.zeros(len(self.state_names)))
        self.token_proj = nn.Parameter(torch.zeros(len(self.token_names), hidden_size, hidden_size))
        self.token_bias = nn.Parameter(torch.zeros(len(self.token_names), vocab_size))
        self.token_baseline = nn.Parameter(torch.zeros(len(self.token_names), hidden_size))

    @property
    def names(self) -> list[str]:
        return self.state_names + self.token_names

    def state_values(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> values [..., n_state]."""
        return hidden @ self.state_weight.T + self.state_bias

    def token_values(self, hidden: torch.Tensor, embed: torch.Tensor, tokens: torch.Tensor,
                     rows_out: torch.Tensor | None = None) -> torch.Tensor:
        """Q(s)[a] for chosen tokens. hidden [B, H] (last position of s), embed [V, H],
        tokens [B, K] -> values [n_token, B, K].

        rows_out: optional buffer ([>= B*K, H], embed's dtype) for the tokens' embedding rows. The
        server passes a preallocated one: on CPU a fresh [B, K, H] tensor each step (38 MB at
        B = 64, K = 256 for SmolLM2) is page-faulted in anew and costs 4x the copy itself."""
        projected = torch.einsum("bh,nhg->nbg", hidden, self.token_proj)  # P h_last(s), per head
        baseline = (hidden @ self.token_baseline.T).T[:, :, None]  # [n_token, B, 1]
        flat = tokens.reshape(-1)
        rows = (embed.index_select(0, flat) if rows_out is None
                else torch.index_select(embed, 0, flat, out=rows_out[:flat.numel()]))
        # embed may be the served base's own matrix, in the base's dtype (the shared-trunk path).
        rows = rows.view(*tokens.shape, -1).to(projected.dtype)
        return torch.einsum("nbg,bkg->nbk", projected, rows) + self.token_bias[:, tokens] + baseline

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, name in enumerate(self.state_names):
            out[f"{name}.weight"] = self.state_weight[i]
            out[f"{name}.bias"] = self.state_bias[i]
        for i, name in enumerate(self.token_names):
            out[f"{name}.proj"] = self.token_proj[i]
            out[f"{name}.bias"] = self.token_bias[i]
            out[f"{name}.baseline"] = self.token_baseline[i]
        return out

    @classmethod
    def from_tensors(cls, specs: list[HeadSpec], tensors: dict[str, torch.Tensor], hidden_size: int,
                     vocab_size: int) -> "ValueHeads":
        heads = cls(specs, hidden_size, vocab_size)
        with torch.no_grad():
            for i, name in enumerate(heads.state_names):
                heads.state_weight[i].copy_(_get(tensors, f"{name}.weight", (hidden_size,)))
                heads.state_bias[i].copy_(_get(tensors, f"{name}.bias", ()))
            for i, name in enumerate(heads.token_names):
                heads.token_proj[i].copy_(_get(tensors, f"{name}.proj", (hidden_size, hidden_size)))
                heads.token_bias[i].copy_(_get(tensors, f"{name}.bias", (vocab_size,)))
                if f"{name}.baseline" in tensors:
                    heads.token_baseline[i].copy_(_get(tensors, f"{name}.baseline", (hidden_size,)))
        return heads


def _get(tensors: dict[str, torch.Tensor], key: str, shape: tuple) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"heads.safetensors has no tensor {key!r}")
    t = tensors[key]
    if tuple(t.shape) != shape:
        raise ValueError(f"heads.safetensors: {key!r} has shape {tuple(t.shape)}, expected {shape}")
    return t
