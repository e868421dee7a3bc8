"""VASLogitsProcessor: Value Augmented Sampling as a vLLM V1-interface logits processor.

Importing this module loads no model: vLLM imports the class in the API process too (for
`validate_params`). Value models are loaded in the worker, in __init__.

Per step, for the rows whose request carries non-zero VAS weights (docs/VAS_RULE.md §1):
    C = top-K of the raw logits; q_h(a) from the value runtime; c_h = q_h - mean_C q_h;
    l'(a) = l(a) + sum_h w_h c_h(a) for a in C; outside C, l is kept (or -inf if restricted).
The rule itself is vas_server.rule (shared with the evaluation's exact KL). Rows without weights
are never touched, so they sample exactly as in plain vLLM.

Invariants:
  * `self.rows` maps a persistent-batch index to the state of the VAS request in that row;
    every row in it that uses a separate-trunk head holds one value-cache slot, and a slot is
    released exactly when its row is removed or replaced. A preempted request is removed (slot
    freed) and re-added with its outputs, and the runtime then rebuilds its cache from prompt +
    outputs. Rows using only shared-trunk heads hold nothing: their state is the base's own.
  * Shared-trunk heads read this step's hidden states (vas_server.hidden_states), captured by the
    base's forward at the sampled positions, so logits row i and hidden-state row i are the same
    request; `apply` clears them at its end, every step.
  * `self.batch` holds the per-batch tensors of `self.rows` (row indices, weights, top-K mask,
    restriction), rebuilt in `update_state` whenever the rows change, so `apply` only computes.
  * Nothing a request carries can make `apply` raise or write a NaN or +inf logit: settings are
    validated at admission (and again, without raising, when a row is added), weights are
    bounded, and rule.bonus is finite and clipped.
  * The worker's heap is trimmed every `HeapTrimmer.interval_s` seconds (vas_server.heap):
    vLLM's CPU worker otherwise keeps freed memory and grows under long load.
  * The processor is not argmax-invariant: vLLM applies it to the float32 raw logits before
    penalties, temperature and top-k/top-p, as the rule requires.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Mapping

import torch

from vllm.logger import init_logger
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from vas_server import rule
from vas_server.config import HeadInfo, VASConfig
from vas_server.heap import HeapTrimmer
from vas_server.params import VASRequest

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from vas_server.hidden_states import HiddenStateTap
    from vas_server.value_runtime import RowInput, ValueRuntime

# Under "vllm." so that the worker process, where only vLLM's loggers have handlers, prints it.
logger = init_logger("vllm.plugins.vas")


@dataclass
class _Row:
    request: VASRequest
    top_k: int
    input: "RowInput"


@dataclass
class _Batch:
    """The VAS rows of the persistent batch as tensors, in ascending row order."""

    index: torch.Tensor  # [B] persistent-batch row indices
    inputs: list  # [B] RowInput, for the value runtime
    weights: torch.Tensor  # [B, n_heads] float32, 0 for heads a row does not weight
    k_max: int  # the largest top-K of the rows
    valid: torch.Tensor  # [B, k_max] bool: candidate j counts for row b iff j < top_k(b)
    restrict: torch.Tensor | None  # [B] bool: vas_restrict_to_top_k; None when no row restricts

    @classmethod
    def of(cls, rows: Mapping[int, _Row], head_index: Mapping[str, int], device: torch.device) -> "_Batch | None":
        if not rows:
            return None
        indices = sorted(rows)
        ordered = [rows[i] for i in indices]
        k_max = max(r.top_k for r in ordered)
        top_k = torch.tensor([r.top_k for r in ordered], device=device)
        return cls(
            index=torch.tensor(indices, device=device),
            inputs=[r.input for r in ordered],
            weights=torch.stack([rule.weight_vector(r.request.weights, head_index, device=device) for r in ordered]),
            k_max=k_max,
            valid=torch.arange(k_max, device=device)[None, :] < top_k[:, None],
            restrict=(torch.tensor([r.request.restrict_to_top_k for r in ordered], device=device)
                      if any(r.request.restrict_to_top_k for r in ordered) else None),
        )


class VASLogitsProcessor(LogitsProcessor):
    # Heads known to the process that built the engine (set by vas_server.engine.engine_kwargs),
    # so that validate_params, which vLLM calls as a classmethod without any config, can reject
    # unknown heads at admission with a 400.
    _known_heads: ClassVar[Mapping[str, HeadInfo] | None] = None

    @classmethod
    def register_heads(cls, heads: Mapping[str, HeadInfo]) -> None:
        cls._known_heads = dict(heads)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        known = None if cls._known_heads is None else list(cls._known_heads)
        VASRequest.from_extra_args(sampling_params.extra_args, known)

    def __init__(self, vllm_config: "VllmConfig", device: torch.device, is_pin_memory: bool):
        self.config = VASConfig.from_additional_config(vllm_config.additional_config)
        self.rows: dict[int, _Row] = {}
        self.batch: _Batch | None = None  # self.rows as tensors (invariant: rebuilt when rows change)
        self.device = device
        self.runtime: ValueRuntime | None = None
        self.tap: HiddenStateTap | None = None  # set when a value model takes the shared path
        self.requests_total = 0  # VAS requests admitted (rows steered), shared-path ones included
        self.dropped_requests = 0  # VAS requests that found no free cache slot
        self.resumed_requests = 0  # VAS requests re-added with outputs (after preemption)
        # Steps with steered rows, and the time of their whole VAS work (candidates, values, logits
        # update): the processor's own share of a step, on any runtime path. Host wall time: on a
        # GPU, where kernels run asynchronously, it counts launches and any syncs, not kernel time.
        self.steps = 0
        self.seconds = 0.0
        self.heads: dict[str, HeadInfo] = {}  # by name, from vas.json (each model's default top-K)
        self.heap = HeapTrimmer()
        if not self.config.value_models:
            return
        self.heads = self.config.heads()
        self.runtime, self.tap = _build_runtime(self.config, vllm_config, device)

    def is_argmax_invariant(self) -> bool:
        return False

    # -- batch bookkeeping ----------------------------------------------------------------------

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self.heap.step()  # vLLM calls update_state once per engine step
        if self.tap is not None and not self.tap.attached:
            self.tap.attach()  # first engine step: the base model is loaded by now
        if batch_update is None or self.runtime is None:
            return
        for index in batch_update.removed:
            self._drop(index)
        for index, params, prompt, outputs in batch_update.added:
            self._drop(index)
            row = self._new_row(params, prompt, outputs)
            if row is not None:
                self.rows[index] = row
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if direction == MoveDirectionality.SWAP:
                if row_b is not None:
                    self.rows[a] = row_b
            elif row_b is not None:  # a one-way move overwrites b
                self.runtime.release(row_b.input.slot)
            if row_a is not None:
                self.rows[b] = row_a
        self.batch = _Batch.of(self.rows, self.runtime.head_index, self.device)

    def _drop(self, index: int) -> None:
        row = self.rows.pop(index, None)
        if row is not None:
            self.runtime.release(row.input.slot)

    def _new_row(self, params, prompt: list[int] | None, outputs: list[int]) -> _Row | None:
        from vas_server.value_runtime import RowInput

        runtime = self.runtime
        try:
            request = VASRequest.from_extra_args(params.extra_args, runtime.head_names)
        except ValueError as e:  # validated at admission; only a direct engine user gets here
            logger.error("VAS settings rejected in the worker, request runs unsteered: %s", e)
            return None
        if request is None or not request.active:
            return None
        if prompt is None:
            logger.error("VAS needs prompt token ids (prompt embeddings are not supported); unsteered")
            return None
        if outputs:
            self.resumed_requests += 1
        heads = frozenset(runtime.head_index[name] for name in request.weights)
        slot = None
        if runtime.needs_slot(heads):  # only separate-trunk heads keep a value cache
            slot = runtime.allocate()
            if slot is None:
                # Unreachable through engine_kwargs, which caps max_num_seqs at the cache capacity
                # (so extra requests wait in vLLM's queue); only a hand-built engine can get here.
                self.dropped_requests += 1
                logger.error("VAS value cache full (%d requests); request runs unsteered", runtime.max_requests)
                return None
        top_k = self.config.top_k_for(request, self.heads)
        self.requests_total += 1
        return _Row(request, top_k, RowInput(slot, prompt, outputs, heads))

    # -- the sampling rule ------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.rows:
            start = time.perf_counter()
            logits = self._steer(logits)
            self.steps += 1
            self.seconds += time.perf_counter() - start
        if self.tap is not None:
            self.tap.clear()  # this step's hidden states are used up
        return logits

    def _steer(self, logits: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        # When every row of the step is a VAS row (batch.index is then 0..B-1), steer the logits in
        # place; else steer a copy of the VAS rows and write them back.
        every_row = len(batch.inputs) == logits.shape[0]
        row_logits = logits if every_row else logits.index_select(0, batch.index)
        k = min(batch.k_max, logits.shape[1])
        candidates = row_logits.topk(k, dim=1).indices  # C, best first
        values = self.runtime.score(batch.inputs, candidates, batch.index, logits.shape[0])  # [B, n_heads, k]
        valid = batch.valid[:, :k]
        bonus = rule.bonus(values.to(logits.device), batch.weights, valid)
        rule.steer_(row_logits, candidates, bonus, valid, batch.restrict)
        if not every_row:
            logits.index_copy_(0, batch.index, row_logits)
        return logits

    # -- introspection (metrics, tests) -----------------------------------------------------------

    def stats(self) -> dict:
        rt = self.runtime
        return {
            "vas_requests_total": self.requests_total,
            "active_requests": len(self.rows),
            "steps": self.steps,
            "runtime_seconds_total": self.seconds,
            "cache_slots_used": rt.slots_in_use if rt else 0,
            "cache_slots_total": rt.max_requests if rt else 0,
            "cache_bytes": rt.cache_bytes if rt else 0,
            "dropped_requests": self.dropped_requests,
            "resumed_requests": self.resumed_requests,
            "heap_trims": self.heap.trims,
            "heap_trim_seconds_total": self.heap.seconds,
        }


def _build_runtime(config: VASConfig, vllm_config: "VllmConfig",
                   device: torch.device) -> tuple["ValueRuntime", "HiddenStateTap | None"]:
    """The value runtime of all configured value models, and the hidden-state tap when any of
    them takes the shared path (vas_server.config.runtime_path, read from vas.json)."""
    from transformers import AutoTokenizer

    from value_models.format import check_tokenizer, load_spec, tokenizer_identity
    from value_models.model import load_value_heads, load_value_model
    from vas_server.config import runtime_path
    from vas_server.hidden_states import HiddenStateTap, find_model_runner
    from vas_server.value_runtime import SharedRunner, ValueRuntime

    model_config = vllm_config.model_config
    base_dir = model_config.model
    tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer or base_dir,
                                              trust_remote_code=model_config.trust_remote_code)
    identity = tokenizer_identity(tokenizer)
    dtype = model_config.dtype if config.dtype == "auto" else getattr(torch, config.dtype)
    value_device = torch.device(config.device) if config.device else device
    specs = {name: load_spec(Path(path)) for name, path in config.value_models.items()}
    models = [
        load_value_model(config.value_models[name], base_dir, name=name, base_tokenizer=identity,
                         base_model_name=base_dir, dtype=dtype, device=value_device)
        for name, spec in specs.items() if runtime_path(spec) == "separate"
    ]
    shared_specs = {name: spec for name, spec in specs.items() if runtime_path(spec) == "shared"}
    tap, shared = None, []
    if shared_specs:
        tap = HiddenStateTap(find_model_runner(), {spec.trunk.num_layers for spec in shared_specs.values()})
        hf = model_config.hf_config
        for name, spec in shared_specs.items():
            path = config.value_models[name]
            check_tokenizer(spec, identity, value_model=path, base_model=base_dir)
            # On the worker's device (not config.device): the base's states and embedding live there.
            heads = load_value_heads(path, spec, hf.hidden_size, hf.vocab_size, dtype=dtype, device=device)
            shared.append(SharedRunner(name, heads, spec.trunk.num_layers, tap))
    max_requests = config.max_requests or vllm_config.scheduler_config.max_num_seqs
    runtime = ValueRuntime(models, max_requests, model_config.max_model_len, value_device, dtype, shared)
    base_layers = model_config.hf_config.num_hidden_layers
    for name, spec in specs.items():
        if name in shared_specs:
            logger.info("VAS value model %r: shared path (token heads on the base's own layer-%d of %d "
                        "hidden states; no trunk, no value cache)", name, spec.trunk.num_layers, base_layers)
        else:
            logger.info("VAS value model %r: separate runtime (own %s trunk%s, %s heads; value cache)", name,
                        spec.trunk.type, " with LoRA" if spec.trunk.lora else "",
                        "/".join(sorted({h.kind for h in spec.heads})))
    logger.info("VAS: %d value model(s), heads %s, value cache %.1f MiB for %d requests x %d tokens",
                len(specs), runtime.head_names, runtime.cache_bytes / 2**20, runtime.max_requests,
                model_config.max_model_len)
    return runtime, tap


class VASWorkerExtension:
    """Mixed into vLLM's worker class (engine arg `worker_extension_cls`), so the API process can
    read the processor's counters with `engine.collective_rpc("vas_stats")`."""

    def vas_stats(self) -> dict:
        procs = self.model_runner.input_batch.logitsprocs.non_argmax_invariant
        proc = next((p for p in procs if isinstance(p, VASLogitsProcessor)), None)
        return proc.stats() if proc is not None else {}
