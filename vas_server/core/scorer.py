"""What a value model in the runtime is given and what it answers (the `Scorer` protocol).

A row is one request as the value runtime reads it (`ValueRow`): its value-cache slot, the heads
it weights, and where its tokens are. The tokens live where the serving interface keeps them:
host lists (`TokenLists`: vLLM's V1 runner, remote mode, the evaluation) or a row of Model Runner
V2's device buffer (`RunnerTokens`). A step's `NewTokens` reader knows which, so the runtime never
branches on it.

Three things are called a slot elsewhere; here each has its own name:
  * a *cache slot* (`ValueRow.cache_slot`): a request's place in a separate trunk's value cache,
    taken by ValueRuntime.allocate and given back by ValueRuntime.release;
  * a *request index* (`RunnerTokens.req_idx`, vLLM's `req_idx`): Model Runner V2's persistent
    place of a request, its row of the runner's token buffer;
  * a *logits row* (`StepInputs.batch_rows`): a request's row in this step's logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from vas_server.core.device import to_device
from vas_server.core.heads import ValueHeads


@dataclass
class TokenLists:
    """A request's tokens as host lists: `prompt + outputs` (`outputs` may be the live list that
    vLLM's V1 runner appends sampled tokens to)."""

    prompt: list[int]
    outputs: list[int] = field(default_factory=list)


@dataclass
class RunnerTokens:
    """A request's tokens in Model Runner V2's device buffer (req_states.all_token_ids): its row
    `req_idx`, valid up to `length` (this step's sampled position + 1, set every step)."""

    req_idx: int
    length: int = 0


@dataclass
class ValueRow:
    """What the value runtime reads of one request (its input, not a result). The runtime only
    reads it (a cache slot's committed-token count lives in the scorers); the processors keep its
    tokens current."""

    cache_slot: int | None  # None when the row uses no separate-trunk head
    head_ids: frozenset[int]  # indices (into ValueRuntime.head_names) of the heads this row uses
    tokens: TokenLists | RunnerTokens


# new_tokens(rows, cached) -> (the rows' committed tokens from index cached[b] on, concatenated,
# as a long tensor on the runtime's device; their counts).
NewTokens = Callable[[list[ValueRow], list[int]], tuple[torch.Tensor, list[int]]]


def list_new_tokens(device: torch.device) -> NewTokens:
    """NewTokens for rows whose tokens are TokenLists."""

    def new_tokens(rows: list[ValueRow], cached: list[int]) -> tuple[torch.Tensor, list[int]]:
        flat: list[int] = []
        counts = []
        for r, c in zip(rows, cached):
            prompt, outputs = r.tokens.prompt, r.tokens.outputs
            p = len(prompt)
            toks = outputs[c - p:] if c >= p else prompt[c:] + outputs
            flat += toks
            counts.append(len(toks))
        return to_device(torch.tensor(flat, dtype=torch.long), device), counts

    return new_tokens


@dataclass
class StepInputs:
    """What a step gives every scorer besides its rows and their candidates (rows in the same
    order): each kind of scorer reads its own part."""

    new_tokens: NewTokens  # the rows' committed tokens not yet fed (separate trunks feed them)
    batch_rows: torch.Tensor | None = None  # [B] each row's logits row in this step (shared path)
    num_rows: int = 0  # logits rows in this step: the tap's state has one per row

    def subset(self, members: torch.Tensor | slice) -> "StepInputs":
        rows = self.batch_rows[members] if self.batch_rows is not None else None
        return StepInputs(self.new_tokens, rows, self.num_rows)


class Scorer(Protocol):
    """One value model in the runtime: vas_server.core.trunk_scorer.TrunkScorer (its own trunk, a
    per-request value cache) or vas_server.core.shared_scorer.SharedScorer (the base's own hidden
    states, nothing per request). Values come as [n, B, K] in `value_heads.names` order."""

    value_heads: ValueHeads
    keeps_cache: bool  # rows that use its heads need a cache slot

    @property
    def cache_bytes(self) -> int: ...

    @property
    def max_cache_bytes(self) -> int: ...

    def reset(self, cache_slot: int) -> None:
        """A cache slot starts over (taken by a new request, or given back)."""

    def advance(self, rows: list[ValueRow], step: StepInputs) -> None:
        """Feed the rows' newly committed tokens, scoring nothing."""

    def score(self, rows: list[ValueRow], candidates: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """Feed the rows' new tokens, then value their candidates [B, K]: [n, B, K]."""

    def score_drafts(self, rows: list[ValueRow], drafts: list[list[int]],
                     candidates: list[torch.Tensor]) -> list[torch.Tensor]:
        """Value each row's n drafted positions' candidates [n, K] (n, K per row), committing
        nothing: per row [n_heads, n, K]."""

    def commit_draft(self, cache_slot: int, accepted: int) -> None:
        """The slot's first `accepted` drafted tokens (of its last score_drafts) become committed."""
