"""VAS under vLLM's Model Runner V2 logits-processor interface
(`vllm.v1.worker.gpu.sample.logits_processor.interface`): the GPU default runner in vLLM 0.32.

Requests live at persistent request indices (`add_request(req_idx, params)`; an index is
recycled by the next `add_request` on it, with no removal call), logits rows are reordered every
step, and the token history is on the device (`req_states.all_token_ids`, valid up to each row's
sampled position).

Invariants:
  * `self.by_req_idx` maps a request index to its current occupant's Row when that occupant is
    steered; `add_request` replaces an index's entry and gives back its value-cache slot first,
    so a cache slot is held by at most one request index. Engines built by
    vas_server.engine_args cap `max_num_seqs` at the cache capacity, so every occupied request
    index can hold one.
  * `apply` reads only host data (`ctx.idx_mapping_np`, `ctx.seq_lens_upper_bound_np`, its own
    tables) and launches device work: no `.item()`, `.tolist()` or copy back to the host, so
    async scheduling overlaps the steps. Separate-trunk heads read committed tokens from
    `all_token_ids` on the device, gathered with indices built on the host.
  * One logits row per request: speculative decoding is refused when the processor is built
    (vas_server.engine.steering).
"""

from __future__ import annotations

from typing import Collection

import numpy as np
import torch

from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext, LogitsProcRequestState

from vas_server.core.device import to_device
from vas_server.core.scorer import RunnerTokens, ValueRow
from vas_server.engine.processor import VASLogitsProcessor
from vas_server.engine.steering import Row, StepBatch, Steering


class V2Processor(VASLogitsProcessor):
    def __init__(self, vllm_config, req_states: LogitsProcRequestState):
        self.steering = Steering(vllm_config, req_states.device)
        self.req_states = req_states
        self.by_req_idx: dict[int, Row] = {}
        self._batch: StepBatch | None = None
        self._batch_order: np.ndarray | None = None  # the request-index order self._batch was built for
        self._logits_rows: list[int] = []  # the logits rows of self._batch's rows

    def add_request(self, req_idx: int, sampling_params) -> bool:
        steering = self.steering
        old = self.by_req_idx.pop(req_idx, None)
        self._batch_order = None  # the batch's rows changed
        if steering.runtime is None:
            return False
        if old is not None:
            steering.runtime.release(old.value_row.cache_slot)
        rs = self.req_states
        # prefilled with outputs: re-added after preemption
        row = steering.new_row(sampling_params, resumed=bool(rs.prefill_len.np[req_idx] > rs.prompt_len.np[req_idx]),
                               tokens=RunnerTokens(req_idx))
        if row is None:
            return False
        self.by_req_idx[req_idx] = row
        return True

    def apply_staged_writes(self) -> None:
        self.steering.heap.step()  # called once per engine step, before the forward

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if self.steering.runtime is None:
            return logits
        order = ctx.idx_mapping_np  # logits row -> request index, on the host
        if self._batch_order is None or not np.array_equal(order, self._batch_order):
            rows = [(i, self.by_req_idx[r]) for i, r in enumerate(order.tolist()) if r in self.by_req_idx]
            self._batch = StepBatch.of(rows, self.steering.device)
            self._batch_order = order.copy()
            self._logits_rows = [i for i, _ in rows]
        batch = self._batch
        if batch is not None:
            lengths = ctx.seq_lens_upper_bound_np  # = sampled position + 1 without spec decoding
            for i, value_row in zip(self._logits_rows, batch.value_rows):
                value_row.tokens.length = int(lengths[i])
            logits = self.steering.apply(logits, batch, self._device_tokens)
        self.steering.end_step()
        return logits

    def _device_tokens(self, rows: list[ValueRow], cached: list[int]) -> tuple[torch.Tensor, list[int]]:
        """NewTokens: the rows' committed tokens from cached[b] on, gathered from all_token_ids on
        the device."""
        buffer = self.req_states.all_token_ids.gpu
        width = buffer.shape[1]
        counts = [r.tokens.length - c for r, c in zip(rows, cached)]
        index = np.concatenate([np.arange(r.tokens.req_idx * width + c, r.tokens.req_idx * width + r.tokens.length)
                                for r, c in zip(rows, cached)])
        flat = buffer.view(-1).index_select(0, to_device(torch.from_numpy(index), buffer.device))
        return flat.long(), counts

    def stats(self, live_req_indices: Collection[int] | None = None) -> dict:
        """The counters, over the rows whose request is still in the runner (`live_req_indices`,
        the runner's occupied request indices; None: every row held). Model Runner V2 tells
        processors of new requests only, never of finished ones: a finished request's row (and
        value-cache slot) stays until its index is recycled, so counting all held rows would keep
        active_vas_requests and cache_slots_used up after the engine went idle."""
        rows = [r for i, r in self.by_req_idx.items() if live_req_indices is None or i in live_req_indices]
        return self.steering.stats(len(rows), cache_slots_used=sum(r.value_row.cache_slot is not None for r in rows))

    # The V1 interface's abstract methods (VASLogitsProcessor has both interfaces): the V1 runner
    # builds a V1Processor, never this class.
    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update) -> None:
        raise TypeError("V2Processor runs under Model Runner V2 only")


VASLogitsProcessor.runners[True] = V2Processor  # VASLogitsProcessor builds it where use_v2_model_runner is True
