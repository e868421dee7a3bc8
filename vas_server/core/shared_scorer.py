"""A value model on the served base's own first layers (the shared path): no trunk, no cache."""

from __future__ import annotations

import torch

from vas_server.core.heads import HeadInputs, ValueHeads
from vas_server.core.scorer import StepInputs, ValueRow


class SharedScorer:
    """Context-reading heads (token heads) on the base's first `layer` layers, without LoRA: the
    trunk state is the base's own (`tap`, a vas_server.engine.hidden_states.HiddenStateTap), so it
    keeps nothing per request and a step costs the heads' matmul and gather. It reads
    `step.batch_rows`, where each row's state sits in this step's logits (Scorer)."""

    keeps_cache = False
    cache_bytes = 0
    max_cache_bytes = 0

    def __init__(self, name: str, value_heads: ValueHeads, layer: int, tap):
        if value_heads.reads_candidate_states:
            kinds = ", ".join(h.kind for h in value_heads.used if h.reads_candidate_states)
            raise ValueError(f"value model {name!r}: the shared-trunk path cannot serve {kinds} heads, which read "
                             "each candidate's own trunk state")
        self.name = name
        self.value_heads = value_heads
        self.layer = layer
        self.tap = tap
        self.dtype = next(value_heads.parameters()).dtype

    def reset(self, cache_slot: int) -> None:
        pass

    def advance(self, rows: list[ValueRow], step: StepInputs) -> None:
        pass  # the base's forward feeds the tap

    @torch.inference_mode()
    def score(self, rows: list[ValueRow], candidates: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """Scorer.score: the state of row b is the tap's row step.batch_rows[b]."""
        states = self.tap.states(self.layer, step.num_rows)
        hidden = states.index_select(0, step.batch_rows.to(states.device))
        hidden = hidden.to(device=candidates.device, dtype=self.dtype)
        # The tap's embedding is, under tensor parallelism, this rank's vocabulary shard.
        return self.value_heads.values(HeadInputs(candidates, context_states=hidden, embedding=self.tap.embedding))

    def score_drafts(self, rows, drafts, candidates):
        raise ValueError("drafted positions are scored on separate trunks only")

    def commit_draft(self, cache_slot: int, accepted: int) -> None:
        pass
