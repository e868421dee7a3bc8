"""The hidden-state tap: the served base's own layer-N states, read from vLLM's forward pass.

For a value model on the shared-trunk path (vas_server.config.runtime_path), the trunk state at a
row's sampled position is the base's residual stream after its first N layers, passed through the
base's final norm: exactly what value_models.trunk.Trunk (N layers, final norm) computes, and what
training uses (value_models.training_trunk: HF's `last_hidden_state` of the base cut to N layers).
vLLM computes that residual stream for every scheduled token anyway; the tap copies it out at the
positions vLLM samples from, one row per logits row, so the value heads need no trunk and no cache.

Everything here that depends on vLLM internals (pinned at vllm 0.32.0; tests/test_shared_trunk.py
checks the values against an HF reference and against the separate value runtime):
  1. Logits processors are built inside `GPUModelRunner.__init__` (also the CPU runner's), via
     `InputBatch(...)` -> `build_logitsprocs`, before the model is loaded. `find_model_runner`
     finds that runner on the call stack; `HiddenStateTap.attach` installs the hooks later, on the
     processor's first `update_state` (the first engine step, after `load_model`).
  2. `runner.get_model().model` has `layers` (decoder layers whose forward returns
     `(hidden_states, residual)`, the residual stream after the layer being their sum; their
     successor's fused add-norm updates `residual` in place, so the hook copies first), `norm`
     (an RMSNorm with `weight` and `variance_epsilon`) and `embed_tokens` (weight [>= vocab, H]):
     vLLM's llama, mistral and qwen2 models, the trunk types value models support.
  3. Without speculative decoding, logits row i belongs to request i of `runner.input_batch`
     (`input_batch.num_reqs` rows) and is sampled at that request's last scheduled token:
     `logits_indices = query_start_loc[1:] - 1` (`_prepare_inputs`), where `query_start_loc` is
     the runner's persistent buffer `runner.query_start_loc.gpu` (on CPU the same tensor as
     `.cpu`), filled before the forward runs. Partial chunked-prefill rows are sampled too (the
     token is discarded), so they get a state as well; it is simply unused.
  4. The decoder layers run eagerly, so a Python forward hook runs at every forward. CUDA-graph
     replay would skip it: engine_kwargs sets `enforce_eager` when a shared-path model is loaded,
     and `states()` raises if this step's forward did not fill a layer.
"""

from __future__ import annotations

import sys

import torch

from value_models.trunk import rms_norm


def find_model_runner():
    """The vLLM model runner whose __init__ is building the calling logits processor (internal 1)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, GPUModelRunner):
            return candidate
        frame = frame.f_back
    raise RuntimeError("the shared-trunk value path needs vLLM's V1 model runner (GPUModelRunner or "
                       "CPUModelRunner), which was not found building the logits processor")


class HiddenStateTap:
    """Per engine step: for each requested depth N, `states(N)` is [num_reqs, H], row i the base's
    residual stream after layer N at request i's sampled position, through the final norm.

    Invariant: a state is set by this step's forward (hooks) and dropped by `clear()`, which the
    processor calls at the end of every `apply`; so `states` never returns an earlier step's rows.
    """

    def __init__(self, runner, layers: set[int]):
        config = runner.vllm_config
        if config.speculative_config is not None:
            raise ValueError("the shared-trunk value path does not support speculative decoding")
        if config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError("the shared-trunk value path does not support pipeline parallelism")
        total = config.model_config.hf_config.num_hidden_layers
        bad = [n for n in layers if not 1 <= n <= total]
        if bad:
            raise ValueError(f"value-model trunk depth {bad} outside the base's 1..{total} layers")
        self.runner = runner
        self.layers = sorted(layers)
        self.attached = False
        self._states: dict[int, torch.Tensor] = {}
        self._norm_weight: torch.Tensor | None = None
        self._eps = 0.0
        self.embedding: torch.Tensor | None = None  # the base's input embedding [>= V, H]

    def attach(self) -> None:
        """Install one forward hook per depth on the loaded base model (internal 2)."""
        decoder = self.runner.get_model().model
        self._norm_weight = decoder.norm.weight
        self._eps = decoder.norm.variance_epsilon
        self.embedding = decoder.embed_tokens.weight
        for n in self.layers:
            decoder.layers[n - 1].register_forward_hook(self._hook(n))
        self.attached = True

    def _hook(self, n: int):
        def capture(module, args, output) -> None:
            hidden, residual = output
            runner = self.runner
            num_reqs = runner.input_batch.num_reqs
            if num_reqs == 0:  # profiling and warm-up runs
                return
            sampled = runner.query_start_loc.gpu[1:num_reqs + 1] - 1  # = logits_indices (internal 3)
            stream = hidden.index_select(0, sampled) + residual.index_select(0, sampled)
            self._states[n] = rms_norm(stream, self._norm_weight, self._eps)

        return capture

    def states(self, n: int, rows: int) -> torch.Tensor:
        """This step's layer-n states, [rows, H] (rows = the logits' row count)."""
        state = self._states.get(n)
        if state is None or state.shape[0] != rows:
            raise RuntimeError(
                f"no layer-{n} hidden states for this step's {rows} logits rows: the base's forward "
                "did not run the VAS hook (CUDA graphs or torch.compile? the shared-trunk path needs "
                "enforce_eager) or vLLM's batch layout differs from the one vas_server.hidden_states expects")
        return state

    def clear(self) -> None:
        self._states.clear()
