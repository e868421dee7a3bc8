"""The shared path under pipeline parallelism (vLLM's aux hidden states over PP stages).

The processor runs on the last stage, which needs (1) the aux states of layers computed on earlier
stages: Llama and Qwen2 send them with the stage's IntermediateTensors (`aux_hidden_states_<i>`,
EagleModelMixin.supports_aux_hidden_states_over_pp), but vLLM's V1 runner (the CPU one) receives
them into a buffer made by `make_empty_intermediate_tensors`, which has only `hidden_states` and
`residual`: it is widened here; (2) the input embedding for the token heads, which vLLM builds on
the first stage only (unless tied): the last stage builds its own VocabParallelEmbedding, loaded
from the checkpoint by vLLM's own loader (V x H / TP more memory on that stage).

Only the last stage samples, so only its logits processor steers (`samples_here`): the other
stages' processors load no value model and count nothing.
"""

from __future__ import annotations

from bisect import bisect_right

import torch


def samples_here() -> bool:
    """Whether this worker runs vLLM's sampler: the last pipeline stage, or any worker when
    pipeline parallelism is off (or no process group exists, as in unit tests)."""
    from vllm.distributed import parallel_state

    return parallel_state._PP is None or parallel_state.get_pp_group().is_last_rank


def prepare_stage(model, hf_config, quant_config) -> None:
    """`model` is the vLLM ...ForCausalLM (its decoder `model.model`), aux layers already set."""
    from vllm.distributed import get_pp_group
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from vllm.model_executor.models.utils import PPMissingLayer

    pp = get_pp_group()
    if pp.world_size < 2:
        return
    decoder = model.model
    if not getattr(decoder, "supports_aux_hidden_states_over_pp", False):
        raise ValueError(f"the shared-trunk value path does not support pipeline parallelism with "
                         f"{type(model).__name__}: vLLM carries no aux hidden states across its stages")
    if pp.is_last_rank and isinstance(decoder.embed_tokens, PPMissingLayer):
        decoder.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size,
                                                      quant_config=quant_config)
    if not pp.is_first_rank:
        upstream = bisect_right(decoder.aux_hidden_state_layers, decoder.start_layer)
        make = model.make_empty_intermediate_tensors
        H = hf_config.hidden_size

        def with_aux(batch_size: int, dtype: torch.dtype, device: torch.device):
            tensors = make(batch_size=batch_size, dtype=dtype, device=device)
            for i in range(upstream):
                tensors.tensors[f"{decoder.AUX_HIDDEN_STATE_KEY}{i}"] = torch.zeros(
                    (batch_size, H), dtype=dtype, device=device)
            return tensors

        model.make_empty_intermediate_tensors = with_aux
