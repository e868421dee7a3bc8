"""The hidden-state tap: the served base's own layer-N states, handed over at `compute_logits`.

For a value model on the shared-trunk path (vas_server.config.runtime_path), the trunk state at a
row's sampled position is the base's residual stream after its first N layers, through the base's
final norm: exactly what vas_server.core.trunk.Trunk (N layers, final norm) computes and what
training uses. vLLM computes that residual stream for every scheduled token anyway. The tap gets
it out of vLLM's own forward without hooks, so it survives torch.compile and CUDA graphs:

  1. vas_server.tap_models registers, for the base's architecture, vLLM's own model class with
     three small overrides. At init it turns on vLLM's auxiliary hidden-state outputs (the EAGLE-3
     mechanism, `EagleModelMixin._set_aux_hidden_state_layers`) for the value models' depths
     N < num_layers: the compiled decoder then returns `hidden + residual` after layer N as an
     extra output, computed inside the compiled graph (and captured by CUDA graphs).
  2. `forward` returns one tensor, [tokens, H * (1 + depths)]: the final hidden state with the
     aux states appended as columns. Both model runners (V1 and V2) select the sampled rows of
     the forward's output (`hidden_states[logits_indices]`) and pass exactly those rows, in logits
     order, to `compute_logits`, eagerly, right before sampling.
  3. `compute_logits` splits the columns again: the first H go to the LM head as usual, and the
     rows are published here (`publish`), one row per logits row. For N = num_layers the
     state is `compute_logits`'s own input (the final norm is already applied); for N < num_layers
     the final norm is applied here, on the sampled rows only.

The processor (built by the runner before the model, on the same VllmConfig) reads the rows in
`apply`, which runs after `compute_logits` in the same step. Model and processor meet through
`HiddenStateTap.for_config(vllm_config)`: one tap per engine configuration in the process.

Invariants: `states(n, rows)` returns rows published by this step's `compute_logits` (the
processor `clear()`s the tap after each use, so a step whose forward published nothing fails
loudly instead of reusing an earlier step's rows); row i is logits row i.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from vas_server.core.trunk import rms_norm

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def shared_depths(vllm_config: "VllmConfig") -> tuple[int, ...]:
    """The trunk depths N of the shared-path value models in this engine's VAS config (sorted)."""
    from vas_server.core.format import load_spec
    from vas_server.config import VASConfig, runtime_path

    config = VASConfig.from_additional_config(vllm_config.additional_config)
    specs = [load_spec(path) for path in config.value_models.values()]
    return tuple(sorted({s.trunk.num_layers for s in specs if runtime_path(s) == "shared"}))


class HiddenStateTap:
    """Per engine step, `states(N, rows)` is [rows, H]: row i the base's state after layer N at
    logits row i's sampled position, through the final norm."""

    # One tap per VllmConfig object alive in this process (the model runner hands the same object
    # to the logits processors and to the model). Keyed by id() with the object kept alongside,
    # so that an id is never reused while its tap exists.
    _by_config: ClassVar[dict[int, tuple["VllmConfig", "HiddenStateTap"]]] = {}

    def __init__(self, depths: tuple[int, ...], num_layers: int, hidden_size: int, reject_reason: str | None):
        bad = [n for n in depths if not 1 <= n <= num_layers]
        if bad:
            raise ValueError(f"value-model trunk depth {bad} outside the base's 1..{num_layers} layers")
        if reject_reason and depths:
            raise ValueError(f"the shared-trunk value path does not support {reject_reason}")
        self.depths = depths
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        # Depths the decoder must output as extra columns (N = num_layers is compute_logits' input).
        self.aux_layers = tuple(n for n in depths if n < num_layers)
        self.model = None  # the loaded base (bound by the model class): final norm and embedding
        self._rows: torch.Tensor | None = None  # this step's published rows [R, H * (1 + aux)]
        self.tensor_parallel = False  # the embedding is this rank's vocabulary shard

    @classmethod
    def for_config(cls, vllm_config: "VllmConfig") -> "HiddenStateTap":
        entry = cls._by_config.get(id(vllm_config))
        if entry is not None and entry[0] is vllm_config:
            return entry[1]
        hf = vllm_config.model_config.hf_config
        parallel = vllm_config.parallel_config
        reason = ("speculative decoding" if vllm_config.speculative_config is not None else
                  # it computes logits with compute_logits_local, past the tap's hand-over
                  "batch-sharded sampling" if getattr(parallel, "enable_batch_sharded_sampling", False) else None)
        tap = cls(shared_depths(vllm_config), hf.num_hidden_layers, hf.hidden_size, reason)
        # Token heads score a vocabulary-parallel embedding under TP (vas_server.tp_heads).
        tap.tensor_parallel = parallel.tensor_parallel_size > 1
        cls._by_config[id(vllm_config)] = (vllm_config, tap)
        return tap

    @property
    def active(self) -> bool:
        return bool(self.depths)

    @property
    def embedding(self) -> torch.Tensor:
        """The base's input embedding matrix [>= V, H] (token heads use the trunk's own)."""
        return self.embedding_layer.weight

    @property
    def embedding_layer(self):
        """The base's input embedding module (a VocabParallelEmbedding: under TP, this rank's shard)."""
        return self.model.model.embed_tokens

    # -- the model side (vas_server.tap_models) ------------------------------------------------

    def output(self, model_output):
        """The forward's return value: (final, [aux...]) from the decoder -> one tensor."""
        if not self.aux_layers:
            return model_output
        final, aux = model_output
        return torch.cat([final, *aux], dim=-1)

    def publish(self, rows: torch.Tensor) -> torch.Tensor:
        """compute_logits' input (the sampled rows of `output`); returns the LM head's input."""
        self._rows = rows
        return rows[:, :self.hidden_size] if self.aux_layers else rows

    # -- the processor side ---------------------------------------------------------------------

    def states(self, n: int, rows: int) -> torch.Tensor:
        """This step's layer-n states, [rows, H] (rows = the logits' row count)."""
        published = self._rows
        if published is None or published.shape[0] != rows:
            raise RuntimeError(
                f"no layer-{n} hidden states for this step's {rows} logits rows: the base model "
                "class is not vas_server.tap_models' (is the vas_server plugin installed in this "
                "environment?), or vLLM's runner did not call compute_logits on the sampled rows")
        H = self.hidden_size
        if n == self.num_layers:
            return published[:, :H]
        i = 1 + self.aux_layers.index(n)
        norm = self.model.model.norm
        return rms_norm(published[:, i * H:(i + 1) * H], norm.weight, norm.variance_epsilon)

    def clear(self) -> None:
        self._rows = None
