"""Value heads on a trunk's final hidden state (docs/VAS_RULE.md §1.2), one class per kind.

A head kind owns everything that differs between kinds: the tensors it saves and their shapes,
how it values candidates, and what it reads to do so. Every other module goes through
`KINDS`, `HeadKind.values` and `HeadKind.reads_candidate_states`, so that adding a kind is one
class here (and its name in vas_server.core.format.HEAD_KINDS, the checkpoint format's list):
  * `StateHeads`: `V(x) = w . h_last(x) + b`. It values a candidate a by the trunk's state
    after it, h_last(s + [a]): the trunk must run on every candidate, so it needs a trunk of
    its own (the separate runtime) and cannot use the base's hidden states.
  * `TokenHeads`: `Q(s)[a] = c . h_last(s) + (P h_last(s)) . E[a] + bias[a]`, where E is the
    trunk's own embedding matrix (tied, not stored), P a [H, H] projection, bias a per-token vector
    and c the state baseline. It reads the state at the context only, so one trunk position
    values all K candidates, and the base's own hidden states can be that state (the shared
    path). Only `(P h) . E[a]` needs E: the `Embedding` it is given computes those dot products,
    on the whole matrix (`DenseEmbedding`) or on a tensor-parallel rank's vocabulary shard
    (vas_server.engine.tp_heads.VocabShard). The baseline `c . h` is the same for every
    candidate, so centring (§1.3) removes it and it never changes sampling; it is there for
    training: it carries V(s), the part of the return that the state alone predicts, so that P
    and the bias learn what the token adds to it (the advantage) instead of absorbing the
    reward level of the contexts a token happens to occur in.

All heads of one kind in one value model are stacked, so that they share the trunk's forward and
are evaluated with one matmul per kind. Head values are in standardised reward units
(docs/VAS_RULE.md §2): weight 1.0 means one standard deviation of that head's training reward.

Saved tensors (heads.safetensors): "<name>.<tensor>", each kind's `SAVED` names with their
per-head shapes: "weight" [H] and "bias" [] for a state head, "proj" [H, H], "bias" [V] and
"baseline" [H] for a token head (a file without the baseline, written before it existed, loads
with a zero baseline: same centred values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

import torch
from torch import nn

from vas_server.core.format import HEAD_KINDS, HeadSpec


class Embedding(Protocol):
    """Where a trunk's embedding matrix E lives, for token heads."""

    def dots(self, projected: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(P h) . E[a]: projected [n, B, H], tokens [B, K] -> [n, B, K]."""


class DenseEmbedding:
    """E as one matrix [>= V, H] on this device.

    reuse_rows: gather the candidates' rows into one grow-only buffer, allocated at the largest
    B x K seen, instead of a fresh tensor every step (the server's path: on CPU a fresh [B, K, H]
    tensor, 38 MB at B = 64, K = 256 for SmolLM2, is page-faulted in anew and costs 4x the copy
    itself). Not under autograd: a buffer reused by the next call cannot be saved for backward."""

    def __init__(self, weight: torch.Tensor, reuse_rows: bool = False):
        self.weight = weight
        self.reuse_rows = reuse_rows
        self._rows: torch.Tensor | None = None

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """E[tokens] [*tokens.shape, H] (tokens index this matrix's rows)."""
        flat, w = tokens.reshape(-1), self.weight
        if not self.reuse_rows:
            return w.index_select(0, flat).view(*tokens.shape, -1)
        b = self._rows
        if b is None or b.shape[0] < flat.numel() or b.dtype != w.dtype or b.device != w.device:
            self._rows = b = torch.empty(flat.numel(), w.shape[1], dtype=w.dtype, device=w.device)
        return torch.index_select(w, 0, flat, out=b[:flat.numel()]).view(*tokens.shape, -1)

    def dots(self, projected: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # E may be the served base's own matrix, in the base's dtype (the shared path).
        return torch.einsum("nbg,bkg->nbk", projected, self.rows(tokens).to(projected.dtype))


@dataclass
class HeadInputs:
    """What heads read to value K candidates a at each of B contexts s (a kind reads its part)."""

    candidates: torch.Tensor  # [B, K] token ids
    context_states: torch.Tensor | None = None  # [B, H] h_last(s)
    candidate_states: torch.Tensor | None = None  # [B, K, H] h_last(s + [a]), for kinds that read them
    embedding: Embedding | None = None  # the trunk's E


class HeadKind(nn.Module):
    """The stacked heads of one kind in one value model."""

    kind: ClassVar[str]
    # Its value of a candidate reads h_last(s + [a]) (the trunk run on each candidate), rather than
    # h_last(s) alone.
    reads_candidate_states: ClassVar[bool]
    # saved tensor -> its per-head shape, as a function of (hidden size, vocabulary size); each
    # is the kind's parameter of that name, stacked over the heads [n, *shape].
    SAVED: ClassVar[dict[str, Callable[[int, int], tuple[int, ...]]]]
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()  # saved tensors an older file may lack (zeros)

    def __init__(self, names: list[str], hidden_size: int, vocab_size: int):
        super().__init__()
        self.names = list(names)
        for tensor, shape in self.SAVED.items():
            setattr(self, tensor, nn.Parameter(torch.zeros(len(names), *shape(hidden_size, vocab_size))))

    def values(self, inputs: HeadInputs) -> torch.Tensor:
        """The heads' values of the candidates: [n, B, K]."""
        raise NotImplementedError


class StateHeads(HeadKind):
    kind = "state"
    reads_candidate_states = True
    SAVED = {"weight": lambda H, V: (H,), "bias": lambda H, V: ()}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> values [..., n]."""
        return hidden @ self.weight.T + self.bias

    def values(self, inputs: HeadInputs) -> torch.Tensor:
        return self(inputs.candidate_states).permute(2, 0, 1)


class TokenHeads(HeadKind):
    kind = "token"
    reads_candidate_states = False
    SAVED = {"proj": lambda H, V: (H, H), "bias": lambda H, V: (V,), "baseline": lambda H, V: (H,)}
    OPTIONAL = frozenset({"baseline"})

    def forward(self, hidden: torch.Tensor, embedding: Embedding | torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Q(s)[a] for chosen tokens. hidden [B, H] (h_last(s)), embedding E (an Embedding, or
        the matrix [V, H]), tokens [B, K] -> values [n, B, K]."""
        if isinstance(embedding, torch.Tensor):
            embedding = DenseEmbedding(embedding)
        projected = torch.einsum("bh,nhg->nbg", hidden, self.proj)  # P h_last(s), per head
        baseline = (hidden @ self.baseline.T).T[:, :, None]  # [n, B, 1]
        return embedding.dots(projected, tokens) + self.bias[:, tokens] + baseline

    def values(self, inputs: HeadInputs) -> torch.Tensor:
        return self(inputs.context_states, inputs.embedding, inputs.candidates)


# Every kind, in the order a value model's heads take (state heads first). A name is a ModuleDict key
# of ValueHeads.kinds, so it cannot be an nn.Module attribute ("double", "train", ...).
KINDS: dict[str, type[HeadKind]] = {cls.kind: cls for cls in (StateHeads, TokenHeads)}
assert tuple(KINDS) == HEAD_KINDS, "a head kind's name belongs in core.format.HEAD_KINDS too"


class ValueHeads(nn.Module):
    """A value model's heads: one stacked module per kind (`kinds`), in KINDS order."""

    def __init__(self, specs: list[HeadSpec], hidden_size: int, vocab_size: int):
        super().__init__()
        self.specs = list(specs)
        self.kinds = nn.ModuleDict({kind: cls([h.name for h in specs if h.kind == kind], hidden_size, vocab_size)
                                    for kind, cls in KINDS.items()})

    @property
    def state(self) -> StateHeads:
        return self.kinds["state"]

    @property
    def token(self) -> TokenHeads:
        return self.kinds["token"]

    @property
    def names(self) -> list[str]:
        """Every head, kind by kind: the order of `values`' rows."""
        return [name for heads in self.kinds.values() for name in heads.names]

    @property
    def used(self) -> list[HeadKind]:
        """The kinds this model has heads of."""
        return [heads for heads in self.kinds.values() if heads.names]

    @property
    def reads_candidate_states(self) -> bool:
        return any(heads.reads_candidate_states for heads in self.used)

    def values(self, inputs: HeadInputs) -> torch.Tensor:
        """Every head's values of the candidates: [n_heads, B, K], in `names` order."""
        parts = [heads.values(inputs) for heads in self.used]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{tensor}": getattr(heads, tensor)[i]
                for heads in self.kinds.values() for i, name in enumerate(heads.names) for tensor in heads.SAVED}

    @classmethod
    def from_tensors(cls, specs: list[HeadSpec], tensors: dict[str, torch.Tensor], hidden_size: int,
                     vocab_size: int) -> "ValueHeads":
        value_heads = cls(specs, hidden_size, vocab_size)
        with torch.no_grad():
            for heads in value_heads.kinds.values():
                for i, name in enumerate(heads.names):
                    for tensor, shape in heads.SAVED.items():
                        key = f"{name}.{tensor}"
                        if key in tensors or tensor not in heads.OPTIONAL:
                            getattr(heads, tensor)[i].copy_(_get(tensors, key, shape(hidden_size, vocab_size)))
        return value_heads


def _get(tensors: dict[str, torch.Tensor], key: str, shape: tuple) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"heads.safetensors has no tensor {key!r}")
    t = tensors[key]
    if tuple(t.shape) != shape:
        raise ValueError(f"heads.safetensors: {key!r} has shape {tuple(t.shape)}, expected {shape}")
    return t
