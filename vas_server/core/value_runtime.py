"""The batched value runtime: scores the top-K candidates of every VAS row in one forward per trunk.

Two kinds of value model (vas_server.config.runtime_path decides from vas.json):
  * "separate" (TrunkScorer): the model's own trunk and a per-request KV cache, described below;
  * "shared" (SharedScorer): token heads on a LoRA-free prefix of the base, read from the base's
    own hidden states at the sampled positions (vas_server.engine.hidden_states): no trunk, no cache, no
    slot; a step costs the heads' matmul and gather.

Per engine step, for each value-model trunk that at least one row needs:
  * each row feeds its newly committed tokens (the whole prompt on its first step, then usually
    one token) followed by its K candidates as siblings;
  * a committed token attends causally to the row's cache; a candidate attends to the row's
    cache, the row's new tokens and itself, never to its siblings (docs/VAS_RULE.md §1.2: V(s + [a]));
  * committed tokens are written to the cache for good; the candidates' keys go to scratch past
    them (positions len(s) + c) and are overwritten by the next step's tokens;
  * state heads read the candidates' final hidden states, token heads the last committed one.

Invariants:
  * `cached[t, slot]` = number of committed tokens of the slot's request in trunk t's cache; the
    cache rows [0, cached) hold exactly the trunk's K/V for those tokens at those positions.
  * `last_hidden[slot]` is the trunk's final hidden state at the last committed token.
  * Cache memory follows use: the cache is [layers, slots, row, ...] with both sizes grown (at
    least doubled, one copy) when a step needs a slot or a row position past them, up to
    max_requests slots and max_len committed tokens plus the step's scratch; it starts at
    INITIAL_SLOTS x (INITIAL_LEN + MAX_CANDIDATES) and never shrinks. Growth is decided on the
    host from the host-side counts, so it adds no device sync. A slot is taken by `allocate` and
    given back by `release`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from vas_server.core.format import TOP_K_RANGE
from vas_server.core.heads import ValueHeads
from vas_server.core.model import ValueModel


class HeadPlace(NamedTuple):
    """Where a head of the runtime's global order lives."""

    scorer: int  # index into ValueRuntime.scorers
    kind: str  # "state" | "token"
    index: int  # among that scorer's heads of that kind


@dataclass
class ValueRow:
    """What the value runtime reads of one request (its input, not a result): its token history
    (V1: host lists; V2: a slot in the model runner's device buffer), its value-cache slot, and
    the heads it weights. The runtime only reads it (a slot's cached-token count lives in the
    scorers); the processors keep it current (V2 sets `length` every step)."""

    slot: int | None  # value-cache slot; None when the row uses no separate-trunk head
    prompt: list[int] | None  # V1: the request's token lists (None when `length` is given)
    outputs: list[int] | None  # V1: the live list vLLM appends sampled tokens to
    head_ids: frozenset[int]  # indices (into ValueRuntime.head_names) of the heads this row uses
    # V2: the request's slot in the model runner's token buffer (req_states.all_token_ids), and the
    # length of s this step (its sampled position + 1); the tokens themselves stay on the device.
    token_slot: int | None = None
    length: int | None = None


MAX_CANDIDATES = TOP_K_RANGE[1]  # the most candidates a row scores in one step
INITIAL_SLOTS = 4  # the value cache's first size (it grows with use: TrunkScorer._ensure)
INITIAL_LEN = 512

# new_tokens(rows, cached) -> (the rows' committed tokens from index cached[b] on, concatenated,
# as a long tensor on the runtime's device; their counts). Where the tokens live differs by vLLM
# interface: host lists under V1 (list_new_tokens), the runner's device buffer under V2.
NewTokens = Callable[[list[ValueRow], list[int]], tuple[torch.Tensor, list[int]]]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built tensor on `device`, without a host sync on CUDA (pinned, non-blocking copy)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class StepInputs:
    """What a step gives every scorer besides its rows and their candidates (rows in the same
    order): each kind of scorer reads its own part."""

    new_tokens: NewTokens  # the rows' committed tokens not yet fed (separate trunks feed them)
    batch_rows: torch.Tensor | None = None  # [B] each row's index in this step's logits (shared path)
    num_rows: int = 0  # logits rows in this step: the tap's state has one per row

    def subset(self, members: torch.Tensor | slice) -> "StepInputs":
        rows = self.batch_rows[members] if self.batch_rows is not None else None
        return StepInputs(self.new_tokens, rows, self.num_rows)


class Scorer(Protocol):
    """One value model in the runtime: TrunkScorer (its own trunk, a per-request value cache)
    or SharedScorer (the base's own hidden states, nothing per request)."""

    value_heads: ValueHeads
    # A per-request value cache: rows take a slot; `advance` feeds it, and such a scorer also
    # scores and commits drafts (TrunkScorer.score_drafts, commit_draft).
    keeps_cache: bool

    @property
    def cache_bytes(self) -> int: ...

    @property
    def max_cache_bytes(self) -> int: ...

    def reset(self, slot: int) -> None: ...

    def score(self, rows: list["ValueRow"], candidates: torch.Tensor | None,
              step: StepInputs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(state values [B, K, n_state] or None, token values [n_token, B, K] or None) of the
        rows' candidates [B, K]; candidates None: only feed the rows' new tokens."""


def list_new_tokens(device: torch.device) -> NewTokens:
    """V1 and the evaluation: each row's tokens are `prompt + outputs` (host lists)."""

    def new_tokens(rows: list[ValueRow], cached: list[int]) -> tuple[torch.Tensor, list[int]]:
        flat: list[int] = []
        counts = []
        for r, c in zip(rows, cached):
            p = len(r.prompt)
            toks = r.outputs[c - p:] if c >= p else r.prompt[c:] + r.outputs
            flat += toks
            counts.append(len(toks))
        return to_device(torch.tensor(flat, dtype=torch.long), device), counts

    return new_tokens


class StepLayout(NamedTuple):
    """Where one step's tokens go, for TrunkScorer._forward: rows b of B, query columns j of Lq
    (row b's n_b new committed tokens, then its Kc candidates, then padding).

    A committed token is written to the slot's cache row at its position, candidate c at position
    len(s) + c: scratch past the committed tokens that the next step's tokens overwrite (so a row
    is max_len + MAX_CANDIDATES long). Key j is visible to a committed query iff j <= its
    position (causal), to candidate c iff j < len(s) or j is its own key (never a sibling), to a
    padding query iff j == 0 (any valid column; its output is unused). Index tensors are built
    on the host and copied once, and the mask is built on the device from two small tensors, so
    no step syncs the device."""

    committed: torch.Tensor  # flat [B * Lq] indices of committed-token queries
    candidates: torch.Tensor  # ... of candidate queries
    written: torch.Tensor  # ... of both (the keys written to the cache)
    write_index: torch.Tensor  # where each written key goes in the flat [slots * row_len] cache
    positions: torch.Tensor  # [B, Lq] rotary positions (siblings share len(s))
    slots: torch.Tensor  # [B]
    mask: torch.Tensor  # [B, 1, Lq, Lk]
    Lk: int  # keys gathered per row
    has_new: torch.Tensor  # rows with a new committed token
    last: torch.Tensor  # [B] column of each row's last new token
    any_new: bool

    @classmethod
    def of(cls, slot_list, cached_list, n_list, Kc: int, Lq: int, row_len: int, device) -> "StepLayout":
        B = len(slot_list)
        slots_cpu = torch.tensor(slot_list)
        cached, n = torch.tensor(cached_list), torch.tensor(n_list)
        idx = torch.arange(Lq)[None, :]
        n_col = n[:, None]
        length = (cached + n)[:, None]  # len(s)
        committed = idx < n_col  # [B, Lq]
        is_cand = (idx >= n_col) & (idx < n_col + Kc)
        written = committed | is_cand
        positions = cached[:, None] + torch.minimum(idx, n_col)
        key_slot = torch.where(committed, positions, length + (idx - n_col))  # where each key is written
        limit = torch.where(committed, positions, torch.where(is_cand, length - 1, 0))
        own = torch.where(is_cand, key_slot, -1)
        has_new = (n > 0).nonzero().squeeze(1)
        Lk = int((length + Kc).max())
        flat = [m.reshape(-1).nonzero().squeeze(1) for m in (committed, is_cand, written)]
        write_index = slots_cpu[:, None].expand(B, Lq)[written] * row_len + key_slot[written]
        host = (*flat, write_index, positions, slots_cpu, has_new, (n - 1).clamp(min=0), limit, own)
        (committed_d, cand_d, written_d, write_d, positions_d, slots_d, has_new_d, last_d, limit_d,
         own_d) = (to_device(t, device) for t in host)
        column = torch.arange(Lk, device=device)
        mask = ((column <= limit_d[:, :, None]) | (column == own_d[:, :, None]))[:, None]
        return cls(committed_d, cand_d, written_d, write_d, positions_d, slots_d, mask, Lk, has_new_d, last_d,
                   len(has_new) > 0)


class TrunkScorer:
    """One value model's trunk, its heads, and the per-slot KV cache of committed tokens."""

    keeps_cache = True

    def __init__(self, model: ValueModel, max_requests: int, max_len: int, device, dtype):
        self.model = model
        self.trunk = model.trunk
        self.value_heads = model.value_heads
        c = self.trunk.config
        self.max_len = max_len
        self.max_requests = max_requests
        # Each slot's row: its committed tokens, then scratch for one step's candidates (_forward).
        self.row_len = min(max_len, INITIAL_LEN) + MAX_CANDIDATES
        shape = (c.num_layers, min(max_requests, INITIAL_SLOTS), self.row_len, c.num_kv_heads, c.head_dim)
        self.cache_k = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_v = torch.zeros(shape, device=device, dtype=dtype)
        self.cached = [0] * max_requests  # host-side: read by Python every step, never synced
        self.last_hidden = torch.zeros(max_requests, c.hidden_size, device=device, dtype=dtype)
        self.has_state = bool(self.value_heads.state_names)
        self.has_token = bool(self.value_heads.token_names)
        self.candidate_rows = CandidateRows()
        self.draft_hidden: dict[int, torch.Tensor | None] = {}  # slot -> its drafted tokens' hidden states

    @property
    def cache_bytes(self) -> int:
        return 2 * self.cache_k.numel() * self.cache_k.element_size()

    @property
    def max_cache_bytes(self) -> int:
        """The most the cache can grow to (every slot, max_len tokens and one step's scratch)."""
        per_row = self.cache_k[:, :1, :1].numel() * self.cache_k.element_size()
        return 2 * per_row * self.max_requests * (self.max_len + MAX_CANDIDATES)

    def _ensure(self, slots: int, row_len: int) -> None:
        """Room for `slots` slots of `row_len` keys: grown (at least doubled) by one copy if not."""
        have_slots, have_len = self.cache_k.shape[1], self.cache_k.shape[2]
        if slots <= have_slots and row_len <= have_len:
            return
        new_slots = have_slots if slots <= have_slots else min(self.max_requests, max(slots, 2 * have_slots))
        new_len = have_len if row_len <= have_len else max(row_len, min(self.max_len + MAX_CANDIDATES, 2 * have_len))
        shape = (self.cache_k.shape[0], new_slots, new_len) + tuple(self.cache_k.shape[3:])
        for name in ("cache_k", "cache_v"):
            old = getattr(self, name)
            new = torch.zeros(shape, device=old.device, dtype=old.dtype)
            new[:, :have_slots, :have_len] = old
            setattr(self, name, new)
        self.row_len = new_len

    def reset(self, slot: int) -> None:
        self.cached[slot] = 0
        self.draft_hidden.pop(slot, None)

    @torch.inference_mode()
    def score(self, rows: list[ValueRow], candidates: torch.Tensor | None, step: StepInputs):
        """Scorer.score: feed the rows' new committed tokens (`step.new_tokens`), then score the
        candidates. All bookkeeping is host-side (`cached`, token counts); the device only computes.
        """
        device = self.cache_k.device
        slots = [r.slot for r in rows]
        cached = [self.cached[s] for s in slots]
        tokens, n = step.new_tokens(rows, cached)
        total = [c + k for c, k in zip(cached, n)]
        if max(total) > self.max_len:
            raise RuntimeError(f"value cache length {self.max_len} exceeded ({max(total)} tokens)")
        Kc = candidates.shape[1] if self.has_state and candidates is not None else 0
        self._ensure(max(slots) + 1, max(total) + Kc)
        Lq = max(k + Kc for k in n)
        # Lq == 0 only for a token-heads-only trunk with no new token (a repeated chunked-prefill
        # step): last_hidden is already current.
        state_values = self._forward(slots, cached, n, tokens, candidates, Kc, Lq) if Lq else None
        for s, t in zip(slots, total):
            self.cached[s] = t
        token_values = None
        if self.has_token and candidates is not None:
            embed = self.trunk.embed_tokens.weight
            hidden = self.last_hidden[to_device(torch.tensor(slots), device)]
            token_values = self.value_heads.token_values(hidden, embed, candidates,
                                                   rows_out=self.candidate_rows.get(embed, candidates.numel()))
        return state_values, token_values

    def _forward(self, slot_list, cached_list, n_list, new_tokens, candidates, Kc: int, Lq: int):
        """One trunk forward over all rows; returns the candidates' state values [B, Kc, n_state].

        Every key of the step goes into the slot's cache row before attention (where: StepLayout),
        then one gather of the rows' caches is every key a query may see."""
        device = self.cache_k.device
        B = len(slot_list)
        at = StepLayout.of(slot_list, cached_list, n_list, Kc, Lq, self.row_len, device)
        tokens = torch.zeros(B * Lq, dtype=torch.long, device=device)
        tokens.index_copy_(0, at.committed, new_tokens)
        if Kc:
            tokens.index_copy_(0, at.candidates, candidates[:, :Kc].reshape(-1))
        c = self.trunk.config
        cache_k = self.cache_k.view(c.num_layers, -1, c.num_kv_heads, c.head_dim)
        cache_v = self.cache_v.view(c.num_layers, -1, c.num_kv_heads, c.head_dim)

        def attend(layer: int, q, k, v):
            # k, v: [B, kvh, Lq, d]; write this step's keys into the cache rows, then attend.
            k_rows = k.transpose(1, 2).reshape(B * Lq, c.num_kv_heads, c.head_dim)
            v_rows = v.transpose(1, 2).reshape(B * Lq, c.num_kv_heads, c.head_dim)
            cache_k[layer].index_copy_(0, at.write_index, k_rows.index_select(0, at.written))
            cache_v[layer].index_copy_(0, at.write_index, v_rows.index_select(0, at.written))
            keys = self.cache_k[layer, at.slots, :at.Lk].transpose(1, 2)
            values = self.cache_v[layer, at.slots, :at.Lk].transpose(1, 2)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=at.mask,
                                                 enable_gqa=q.shape[1] != k.shape[1])
            return out.transpose(1, 2).reshape(B, Lq, -1)

        hidden = self.trunk(tokens.view(B, Lq), at.positions, attend)  # [B, Lq, H]
        if at.any_new:
            h_last = hidden[torch.arange(B, device=device), at.last]
            self.last_hidden[at.slots.index_select(0, at.has_new)] = h_last.index_select(0, at.has_new)
        if not Kc:
            return None
        return self.value_heads.state_values(hidden.reshape(B * Lq, -1).index_select(0, at.candidates).view(B, Kc, -1))


    def score_draft(self, slot: int, draft: list[int], candidates: torch.Tensor):
        """One row's `score_drafts`: (state values [n, K, n_state] or None, token values
        [n_token, n, K] or None)."""
        return self.score_drafts([slot], [draft], [candidates])[0]

    @torch.inference_mode()
    def score_drafts(self, slots: list[int], drafts: list[list[int]], candidates: list[torch.Tensor]):
        """Score the candidates of each row's n drafted positions, all rows in one forward,
        committing nothing.

        Row b's `drafts[b]` is x_1..x_{n-1} (the drafted tokens the later positions follow; the
        last drafted token is only scored, as a candidate of position n); candidates[b] [n, K]:
        position i's candidates are alternatives to x_i, so they see the slot's committed tokens
        and x_1..x_{i-1} (V(s + x_{<i} + [a])), at rotary position cached + i - 1. The drafted
        tokens' keys go to the cache rows right after the committed ones, where committing them
        would put them: a drafted token attends causally to the cache and the drafted tokens
        before it, exactly as a committed one would. `commit_draft(slot, m)` then makes the first
        m of them committed by moving `cached` (no copy, no recompute); the rest stay scratch,
        overwritten later. The candidates' keys go past the drafted ones. Rows have their own n
        and K; each row's queries are padded to the longest (a padding query sees key 0 only, its
        output unused). Needs every committed token fed (`advance`).

        Returns per row (state values [n, K, n_state] or None, token values [n_token, n, K] or None)."""
        device = self.cache_k.device
        B = len(slots)
        P = [self.cached[slot] for slot in slots]
        shapes = [tuple(c.shape) for c in candidates]
        for b, (draft, (n, K)) in enumerate(zip(drafts, shapes)):
            if len(draft) != n - 1:
                raise ValueError(f"a draft of {n} positions follows {n - 1} drafted tokens, not {len(draft)}")
            if P[b] + n - 1 > self.max_len:
                raise RuntimeError(f"value cache length {self.max_len} exceeded by a draft ({P[b]} + {n - 1} tokens)")
        kc = [K if self.has_state else 0 for _, K in shapes]
        lq = [len(draft) + n * k for draft, (n, _), k in zip(drafts, shapes, kc)]
        Lq = max(lq)
        self._ensure(max(slots) + 1, max(p + q for p, q in zip(P, lq)))
        hidden = None
        if Lq:
            # Host-side index tensors, [B, Lq]; row b's first lq[b] queries are real.
            key = torch.zeros(B, Lq, dtype=torch.long)
            positions = torch.zeros(B, Lq, dtype=torch.long)
            limit = torch.zeros(B, Lq, dtype=torch.long)  # padding: key 0 only
            own = torch.full((B, Lq), -1, dtype=torch.long)
            tokens = torch.zeros(B, Lq, dtype=torch.long)
            for b, (draft, (n, _), k) in enumerate(zip(drafts, shapes, kc)):
                d, p = len(draft), P[b]
                j = torch.arange(d)
                group = torch.arange(n).repeat_interleave(k)
                key[b, :lq[b]] = torch.cat([p + j, p + d + torch.arange(n * k)])
                positions[b, :lq[b]] = torch.cat([p + j, p + group])
                limit[b, :lq[b]] = torch.cat([p + j, p + group - 1])  # causal; a candidate sees x_{<i}, not x_i
                own[b, d:lq[b]] = key[b, d:lq[b]]
                tokens[b, :d] = torch.tensor(draft, dtype=torch.long)
            real = (torch.arange(Lq)[None, :] < torch.tensor(lq)[:, None]).reshape(-1).nonzero().squeeze(1)
            write = (torch.tensor(slots)[:, None] * self.row_len + key).reshape(-1)[real]
            # Where the candidates go among the [B * Lq] queries (they stay on their device).
            starts = [b * Lq + len(draft) for b, draft in enumerate(drafts)]
            cand_at = torch.cat([s0 + torch.arange(lq[b] - len(drafts[b])) for b, s0 in enumerate(starts)])
            Lk = max(p + q for p, q in zip(P, lq))
            positions, limit, own, tokens, real, write, cand_at, slots_dev = (
                to_device(t, device) for t in (positions, limit, own, tokens, real, write, cand_at,
                                               torch.tensor(slots)))
            if self.has_state:
                tokens.view(-1).index_copy_(0, cand_at, torch.cat([c.reshape(-1) for c in candidates]))
            column = torch.arange(Lk, device=device)
            mask = ((column <= limit[:, :, None]) | (column == own[:, :, None]))[:, None]  # [B, 1, Lq, Lk]
            c = self.trunk.config

            def attend(layer: int, q, k, v):
                # k, v: [B, kvh, Lq, d]; write the real queries' keys into the cache rows, then attend.
                cache_k = self.cache_k[layer].view(-1, c.num_kv_heads, c.head_dim)
                cache_v = self.cache_v[layer].view(-1, c.num_kv_heads, c.head_dim)
                k_rows = k.transpose(1, 2).reshape(B * Lq, c.num_kv_heads, c.head_dim)
                v_rows = v.transpose(1, 2).reshape(B * Lq, c.num_kv_heads, c.head_dim)
                cache_k.index_copy_(0, write, k_rows.index_select(0, real))
                cache_v.index_copy_(0, write, v_rows.index_select(0, real))
                keys = self.cache_k[layer, slots_dev, :Lk].transpose(1, 2)
                values = self.cache_v[layer, slots_dev, :Lk].transpose(1, 2)
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                     enable_gqa=q.shape[1] != k.shape[1])
                return out.transpose(1, 2).reshape(B, Lq, -1)

            hidden = self.trunk(tokens, positions, attend)  # [B, Lq, H]
        results = []
        for b, (slot, draft, (n, _), k) in enumerate(zip(slots, drafts, shapes, kc)):
            d = len(draft)
            self.draft_hidden[slot] = hidden[b, :d].clone() if hidden is not None and d else None
            state_values = self.value_heads.state_values(hidden[b, d:lq[b]].view(n, k, -1)) if k else None
            token_values = None
            if self.has_token:
                before = self.last_hidden[slot][None]
                if d:
                    before = torch.cat([before, hidden[b, :d]])
                embed = self.trunk.embed_tokens.weight
                token_values = self.value_heads.token_values(before, embed, candidates[b],
                                                       rows_out=self.candidate_rows.get(embed, candidates[b].numel()))
            results.append((state_values, token_values))
        return results

    def commit_draft(self, slot: int, accepted: int) -> None:
        """Make the first `accepted` drafted tokens of the slot's last `score_draft` committed."""
        if accepted:
            hidden = self.draft_hidden[slot]
            if hidden is None or accepted > len(hidden):
                raise ValueError(f"cannot commit {accepted} drafted tokens")
            self.cached[slot] += accepted
            self.last_hidden[slot] = hidden[accepted - 1]
        self.draft_hidden[slot] = None


class CandidateRows:
    """A grow-only buffer for the candidates' embedding rows (ValueHeads.token_values' rows_out):
    allocated once at the largest B x K seen, instead of a fresh tensor every step."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def get(self, embed: torch.Tensor, count: int) -> torch.Tensor:
        b = self.buffer
        if b is None or b.shape[0] < count or b.dtype != embed.dtype or b.device != embed.device:
            self.buffer = b = torch.empty(count, embed.shape[1], dtype=embed.dtype, device=embed.device)
        return b


class SharedScorer:
    """A token-heads-only value model on the base's first `layer` layers, without LoRA: its trunk
    state is the base's own (vas_server.engine.hidden_states.HiddenStateTap), so it keeps nothing per
    request: it reads `step.batch_rows` (where each row's state sits in this step's logits)."""

    has_state = False
    has_token = True
    keeps_cache = False
    cache_bytes = 0
    max_cache_bytes = 0

    def __init__(self, name: str, value_heads: ValueHeads, layer: int, tap):
        if value_heads.state_names:
            raise ValueError(f"value model {name!r}: the shared-trunk path serves token heads only")
        self.name = name
        self.value_heads = value_heads
        self.layer = layer
        self.tap = tap
        self.dtype = value_heads.token_proj.dtype
        self.candidate_rows = CandidateRows()

    def reset(self, slot: int) -> None:
        pass

    @torch.inference_mode()
    def score(self, rows: list[ValueRow], candidates: torch.Tensor, step: StepInputs):
        """Scorer.score, for candidates [B, K]: the state of row b is the tap's row step.batch_rows[b]."""
        hidden = self.tap.states(self.layer, step.num_rows).index_select(0, step.batch_rows.to(self.tap.embedding.device))
        hidden = hidden.to(device=candidates.device, dtype=self.dtype)
        embed = self.tap.embedding
        rows_out = self.candidate_rows.get(embed, candidates.numel())
        # The tap computes them: under tensor parallelism its embedding is this rank's shard.
        return None, self.tap.token_values(self.value_heads, hidden, candidates, rows_out)


class ValueRuntime:
    """All value models of the server, their heads in one global order, and slot bookkeeping.

    `models` run on their own trunk (TrunkScorer, value cache of max_requests slots); `shared` are
    shared-trunk models (SharedScorer). Only rows using a separate-trunk head take a slot.
    """

    def __init__(self, models: list[ValueModel], max_requests: int, max_len: int, device, dtype,
                 shared: list[SharedScorer] = ()):
        self.scorers: list[Scorer] = [TrunkScorer(m, max_requests, max_len, device, dtype)
                                                          for m in models]
        self.scorers += list(shared)
        self.head_names: list[str] = []
        self.head_places: list[HeadPlace] = []  # by global head index
        for t, r in enumerate(self.scorers):
            for i, name in enumerate(r.value_heads.state_names):
                self.head_names.append(name)
                self.head_places.append(HeadPlace(t, "state", i))
            for i, name in enumerate(r.value_heads.token_names):
                self.head_names.append(name)
                self.head_places.append(HeadPlace(t, "token", i))
        if len(set(self.head_names)) != len(self.head_names):
            raise ValueError(f"head names must be unique across value models: {self.head_names}")
        self.head_index = {name: i for i, name in enumerate(self.head_names)}
        self.scorer_heads = [frozenset(i for i, p in enumerate(self.head_places) if p.scorer == t)
                             for t in range(len(self.scorers))]
        # Heads whose rows need a value-cache slot (those of separate-trunk models).
        self.cached_heads = frozenset(i for t in range(len(models)) for i in self.scorer_heads[t])
        max_requests = max_requests if models else 0  # no separate trunk: no slots, no cache
        self.max_requests = max_requests
        self.max_len = max_len
        self.device = torch.device(device)
        self.free_slots = list(range(max_requests - 1, -1, -1))

    @property
    def slots_in_use(self) -> int:
        return self.max_requests - len(self.free_slots)

    @property
    def cache_bytes(self) -> int:
        return sum(r.cache_bytes for r in self.scorers)

    @property
    def max_cache_bytes(self) -> int:
        return sum(r.max_cache_bytes for r in self.scorers)

    def needs_slot(self, head_ids: frozenset[int]) -> bool:
        return bool(head_ids & self.cached_heads)

    def allocate(self) -> int | None:
        """A free cache slot, or None when all are taken."""
        if not self.free_slots:
            return None
        slot = self.free_slots.pop()
        for r in self.scorers:
            r.reset(slot)
        return slot

    def release(self, slot: int | None) -> None:
        if slot is None:
            return
        for r in self.scorers:
            r.reset(slot)
        self.free_slots.append(slot)

    def advance(self, rows: list[ValueRow]) -> None:
        """Feed the rows' newly committed tokens (their host lists) to the separate trunks they
        use, scoring nothing: a later `score` of these rows then runs only their candidates (state
        heads) or only the heads (token heads). Remote mode advances a row while the upstream
        computes its next candidates."""
        step = StepInputs(list_new_tokens(self.device))
        for t, scorer in enumerate(self.scorers):
            members = [r for r in rows if r.head_ids & self.scorer_heads[t]]
            if members and scorer.keeps_cache:
                scorer.score(members, None, step)

    def score_draft(self, row: ValueRow, draft: list[int], candidates: torch.Tensor) -> torch.Tensor:
        """One row's `score_drafts`: [n, n_heads, K]."""
        return self.score_drafts([row], [draft], [candidates])[0]

    def score_drafts(self, rows: list[ValueRow], drafts: list[list[int]],
                     candidates: list[torch.Tensor]) -> list[torch.Tensor]:
        """Values of each row's n drafted positions' candidates [n, K] (n and K per row), every
        committed token of which has been fed: per row [n, n_heads, K], in one forward per trunk
        for all rows (TrunkScorer.score_drafts; separate trunks only)."""
        values = [torch.zeros(c.shape[0], len(self.head_names), c.shape[1], device=c.device, dtype=torch.float32)
                  for c in candidates]
        for t, scorer in enumerate(self.scorers):
            members = [b for b, row in enumerate(rows) if row.head_ids & self.scorer_heads[t]]
            if not members:
                continue
            if not scorer.keeps_cache:
                raise ValueError("drafted positions are scored on separate trunks only")
            scored = scorer.score_drafts([rows[b].slot for b in members], [drafts[b] for b in members],
                                         [candidates[b] for b in members])
            for b, (state, token) in zip(members, scored):
                for g in self.scorer_heads[t]:
                    place = self.head_places[g]
                    values[b][:, g] = (state[:, :, place.index] if place.kind == "state" else token[place.index]).float()
        return values

    def commit_draft(self, row: ValueRow, accepted: int) -> None:
        """The row's first `accepted` drafted tokens (of its last score_draft) become committed."""
        for t, scorer in enumerate(self.scorers):
            if row.head_ids & self.scorer_heads[t] and scorer.keeps_cache:
                scorer.commit_draft(row.slot, accepted)

    def score(self, rows: list[ValueRow], candidates: torch.Tensor, batch_rows: torch.Tensor | None = None,
              num_rows: int = 0, new_tokens: NewTokens | None = None) -> torch.Tensor:
        """Values q_h(a) of each row's candidates: [B, n_heads, K] (0 for heads a row does not use).
        Shared-trunk heads need `batch_rows` [B] (each row's index in this step's logits, of
        `num_rows` rows): that is where the base's hidden state of the row sits. Separate-trunk
        heads read the rows' committed tokens with `new_tokens` (default: the rows' host lists)."""
        B, K = candidates.shape
        step = StepInputs(new_tokens or list_new_tokens(candidates.device), batch_rows, num_rows)
        values = torch.zeros(B, len(self.head_names), K, device=candidates.device, dtype=torch.float32)
        for t, scorer in enumerate(self.scorers):
            members = [b for b, r in enumerate(rows) if r.head_ids & self.scorer_heads[t]]
            if not members:
                continue
            sub = (slice(None) if len(members) == B
                   else to_device(torch.tensor(members), candidates.device))
            state, token = scorer.score([rows[b] for b in members], candidates[sub], step.subset(sub))
            for g in self.scorer_heads[t]:
                place = self.head_places[g]
                v = state[:, :, place.index] if place.kind == "state" else token[place.index]
                values[sub, g] = v.float()
        return values
