"""VAS under vLLM's V1 logits-processor interface (`vllm.v1.sample.logits_processor`): the
interface of the V1 model runner, which is what vLLM's CPU build runs.

Rows are persistent-batch indices, told by `BatchUpdate`s (added / removed / moved); a row
carries its request's `SamplingParams` and live prompt and output token lists, no request id.

Invariants:
  * `self.rows` maps a persistent-batch index to the state of the steered request in that row;
    every row in it that uses a separate-trunk head holds one value-cache slot, and a cache slot
    is released exactly when its row is removed or replaced. A preempted request is removed (slot
    freed) and re-added with its outputs, and the runtime then rebuilds its cache from prompt +
    outputs. Rows using only shared-trunk heads hold nothing: their state is the base's own.
  * `self.batch` holds `self.rows` as tensors, rebuilt in `update_state` whenever the rows
    change, so `apply` only computes.
  * Committed tokens only: under async scheduling `update_state` may see -1 placeholders in
    the output lists; vLLM fills them (update_async_output_token_ids) before `apply`, and only
    `apply` reads the lists (through the value runtime).
  * The worker's heap is trimmed every `HeapTrimmer.interval_s` seconds (vas_server.engine.heap):
    vLLM's CPU worker otherwise keeps freed memory and grows under long load.
  * Not argmax-invariant: vLLM applies it to the float32 raw logits before penalties,
    temperature and top-k/top-p, as the rule requires.
"""

from __future__ import annotations

import torch

from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from vas_server.core.scorer import TokenLists
from vas_server.engine.processor import VASLogitsProcessor
from vas_server.engine.steering import Row, StepBatch, Steering


class V1Processor(VASLogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.steering = Steering(vllm_config, device)
        self.rows: dict[int, Row] = {}
        self.batch: StepBatch | None = None  # self.rows as tensors (invariant: rebuilt when rows change)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        steering = self.steering
        steering.heap.step()  # vLLM calls update_state once per engine step
        if batch_update is None or steering.runtime is None:
            return
        for index in batch_update.removed:
            self._drop(index)
        for index, params, prompt, outputs in batch_update.added:
            self._drop(index)
            # re-added with outputs: resumed after preemption
            tokens = TokenLists(prompt, outputs) if prompt is not None else None  # None: prompt embeddings
            row = self.steering.new_row(params, resumed=bool(outputs), tokens=tokens)
            if row is not None:
                self.rows[index] = row
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if direction == MoveDirectionality.SWAP:
                if row_b is not None:
                    self.rows[a] = row_b
            elif row_b is not None:  # a one-way move overwrites b
                steering.runtime.release(row_b.value_row.cache_slot)
            if row_a is not None:
                self.rows[b] = row_a
        self.batch = StepBatch.of(sorted(self.rows.items()), steering.device)

    def _drop(self, index: int) -> None:
        row = self.rows.pop(index, None)
        if row is not None:
            self.steering.runtime.release(row.value_row.cache_slot)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.batch is not None:
            logits = self.steering.apply(logits, self.batch)
        self.steering.end_step()
        return logits

    def stats(self) -> dict:
        return self.steering.stats(len(self.rows))


VASLogitsProcessor.runners[False] = V1Processor  # VASLogitsProcessor builds it where use_v2_model_runner is False
