"""A value model on its own trunk (the separate runtime): one forward per step for all rows.

Per engine step, each row feeds its newly committed tokens (the whole prompt on its first step,
then usually one token) and, when a head kind reads candidate states (state heads), its K
candidates as siblings after them (vas_server.core.value_cache.KeyLayout, one group from f = d).
Committed tokens enter the cache for good; the candidates' keys are scratch. Heads that read the
context state (token heads) read the row's last committed hidden state.

Drafts (remote mode's draft-and-verify) take the same forward: a row's drafted tokens x_1..x_{n-1}
in place of new tokens, and n groups of candidates, position i's candidates being alternatives to
x_i, so they see x_{<i} (V(s + x_{<i} + [a])). Nothing is committed until `commit_draft`.
"""

from __future__ import annotations

import torch

from vas_server.core.device import to_device
from vas_server.core.heads import DenseEmbedding, HeadInputs
from vas_server.core.model import ValueModel
from vas_server.core.scorer import StepInputs, ValueRow
from vas_server.core.value_cache import KeyLayout, ValueCache


class TrunkScorer:
    """One value model's trunk, its heads and its ValueCache (Scorer)."""

    keeps_cache = True

    def __init__(self, model: ValueModel, max_requests: int, max_len: int, device, dtype):
        self.model = model
        self.trunk = model.trunk
        self.value_heads = model.value_heads
        self.cache = ValueCache(self.trunk.config, max_requests, max_len, device, dtype)
        self.embedding = DenseEmbedding(self.trunk.embed_tokens.weight, reuse_rows=True)
        self.reads_candidates = self.value_heads.reads_candidate_states
        self.reads_context = any(not heads.reads_candidate_states for heads in self.value_heads.used)

    @property
    def cache_bytes(self) -> int:
        return self.cache.bytes

    @property
    def max_cache_bytes(self) -> int:
        return self.cache.max_bytes

    def reset(self, cache_slot: int) -> None:
        self.cache.reset(cache_slot)

    def advance(self, rows: list[ValueRow], step: StepInputs) -> None:
        self.score(rows, None, step)

    @torch.inference_mode()
    def score(self, rows: list[ValueRow], candidates: torch.Tensor | None, step: StepInputs) -> torch.Tensor | None:
        """Scorer.score (candidates None: Scorer.advance). All bookkeeping is host-side (`cached`,
        token counts); the device only computes."""
        cache = self.cache
        slots = [r.cache_slot for r in rows]
        cached = [cache.cached[s] for s in slots]
        tokens, n = step.new_tokens(rows, cached)
        total = [c + k for c, k in zip(cached, n)]
        cache.check_room(total)
        B = len(rows)
        Kc = candidates.shape[1] if self.reads_candidates and candidates is not None else 0
        candidate_states, slots_on_device = None, None
        # Nothing to run only for context-reading heads with no new token (a repeated chunked-prefill
        # step): last_hidden is already current.
        if Kc or any(n):
            at = cache.layout(slots, cached, n, first_group=n, groups=[1 if Kc else 0] * B, k=[Kc] * B)
            hidden = self._forward(at, tokens, candidates[:, :Kc] if Kc else None)
            slots_on_device = at.cache_slots
            fed = [(b, s, k - 1) for b, (s, k) in enumerate(zip(slots, n)) if k]  # (row, slot, last new column)
            if fed:
                row, slot, column = to_device(torch.tensor(fed).T, hidden.device)
                cache.last_hidden[slot] = hidden[row, column]
            if Kc:
                candidate_states = hidden.flatten(0, 1).index_select(0, at.candidates).view(B, Kc, -1)
        for s, t in zip(slots, total):
            cache.cached[s] = t
        if candidates is None:
            return None
        context = None
        if self.reads_context:
            if slots_on_device is None:
                slots_on_device = to_device(torch.tensor(slots), candidates.device)
            context = cache.last_hidden[slots_on_device]
        return self.value_heads.values(HeadInputs(candidates, context, candidate_states, self.embedding))

    def _forward(self, at: KeyLayout, new_tokens: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        """The trunk over a KeyLayout's queries: hidden states [B, Lq, H]."""
        B, Lq = at.positions.shape
        tokens = torch.zeros(B * Lq, dtype=torch.long, device=at.positions.device)
        tokens.index_copy_(0, at.new, new_tokens)
        if candidates is not None:
            tokens.index_copy_(0, at.candidates, candidates.reshape(-1))
        return self.trunk(tokens.view(B, Lq), at.positions, self.cache.attention(at))

    @torch.inference_mode()
    def score_drafts(self, rows: list[ValueRow], drafts: list[list[int]],
                     candidates: list[torch.Tensor]) -> list[torch.Tensor]:
        """Scorer.score_drafts, all rows in one forward. Row b's `drafts[b]` is x_1..x_{n-1} (the
        drafted tokens the later positions follow; the last drafted token is only scored, as a
        candidate of position n); candidates[b] [n, K]. Needs every committed token fed
        (`advance`)."""
        cache = self.cache
        slots = [r.cache_slot for r in rows]
        P = [cache.cached[s] for s in slots]
        shapes = [tuple(c.shape) for c in candidates]
        for draft, (n, _) in zip(drafts, shapes):
            if len(draft) != n - 1:
                raise ValueError(f"a draft of {n} positions follows {n - 1} drafted tokens, not {len(draft)}")
        cache.check_room([p + len(draft) for p, draft in zip(P, drafts)])
        d = [len(draft) for draft in drafts]
        k = [K if self.reads_candidates else 0 for _, K in shapes]
        groups = [n if self.reads_candidates else 0 for n, _ in shapes]
        hidden = None
        if any(d) or any(k):
            at = cache.layout(slots, P, d, first_group=[0] * len(rows), groups=groups, k=k)
            drafted = to_device(torch.tensor([t for draft in drafts for t in draft], dtype=torch.long),
                                at.positions.device)
            hidden = self._forward(at, drafted, torch.cat([c.reshape(-1) for c in candidates])
                                   if self.reads_candidates else None)
        values = []
        for b, (slot, (n, K)) in enumerate(zip(slots, shapes)):
            drafted_hidden = hidden[b, :d[b]] if hidden is not None else None
            cache.draft_hidden[slot] = drafted_hidden.clone() if d[b] else None
            candidate_states = hidden[b, d[b]:d[b] + n * k[b]].view(n, k[b], -1) if k[b] else None
            context = None
            if self.reads_context:  # position i's context state: the last committed one, then x_1..x_{n-1}'s
                context = cache.last_hidden[slot][None]
                if d[b]:
                    context = torch.cat([context, drafted_hidden])
            values.append(self.value_heads.values(HeadInputs(candidates[b], context, candidate_states,
                                                             self.embedding)))
        return values

    def commit_draft(self, cache_slot: int, accepted: int) -> None:
        cache = self.cache
        if accepted:
            hidden = cache.draft_hidden.get(cache_slot)
            if hidden is None or accepted > len(hidden):
                raise ValueError(f"cannot commit {accepted} drafted tokens")
            cache.cached[cache_slot] += accepted
            cache.last_hidden[cache_slot] = hidden[accepted - 1]
        cache.draft_hidden[cache_slot] = None
