"""The opt-in per-token explanation (`vas_explain`, vas_server.params.Explain), worker side.

For each steered step of a request that asked for it, `Explanations.record` copies to the host,
for every candidate of the step: its token id, base and steered log-probability (softmax of the
raw and of the steered logits, temperature 1) and each head's centred contribution w_h c_h(a)
to its logit (docs/VAS_RULE.md §1.3-1.4). The API process reads a request's record once, when its
answer is done (`collective_rpc("vas_explain", args=(id,))`, VASWorkerExtension), and `take`
forgets it.

Invariants:
  * Off costs nothing: a StepBatch without explained rows has `explain` None, and `apply` only
    tests that. On, each step with explained rows costs one device-to-host copy of
    [rows, K, 3 + heads] floats (a host sync on a GPU), for those requests only.
  * Bounded: at most MAX_EXPLAIN_TOKENS steps per request and MAX_PENDING records kept (the
    oldest unread one is dropped first: a client that disconnected never reads its record).
  * The sampled token of step i is the request's output token i, read from the V1 runner's live
    output list at `take`; under Model Runner V2 (no such list) it is None.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from vas_server.core import rule
from vas_server.params import MAX_EXPLAIN_TOKENS, Explain

MAX_PENDING = 64


@dataclass
class Record:
    explain: Explain
    heads: list[str]  # the heads the request weights, in the columns' order
    head_ids: list[int]
    top_k: int  # the request's K: the first top_k candidates of a step are its own
    outputs: Sequence[int] | None  # the request's live output tokens (V1), else None
    columns: torch.Tensor | None = None  # the step table's columns kept: id, base, steered, its heads
    steps: list[torch.Tensor] = field(default_factory=list)  # [K, 3 + heads] on the host per step
    truncated: bool = False


class Explanations:
    """The records of explained requests, by the middleware's id."""

    def __init__(self, head_names: Sequence[str]):
        self.head_names = list(head_names)
        self.records: OrderedDict[str, Record] = OrderedDict()

    def start(self, explain: Explain, weights: torch.Tensor, top_k: int, outputs: Sequence[int] | None) -> Record:
        """A new record for a request joining the batch (a resumed request starts over)."""
        head_ids = [i for i, w in enumerate(weights.tolist()) if w != 0]
        record = Record(explain, [self.head_names[i] for i in head_ids], head_ids, top_k, outputs)
        self.records[explain.id] = record
        self.records.move_to_end(explain.id)
        while len(self.records) > MAX_PENDING:
            self.records.popitem(last=False)
        return record

    def record(self, records: Sequence[Record], positions: torch.Tensor, base: torch.Tensor,
               steered: torch.Tensor, candidates: torch.Tensor, values: torch.Tensor, weights: torch.Tensor,
               valid: torch.Tensor) -> None:
        """One step of the explained rows. positions [E]: their places in the step's batch; base
        and steered [E, V]: their raw and steered logits; candidates [B, K], values [B, H, K],
        weights [B, H] and valid [B, K] of the whole batch."""
        cand = candidates.index_select(0, positions)
        # log-softmax at the candidates only: gathered logits minus each row's logsumexp
        base, steered = base.float(), steered.float()
        base_lp = base.gather(1, cand) - base.logsumexp(-1, keepdim=True)
        steered_lp = steered.gather(1, cand) - steered.logsumexp(-1, keepdim=True)
        contributions = (rule.centred(values.index_select(0, positions), valid.index_select(0, positions))
                         * weights.index_select(0, positions)[..., None])  # [E, H, K]
        table = torch.cat([cand.float()[..., None], base_lp[..., None], steered_lp[..., None],
                           contributions.transpose(1, 2).float()], -1).cpu()  # [E, K, 3 + H]
        for record, step in zip(records, table):
            if len(record.steps) >= MAX_EXPLAIN_TOKENS:
                record.truncated = True
                continue
            if record.columns is None:
                record.columns = torch.tensor([0, 1, 2, *(3 + h for h in record.head_ids)])
            record.steps.append(step[:record.top_k].index_select(1, record.columns))

    def take(self, key: str) -> dict | None:
        """The record of `key` as the answer's `vas_explain` (token ids, not text), forgotten."""
        record = self.records.pop(key, None)
        return None if record is None else answer(record)


def answer(record: Record) -> dict:
    """Per step: the sampled token's entry (`token_id` None when not known; its probabilities
    and contributions None when it was no candidate) and the `top` candidates by steered
    probability, best first."""
    tokens = []
    for i, step in enumerate(record.steps):
        entries = [_entry(row, record.heads) for row in step.tolist()]
        entries.sort(key=lambda e: -e["steered_p"])
        chosen = record.outputs[i] if record.outputs is not None and i < len(record.outputs) else None
        mine = next((e for e in entries if e["token_id"] == chosen), None)
        tokens.append({"token_id": chosen,
                       **({k: mine[k] for k in ("base_p", "steered_p", "contributions")} if mine else
                          {"base_p": None, "steered_p": None, "contributions": None}),
                       "candidates": entries[:record.explain.top]})
    return {"heads": record.heads, "tokens": tokens, "truncated": record.truncated}


def _entry(row: list[float], heads: list[str]) -> dict:
    return {"token_id": int(row[0]), "base_p": math.exp(row[1]), "steered_p": math.exp(row[2]),
            "contributions": dict(zip(heads, row[3:]))}
