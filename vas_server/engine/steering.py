"""What both VAS logits processors share: one request's row, one step's batch, and the steering
of a step's logits with the value runtime (built by vas_server.engine.runtime_factory) (docs/VAS_RULE.md §1):

    C = top-K of the raw logits; q_h(a) from the value runtime; c_h = q_h - mean_C q_h;
    l'(a) = l(a) + sum_h w_h c_h(a) for a in C; outside C, l is kept (or -inf if restricted).

The rule itself is vas_server.core.rule. vLLM 0.32 has two logits-processor interfaces, and
vas_server.engine.processor picks the one the engine's model runner uses; each keeps its own
bookkeeping (which logits row is which request) and hands `Steering.apply` a `StepBatch`.

Invariants:
  * Rows without weights are never touched, so they sample exactly as in plain vLLM.
  * Nothing a request carries can make `apply` raise or write a NaN or +inf logit: settings are
    validated at admission (vas_server.params), a row whose settings the worker cannot read runs
    unsteered, weights are bounded, and rule.bonus is finite and clipped.
  * `apply` builds nothing on the host that it must wait for: the batch's tensors are built by
    the bookkeeping (and copied without a sync), and the candidates never leave the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from vllm.logger import init_logger

from vas_server.core import rule
from vas_server.config import HeadInfo, VASConfig
from vas_server.engine.heap import HeapTrimmer
from vas_server.engine.hidden_states import HiddenStateTap
from vas_server.engine.explain import Explanations, Record
from vas_server.params import Explain, VASRequest
from vas_server.engine.pp_stage import samples_here
from vas_server.engine.runtime_factory import build_runtime
from vas_server.core.device import to_device
from vas_server.core.scorer import NewTokens, RunnerTokens, TokenLists, ValueRow
from vas_server.core.value_runtime import ValueRuntime

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# Under "vllm." so that the worker process, where only vLLM's loggers have handlers, prints it.
logger = init_logger("vllm.plugins.vas")


@dataclass(frozen=True)
class SteeredRequest:
    """A request's steering as the engine reads it (Steering.request): its settings, the
    indices of the heads it weights, and its weight vector [n_heads] (rule.weight_vector)."""

    settings: VASRequest
    head_ids: frozenset[int]
    weights: torch.Tensor


@dataclass
class Row:
    """One steered request: its settings, resolved top-K, and what the value runtime needs."""

    request: VASRequest
    weights: torch.Tensor  # [n_heads] float32 on the host (rule.weight_vector)
    top_k: int
    value_row: ValueRow  # what the value runtime reads of the request
    explain: Record | None = None  # the per-token record, when the request asked for one


@dataclass
class StepBatch:
    """The steered rows of one step as tensors, in ascending logits-row order."""

    index: torch.Tensor  # [B] logits row of each steered row
    value_rows: list[ValueRow]  # [B], for the value runtime
    weights: torch.Tensor  # [B, n_heads] float32, 0 for heads a row does not weight
    k_max: int  # the largest top-K of the rows
    valid: torch.Tensor  # [B, k_max] bool: candidate j counts for row b iff j < top_k(b)
    restrict: torch.Tensor | None  # [B] bool: vas_restrict_to_top_k; None when no row restricts
    # The rows that asked for vas_explain: (their batch positions [E], their records); None when none did
    explain: tuple[torch.Tensor, list[Record]] | None = None

    @classmethod
    def of(cls, rows: Sequence[tuple[int, Row]], device: torch.device) -> "StepBatch | None":
        """rows: (logits row, Row) in ascending logits-row order."""
        if not rows:
            return None
        ordered = [r for _, r in rows]
        k_max = max(r.top_k for r in ordered)
        restrict = [r.request.restrict_to_top_k for r in ordered]
        top_k = torch.tensor([r.top_k for r in ordered])
        explained = [(b, r.explain) for b, r in enumerate(ordered) if r.explain is not None]
        return cls(
            index=to_device(torch.tensor([i for i, _ in rows]), device),
            value_rows=[r.value_row for r in ordered],
            weights=to_device(torch.stack([r.weights for r in ordered]), device),
            k_max=k_max,
            valid=to_device(torch.arange(k_max)[None, :] < top_k[:, None], device),
            restrict=to_device(torch.tensor(restrict), device) if any(restrict) else None,
            explain=(to_device(torch.tensor([b for b, _ in explained]), device), [r for _, r in explained])
            if explained else None,
        )


class Steering:
    """The value runtime of this engine's value models and the per-step steering of logits.

    Counters for /metrics: `requests_total` rows steered (shared-path ones included), `steps`
    with steered rows and `seconds` of their whole VAS work (candidates, values, logits update);
    host wall time: on a GPU, where kernels run asynchronously, it counts launches, not kernels.
    """

    def __init__(self, vllm_config: "VllmConfig", device: torch.device):
        self.config = VASConfig.from_additional_config(vllm_config.additional_config)
        self.device = device
        self.runtime: ValueRuntime | None = None
        self.tap: HiddenStateTap | None = None  # set when a value model takes the shared path
        self.head_infos: dict[str, HeadInfo] = {}  # by name, from vas.json (each model's default top-K)
        self.heap = HeapTrimmer()
        self.requests_total = 0
        self.dropped_requests = 0  # VAS requests that found no free cache slot
        self.resumed_requests = 0  # VAS requests re-added with outputs (after preemption)
        self.steps = 0
        self.seconds = 0.0
        self.explanations = Explanations([])
        if self.config.value_models:
            if vllm_config.speculative_config is not None:
                # Both processors map one logits row to one request; drafts add rows.
                raise ValueError("VAS does not support speculative decoding (one logits row per request)")
            if samples_here():
                self.head_infos = self.config.read_heads()
                self.runtime, self.tap = build_runtime(self.config, vllm_config, device)
                self.explanations = Explanations(self.runtime.head_names)
            else:  # an earlier pipeline stage: it never samples, and rows stay unsteered here
                logger.info("VAS: this pipeline stage does not sample; the value models load on the last stage")

    def request(self, params) -> SteeredRequest | None:
        """A new row's settings, the indices of the heads it weights and its weight vector, or
        None when it is not steered. Admission validated the settings (vas_server.params); they
        are read, not checked again. What admission could not check runs unsteered, logged: a
        head this engine does not serve (vLLM's validate_params has no engine configuration), or
        settings that bypassed vLLM's admission and do not decode into a weight vector and a
        top-K in range, so that no value the sampler cannot take reaches it."""
        try:
            request = VASRequest.decode(params.extra_args)
            if request is None or not request.active:
                return None
            head_ids = frozenset(self.runtime.head_index[name] for name in request.weights)
            return SteeredRequest(request, head_ids, rule.weight_vector(request.weights, self.runtime.head_index))
        except KeyError as e:
            logger.error("VAS: this engine serves no head %s (heads: %s); the request runs unsteered", e,
                         ", ".join(self.runtime.head_names))
        except (AttributeError, TypeError, ValueError, RuntimeError) as e:  # RuntimeError: float32 overflow
            logger.error("VAS settings the engine cannot read (%s); the request runs unsteered", e)
        return None

    def new_row(self, params, *, resumed: bool, tokens: TokenLists | RunnerTokens | None) -> Row | None:
        """The Row of a request joining the batch, or None when it runs unsteered: no weights, or
        (logged) settings that fail here, no token history, or no free value-cache slot. Takes a
        cache slot when a separate-trunk head is weighted. `tokens`: where the request's tokens are
        (V1's live lists, or Model Runner V2's buffer row); None when it has no prompt token ids."""
        steered = self.request(params)
        if steered is None:
            return None
        request, head_ids, weights = steered.settings, steered.head_ids, steered.weights
        if tokens is None:
            logger.error("VAS needs prompt token ids (prompt embeddings are not supported); unsteered")
            return None
        cache_slot = None
        if self.runtime.needs_cache_slot(head_ids):  # only separate-trunk heads keep a value cache
            cache_slot = self.runtime.allocate()
            if cache_slot is None:
                # Unreachable through engine_kwargs, which caps max_num_seqs at the cache capacity
                # (so extra requests wait in vLLM's queue); only a hand-built engine can get here.
                self.dropped_requests += 1
                logger.error("VAS value cache full (%d requests); request runs unsteered", self.runtime.max_requests)
                return None
        if resumed:
            self.resumed_requests += 1
        self.requests_total += 1
        top_k = self.config.top_k_for(request, self.head_infos)
        explain = Explain.decode(params.extra_args)
        outputs = tokens.outputs if isinstance(tokens, TokenLists) else None
        record = self.explanations.start(explain, weights, top_k, outputs) if explain is not None else None
        return Row(request, weights, top_k, ValueRow(cache_slot, head_ids, tokens), record)

    def apply(self, logits: torch.Tensor, batch: StepBatch, new_tokens: NewTokens | None = None) -> torch.Tensor:
        """Steer the batch's rows of `logits` [R, V] (in place when every row is steered)."""
        start = time.perf_counter()
        every_row = len(batch.value_rows) == logits.shape[0]  # batch.index is then 0..R-1
        row_logits = logits if every_row else logits.index_select(0, batch.index)
        k = min(batch.k_max, logits.shape[1])
        candidates = row_logits.topk(k, dim=1).indices  # C, best first
        values = self.runtime.score(batch.value_rows, candidates, batch.index, logits.shape[0], new_tokens)
        valid = batch.valid[:, :k]
        values = values.to(logits.device)
        bonus = rule.bonus(values, batch.weights, valid)
        base = row_logits.index_select(0, batch.explain[0]) if batch.explain is not None else None  # a copy
        rule.add_bonus_(row_logits, candidates, bonus, valid, batch.restrict)
        if base is not None:  # only for requests that asked for vas_explain
            positions, records = batch.explain
            self.explanations.record(records, positions, base, row_logits.index_select(0, positions), candidates,
                                     values, batch.weights, valid)
        if not every_row:
            logits.index_copy_(0, batch.index, row_logits)
        self.steps += 1
        self.seconds += time.perf_counter() - start
        return logits

    def end_step(self) -> None:
        if self.tap is not None:
            self.tap.clear()  # this step's hidden states are used up

    def stats(self, active_requests: int, cache_slots_used: int | None = None) -> dict:
        """The counters for /metrics (vas_server.http.metrics.WORKER_METRICS names those it shows;
        `cache_bytes` is not among them: benchmarks/throughput.py reads it through vas_stats);
        empty on a pipeline stage that does not sample. `cache_slots_used`: the value-cache slots of
        live requests (default: every slot taken)."""
        rt = self.runtime
        if rt is None and self.config.value_models:
            return {}
        return {
            "vas_requests_total": self.requests_total,
            "active_requests": active_requests,
            "steps": self.steps,
            "runtime_seconds_total": self.seconds,
            "cache_slots_used": (rt.cache_slots_in_use if cache_slots_used is None else cache_slots_used) if rt else 0,
            "cache_slots_total": rt.max_requests if rt else 0,
            "cache_bytes": rt.cache_bytes if rt else 0,
            "dropped_requests": self.dropped_requests,
            "resumed_requests": self.resumed_requests,
            "heap_trims": self.heap.trims,
            "heap_trim_seconds_total": self.heap.seconds,
        }
