"""vLLM's own Llama, Mistral and Qwen2 model classes with the hidden-state tap built in.

vas_server.plugin registers these for their architectures (a `vllm.general_plugins` entry point,
so every vLLM process of this environment, `vllm serve` included, uses them). Each is vLLM's class
with three overrides, and is exactly that class when no shared-path value model is configured:
  * `__init__`: turn on the decoder's aux hidden-state outputs at the value models' depths;
  * `forward`: return the final hidden state with those states appended as columns;
  * `compute_logits`: hand the sampled rows to the tap, and the LM head its usual input.
vas_server.hidden_states explains why this survives torch.compile and CUDA graphs.

These are the architectures vas_server.core.trunk supports (SUPPORTED_MODEL_TYPES); their vLLM
decoders all mix in EagleModelMixin, which the aux outputs need.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from vas_server.hidden_states import HiddenStateTap


class TapMixin:
    """Placed before the vLLM class in the MRO; `self.model` is the vLLM decoder."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        tap = HiddenStateTap.for_config(vllm_config)
        self.vas_tap = tap if tap.active else None
        if self.vas_tap is not None:
            tap.model = self
            self.model._set_aux_hidden_state_layers(tap.aux_layers)
            from vas_server.pp_stage import prepare_stage

            prepare_stage(self, vllm_config.model_config.hf_config, vllm_config.quant_config)

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        from vllm.sequence import IntermediateTensors

        if self.vas_tap is None or isinstance(output, IntermediateTensors):  # not the last PP stage
            return output
        return self.vas_tap.output(output)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self.vas_tap is not None:
            hidden_states = self.vas_tap.publish(hidden_states)
        return super().compute_logits(hidden_states)


class TapLlamaForCausalLM(TapMixin, LlamaForCausalLM):
    pass


class TapMistralForCausalLM(TapMixin, MistralForCausalLM):
    pass


class TapQwen2ForCausalLM(TapMixin, Qwen2ForCausalLM):
    pass

