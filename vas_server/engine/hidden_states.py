"""The hidden-state tap: the served base's own layer-N states, handed over at `compute_logits`.

For a value model on the shared-trunk path (vas_server.config.runtime_path), the trunk state at a
row's sampled position is the base's residual stream after its first N layers, through the base's
final norm: exactly what vas_server.core.trunk.Trunk (N layers, final norm) computes and what
training uses. vLLM computes that residual stream for every scheduled token anyway. The tap gets
it out of vLLM's own forward without hooks, so it survives torch.compile and CUDA graphs:

  1. vas_server.engine.tap_models registers, for the base's architecture, vLLM's own model class with
     three small overrides. At init it turns on vLLM's auxiliary hidden-state outputs (the EAGLE-3
     mechanism, `SupportsEagle3.set_aux_hidden_state_layers`) for the value models' depths
     N < num_layers: the compiled decoder then returns `hidden + residual` after layer N as an
     extra output, computed inside the compiled graph (and captured by CUDA graphs).
  2. `forward` returns one tensor, [tokens, H * (1 + depths)]: the final hidden state with the
     aux states appended as columns. Both model runners (V1 and V2) select the sampled rows of
     the forward's output (`hidden_states[logits_indices]`) and pass exactly those rows, in logits
     order, to `compute_logits`, eagerly, right before sampling.
  3. `compute_logits` splits the columns again: the first H go to the LM head as usual, and the
     rows are published here (`publish`), one row per logits row. For N = num_layers the
     state is `compute_logits`'s own input (the final norm is already applied); for N < num_layers
     the base's own final-norm module (`decoder.norm`: RMSNorm, Gemma's (1 + w) RMSNorm, ...) is
     applied here, on the sampled rows only. Whatever an architecture multiplies into its
     residual stream (Granite's embedding and residual multipliers, Gemma's embedding scale) is
     inside vLLM's decoder and so inside the state; what it applies after the final norm
     (Granite's logits scaling, soft-capping) belongs to the LM head, not to the state.

The processor (built on the same VllmConfig: before the model by the V1 runner, after it by
Model Runner V2; whichever comes first creates the tap) reads the rows in
`apply`, which runs after `compute_logits` in the same step. Model and processor meet through
`HiddenStateTap.for_config(vllm_config)`: one tap per engine configuration in the process.

Invariants: `states(n, rows)` returns rows published by this step's `compute_logits` (the
processor `clear()`s the tap after each use, so a step whose forward published nothing fails
loudly instead of reusing an earlier step's rows); row i is logits row i.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from vas_server.core.heads import DenseEmbedding, Embedding

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def shared_depths(vllm_config: "VllmConfig") -> tuple[int, ...]:
    """The trunk depths N of the shared-path value models in this engine's VAS config (sorted)."""
    from vas_server.config import VASConfig, runtime_path

    specs = VASConfig.from_additional_config(vllm_config.additional_config).specs().values()
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
        self.norm: torch.nn.Module | None = None  # the base's final norm (bound by the model class)
        # the base's input embedding (same): under TP a VocabParallelEmbedding, this rank's shard
        self.embed_module: torch.nn.Module | None = None
        self._rows: torch.Tensor | None = None  # this step's published rows [R, H * (1 + aux)]
        self.tensor_parallel = False  # the embedding is this rank's vocabulary shard
        self._embedding: Embedding | None = None

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
        # Token heads score a vocabulary-parallel embedding under TP (vas_server.engine.tp_heads).
        tap.tensor_parallel = parallel.tensor_parallel_size > 1
        cls._by_config[id(vllm_config)] = (vllm_config, tap)
        return tap

    @property
    def active(self) -> bool:
        return bool(self.depths)

    @property
    def embedding(self) -> Embedding:
        """The base's input embedding, as token heads read it (vas_server.core.heads.Embedding):
        the whole matrix, or under tensor parallelism this rank's vocabulary shard, whose
        candidates' dot products one all-reduce adds up (vas_server.engine.tp_heads). Made at
        first use, once the model is bound."""
        if self._embedding is None:
            if self.tensor_parallel:
                from vllm.distributed import get_tp_group

                from vas_server.engine.tp_heads import VocabShard

                self._embedding = VocabShard(self.embed_module, get_tp_group().all_reduce)
            else:
                self._embedding = DenseEmbedding(self.embed_module.weight, reuse_rows=True)
        return self._embedding

    # -- the model side (vas_server.engine.tap_models) ------------------------------------------------

    def bind(self, causal_lm: torch.nn.Module) -> None:
        """Take the final norm and the input embedding of the loaded base (vLLM's *ForCausalLM,
        whose `model` is the decoder). Their weights are loaded later, in place."""
        decoder = causal_lm.model
        self.norm = decoder.norm
        self.embed_module = input_embedding(decoder)
        self._embedding = None

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
                "class is not vas_server.engine.tap_models' (is the vas_server plugin installed in this "
                "environment?), or vLLM's runner did not call compute_logits on the sampled rows")
        H = self.hidden_size
        if n == self.num_layers:
            return published[:, :H]
        i = 1 + self.aux_layers.index(n)
        out = self.norm(published[:, i * H:(i + 1) * H].contiguous())
        return out[0] if isinstance(out, tuple) else out  # vLLM norms return (out, residual) with one

    def clear(self) -> None:
        self._rows = None


# Attribute names vLLM's decoders give their token embedding (Llama, Qwen, Gemma, Granite, ...: the
# first; gpt-oss: the second). Gemma 3n/4 have further per-layer embeddings, never the input one.
_EMBEDDING_NAMES = ("embed_tokens", "embedding", "wte", "word_embeddings")


def input_embedding(decoder: torch.nn.Module) -> torch.nn.Module:
    """The decoder's input token embedding module."""
    for name in _EMBEDDING_NAMES:
        module = getattr(decoder, name, None)
        if isinstance(module, torch.nn.Module) and hasattr(module, "weight"):
            return module
    raise ValueError(f"{type(decoder).__name__} has no input embedding named {' / '.join(_EMBEDDING_NAMES)}: "
                     "token heads need the base's embedding rows")
