"""The batched value runtime: every value model of the server, their heads in one global order,
and the cache slots of separate trunks. It values the top-K candidates of every VAS row with one
forward per value model (docs/VAS_RULE.md §1.2).

Two kinds of value model (vas_server.config.runtime_path decides from vas.json), both Scorers
(vas_server.core.scorer):
  * "separate" (vas_server.core.trunk_scorer.TrunkScorer): the model's own trunk and a per-request
    value cache (vas_server.core.value_cache); a row using one of its heads takes a cache slot;
  * "shared" (vas_server.core.shared_scorer.SharedScorer): context-reading heads on a LoRA-free
    prefix of the base, read from the base's own hidden states: no trunk, no cache, no slot.

Invariants:
  * The global head order is the scorers' order, each scorer's heads in its `value_heads.names`
    order: scorer t's heads are the contiguous range `head_ranges[t]`.
  * A cache slot is taken by `allocate` and given back by `release`; each scorer resets it both
    times.
"""

from __future__ import annotations

import torch

from vas_server.core.device import to_device
from vas_server.core.model import ValueModel
from vas_server.core.scorer import NewTokens, Scorer, StepInputs, ValueRow, list_new_tokens
from vas_server.core.shared_scorer import SharedScorer
from vas_server.core.trunk_scorer import TrunkScorer


class ValueRuntime:
    """`models` run on their own trunk (TrunkScorer, value cache of max_requests slots); `shared`
    are shared-trunk models (SharedScorer). Only rows using a separate-trunk head take a slot."""

    def __init__(self, models: list[ValueModel], max_requests: int, max_len: int, device, dtype,
                 shared: list[SharedScorer] = ()):
        self.scorers: list[Scorer] = [TrunkScorer(m, max_requests, max_len, device, dtype) for m in models]
        self.scorers += list(shared)
        self.head_names: list[str] = []
        self.head_ranges: list[slice] = []  # by scorer: its heads' global indices
        for scorer in self.scorers:
            start = len(self.head_names)
            self.head_names += scorer.value_heads.names
            self.head_ranges.append(slice(start, len(self.head_names)))
        if len(set(self.head_names)) != len(self.head_names):
            raise ValueError(f"head names must be unique across value models: {self.head_names}")
        self.head_index = {name: i for i, name in enumerate(self.head_names)}
        self.scorer_heads = [frozenset(range(r.start, r.stop)) for r in self.head_ranges]
        # Heads whose rows need a cache slot (those of separate-trunk models).
        self.cached_heads = frozenset(g for scorer, heads in zip(self.scorers, self.scorer_heads)
                                      if scorer.keeps_cache for g in heads)
        max_requests = max_requests if models else 0  # no separate trunk: no slots, no cache
        self.max_requests = max_requests
        self.max_len = max_len
        self.device = torch.device(device)
        self.free_cache_slots = list(range(max_requests - 1, -1, -1))

    @property
    def cache_slots_in_use(self) -> int:
        return self.max_requests - len(self.free_cache_slots)

    @property
    def cache_bytes(self) -> int:
        return sum(r.cache_bytes for r in self.scorers)

    @property
    def max_cache_bytes(self) -> int:
        return sum(r.max_cache_bytes for r in self.scorers)

    def needs_cache_slot(self, head_ids: frozenset[int]) -> bool:
        return bool(head_ids & self.cached_heads)

    def allocate(self) -> int | None:
        """A free cache slot, or None when all are taken."""
        if not self.free_cache_slots:
            return None
        cache_slot = self.free_cache_slots.pop()
        for r in self.scorers:
            r.reset(cache_slot)
        return cache_slot

    def release(self, cache_slot: int | None) -> None:
        if cache_slot is None:
            return
        for r in self.scorers:
            r.reset(cache_slot)
        self.free_cache_slots.append(cache_slot)

    def _members(self, rows: list[ValueRow]):
        """(scorer index, scorer, the indices of the rows that use its heads) for each scorer used."""
        for t, scorer in enumerate(self.scorers):
            members = [b for b, r in enumerate(rows) if r.head_ids & self.scorer_heads[t]]
            if members:
                yield t, scorer, members

    def advance(self, rows: list[ValueRow]) -> None:
        """Feed the rows' newly committed tokens (TokenLists) to the trunks they use, scoring
        nothing: a later `score` of these rows then runs only their candidates. Remote mode
        advances a row while the upstream computes its next candidates."""
        step = StepInputs(list_new_tokens(self.device))
        for _, scorer, members in self._members(rows):
            scorer.advance([rows[b] for b in members], step)

    def score(self, rows: list[ValueRow], candidates: torch.Tensor, batch_rows: torch.Tensor | None = None,
              num_rows: int = 0, new_tokens: NewTokens | None = None) -> torch.Tensor:
        """Values q_h(a) of each row's candidates: [B, n_heads, K] (0 for heads a row does not use).
        Shared-trunk heads need `batch_rows` [B] (each row's logits row in this step, of
        `num_rows` rows): that is where the base's hidden state of the row sits. Separate-trunk
        heads read the rows' committed tokens with `new_tokens` (default: TokenLists)."""
        B, K = candidates.shape
        step = StepInputs(new_tokens or list_new_tokens(candidates.device), batch_rows, num_rows)
        values = torch.zeros(B, len(self.head_names), K, device=candidates.device, dtype=torch.float32)
        for t, scorer, members in self._members(rows):
            sub = slice(None) if len(members) == B else to_device(torch.tensor(members), candidates.device)
            scored = scorer.score([rows[b] for b in members], candidates[sub], step.subset(sub))
            values[sub, self.head_ranges[t]] = scored.permute(1, 0, 2).float()
        return values

    def score_drafts(self, rows: list[ValueRow], drafts: list[list[int]],
                     candidates: list[torch.Tensor]) -> list[torch.Tensor]:
        """Values of each row's n drafted positions' candidates [n, K] (n and K per row), every
        committed token of which has been fed: per row [n, n_heads, K], in one forward per value
        model for all rows (Scorer.score_drafts: separate trunks only)."""
        values = [torch.zeros(c.shape[0], len(self.head_names), c.shape[1], device=c.device, dtype=torch.float32)
                  for c in candidates]
        for t, scorer, members in self._members(rows):
            scored = scorer.score_drafts([rows[b] for b in members], [drafts[b] for b in members],
                                         [candidates[b] for b in members])
            for b, v in zip(members, scored):
                values[b][:, self.head_ranges[t]] = v.permute(1, 0, 2).float()
        return values

    def commit_draft(self, row: ValueRow, accepted: int) -> None:
        """The row's first `accepted` drafted tokens (of its last score_drafts) become committed."""
        for _, scorer, _ in self._members([row]):
            scorer.commit_draft(row.cache_slot, accepted)
