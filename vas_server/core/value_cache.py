"""A separate trunk's per-request KV cache, and the one way its forwards attend over it.

Invariants (per cache slot s, for one trunk):
  * `cached[s]` = the number of committed tokens of the slot's request; the cache rows
    [0, cached[s]) hold exactly the trunk's K/V for those tokens at those positions.
  * `last_hidden[s]` is the trunk's final hidden state at the last committed token.
  * `draft_hidden[s]` holds the hidden states of the slot's last scored drafted tokens, until
    they are committed or dropped.
  * Memory follows use: the cache is [layers, slots, row, kv heads, head dim] with both sizes
    grown (at least doubled, one copy) when a forward needs a slot or a row position past them,
    up to max_requests slots and max_len committed tokens plus one forward's scratch; it starts
    at INITIAL_SLOTS x (INITIAL_LEN + MAX_CANDIDATES) and never shrinks. Growth is decided on the
    host from the host-side counts, so it adds no device sync.

Every forward over the cache (a step's, or a draft's) is laid out by `KeyLayout` and attends
through `ValueCache.attention`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from vas_server.core.device import to_device
from vas_server.core.format import TOP_K_RANGE
from vas_server.core.trunk import Attend, TrunkConfig

MAX_CANDIDATES = TOP_K_RANGE[1]  # the most candidates a row scores in one step
INITIAL_SLOTS = 4  # the cache's first size (it grows with use: ValueCache.ensure)
INITIAL_LEN = 512


class KeyLayout(NamedTuple):
    """Where one forward's queries go: rows b of B (a cache slot each), query columns j of Lq.

    Row b, whose slot holds P committed tokens, has d new tokens then g groups of k candidates
    (then padding):
      * new token j sits at position P + j, its key written to the cache row at P + j, and it
        attends causally (keys <= P + j): exactly as a committed token. A step's new tokens are
        committed; a draft's drafted tokens are written where committing them would put them,
        then committed by moving `cached` (no copy, no recompute);
      * group i (i = f, ..., f + g - 1) holds the candidates a of the context of length P + i:
        each sits at rotary position P + i and sees the keys < P + i and its own key, never a
        sibling's (docs/VAS_RULE.md §1.2: V(s + [a])). The candidates' keys are scratch past the
        new tokens (P + d + c), overwritten by later tokens. A step has one group, f = d (the
        context s is all committed tokens); a draft has n = d + 1 groups from f = 0 (position
        i's candidates are alternatives to drafted token x_{i+1});
      * a padding query sees key 0 only (any valid column; its output is unused).
    Index tensors are built on the host and copied once, and the mask is built on the device from
    two small tensors, so no forward syncs the device."""

    new: torch.Tensor  # flat [B * Lq] indices of new-token queries
    candidates: torch.Tensor  # ... of candidate queries (row by row, group by group)
    written: torch.Tensor  # ... of both (the keys written to the cache)
    write_index: torch.Tensor  # where each written key goes in the flat [slots * row_len] cache
    positions: torch.Tensor  # [B, Lq] rotary positions
    cache_slots: torch.Tensor  # [B]
    mask: torch.Tensor  # [B, 1, Lq, Lk]
    Lk: int  # keys gathered per row

    @classmethod
    def of(cls, cache_slots: list[int], cached: list[int], new: list[int], first_group: list[int],
           groups: list[int], k: list[int], row_len: int, device) -> "KeyLayout":
        """Per row: its cache slot, committed count P, new tokens d, first group f, groups g,
        candidates per group k."""
        P, d, f, g, kk = (torch.tensor(x)[:, None] for x in (cached, new, first_group, groups, k))
        B = len(cache_slots)
        Lq = int((d + g * kk).max())
        idx = torch.arange(Lq)[None, :]
        c = idx - d  # candidate index, for the columns past the new tokens
        is_new = idx < d
        is_cand = (c >= 0) & (c < g * kk)
        context = P + f + torch.div(c, kk.clamp(min=1), rounding_mode="floor")  # a candidate's P + i
        key = P + idx  # new token j at P + j, candidate c past them at P + d + c
        positions = torch.where(is_new, key, torch.where(is_cand, context, P))
        limit = torch.where(is_new, key, torch.where(is_cand, context - 1, 0))
        own = torch.where(is_cand, key, -1)
        written = is_new | is_cand
        slots = torch.tensor(cache_slots)
        write_index = slots[:, None].expand(B, Lq)[written] * row_len + key[written]
        flat = [m.reshape(-1).nonzero().squeeze(1) for m in (is_new, is_cand, written)]
        new_d, cand_d, written_d, write_d, positions_d, slots_d, limit_d, own_d = (
            to_device(t, device) for t in (*flat, write_index, positions, slots, limit, own))
        Lk = int((P + d + g * kk).max())
        column = torch.arange(Lk, device=device)
        mask = ((column <= limit_d[:, :, None]) | (column == own_d[:, :, None]))[:, None]
        return cls(new_d, cand_d, written_d, write_d, positions_d, slots_d, mask, Lk)


class ValueCache:
    """One separate trunk's K/V of committed tokens, by cache slot (invariants: module docstring)."""

    def __init__(self, config: TrunkConfig, max_requests: int, max_len: int, device, dtype):
        self.config = config
        self.max_len = max_len
        self.max_requests = max_requests
        # Each slot's row: its committed tokens, then scratch for one forward's other keys.
        self.row_len = min(max_len, INITIAL_LEN) + MAX_CANDIDATES
        shape = (config.num_layers, min(max_requests, INITIAL_SLOTS), self.row_len, config.num_kv_heads,
                 config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.cached = [0] * max_requests  # host-side: read by Python every step, never synced
        self.last_hidden = torch.zeros(max_requests, config.hidden_size, device=device, dtype=dtype)
        self.draft_hidden: dict[int, torch.Tensor | None] = {}

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def max_bytes(self) -> int:
        """The most the cache can grow to (every slot, max_len tokens and one step's scratch)."""
        per_row = self.k[:, :1, :1].numel() * self.k.element_size()
        return 2 * per_row * self.max_requests * (self.max_len + MAX_CANDIDATES)

    def ensure(self, slots: int, row_len: int) -> None:
        """Room for `slots` slots of `row_len` keys: grown (at least doubled) by one copy if not."""
        have_slots, have_len = self.k.shape[1], self.k.shape[2]
        if slots <= have_slots and row_len <= have_len:
            return
        new_slots = have_slots if slots <= have_slots else min(self.max_requests, max(slots, 2 * have_slots))
        new_len = have_len if row_len <= have_len else max(row_len, min(self.max_len + MAX_CANDIDATES, 2 * have_len))
        shape = (self.k.shape[0], new_slots, new_len) + tuple(self.k.shape[3:])
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros(shape, device=old.device, dtype=old.dtype)
            new[:, :have_slots, :have_len] = old
            setattr(self, name, new)
        self.row_len = new_len

    def reset(self, cache_slot: int) -> None:
        self.cached[cache_slot] = 0
        self.draft_hidden.pop(cache_slot, None)

    def check_room(self, lengths: list[int]) -> None:
        if max(lengths) > self.max_len:
            raise RuntimeError(f"value cache length {self.max_len} exceeded ({max(lengths)} tokens)")

    def layout(self, cache_slots: list[int], cached: list[int], new: list[int], first_group: list[int],
               groups: list[int], k: list[int]) -> KeyLayout:
        """The forward's KeyLayout, the cache grown to hold it first."""
        self.ensure(max(cache_slots) + 1, max(p + d + g * n for p, d, g, n in zip(cached, new, groups, k)))
        return KeyLayout.of(cache_slots, cached, new, first_group, groups, k, self.row_len, self.k.device)

    def attention(self, at: KeyLayout) -> Attend:
        """The trunk's attention for a forward laid out by `at`: each layer writes the forward's
        keys into their cache rows, then one gather of the rows' caches is every key a query may
        see, masked by `at.mask`."""
        c = self.config
        B, Lq = at.positions.shape
        cache_k = self.k.view(c.num_layers, -1, c.num_kv_heads, c.head_dim)
        cache_v = self.v.view(c.num_layers, -1, c.num_kv_heads, c.head_dim)

        def attend(layer: int, q, k, v):
            # k, v: [B, kvh, Lq, d]
            k_rows = k.transpose(1, 2).reshape(B * Lq, c.num_kv_heads, c.head_dim)
            v_rows = v.transpose(1, 2).reshape(B * Lq, c.num_kv_heads, c.head_dim)
            cache_k[layer].index_copy_(0, at.write_index, k_rows.index_select(0, at.written))
            cache_v[layer].index_copy_(0, at.write_index, v_rows.index_select(0, at.written))
            keys = self.k[layer, at.cache_slots, :at.Lk].transpose(1, 2)
            values = self.v[layer, at.cache_slots, :at.Lk].transpose(1, 2)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=at.mask,
                                                 enable_gqa=q.shape[1] != k.shape[1])
            return out.transpose(1, 2).reshape(B, Lq, -1)

        return attend
