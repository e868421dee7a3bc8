"""vLLM's own decoder classes with the hidden-state tap built in, one per architecture.

vas_server.plugin registers `Tap<...>` names of this module for every text-generation architecture
of vLLM's registry (a `vllm.general_plugins` entry point, so every vLLM process of this
environment, `vllm serve` included, resolves them). A name is resolved on first use, by vLLM's
lazy registry, through this module's `__getattr__`: `tap_class_name` encodes the vLLM module and
class, and `tap_class` builds the subclass. So nothing is imported until vLLM builds the model, and
only the served architecture's class is ever created.

Which architectures get a tap is vLLM's own answer, not a hand list: a class that implements
vLLM's EAGLE-3 interface (`supports_eagle3`: its decoder mixes in EagleModelMixin and outputs aux
hidden states) gets one; any other name resolves to vLLM's class itself, unchanged
(vas_server.plugin refuses a shared-path value model for it at startup, naming the path it can
take).

A tap class is vLLM's class with three overrides, and behaves exactly as that class when no
shared-path value model is configured:
  * `__init__`: turn on the decoder's aux hidden-state outputs at the value models' depths;
  * `forward`: return the final hidden state with those states appended as columns;
  * `compute_logits`: hand the sampled rows to the tap, and the LM head its usual input.
vas_server.engine.hidden_states explains why this survives torch.compile and CUDA graphs.
"""

from __future__ import annotations

import importlib
from functools import cache

import torch
from vllm.sequence import IntermediateTensors

from vas_server.engine.hidden_states import HiddenStateTap
from vas_server.engine.pp_stage import prepare_stage

_PREFIX = "Tap"
_MODULE_SEP = "__"  # between the parts of the vLLM module name
_CLASS_SEP = "___"  # between the module and the class


def tap_class_name(module_name: str, class_name: str) -> str:
    """'vllm.model_executor.models.qwen3', 'Qwen3ForCausalLM' -> an attribute name of this module."""
    return _PREFIX + _MODULE_SEP.join(module_name.split(".")) + _CLASS_SEP + class_name


def vllm_class(name: str) -> type:
    """The vLLM class a `tap_class_name` stands for (imports its module)."""
    module, _, cls = name.removeprefix(_PREFIX).rpartition(_CLASS_SEP)
    return getattr(importlib.import_module(".".join(module.split(_MODULE_SEP))), cls)


def supports_tap(model_cls: type) -> bool:
    """vLLM's own flag: the class implements EAGLE-3's aux hidden-state outputs."""
    from vllm.model_executor.models.interfaces import supports_eagle3

    return supports_eagle3(model_cls)


class TapMixin:
    """Placed before the vLLM class in the MRO; `self.model` is the vLLM decoder."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        tap = HiddenStateTap.for_config(vllm_config)
        self.vas_tap = tap if tap.active else None
        if self.vas_tap is not None:
            # vLLM's EAGLE-3 interface: the decoder returns (final, [hidden + residual at each layer]).
            self.set_aux_hidden_state_layers(tap.aux_layers)
            # Under PP: the last stage's own embedding and the aux states' receive buffer (before
            # bind, which takes the embedding module).
            prepare_stage(self, vllm_config.model_config.hf_text_config, vllm_config.quant_config)
            tap.bind(self)

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        if self.vas_tap is None or isinstance(output, IntermediateTensors):  # not the last PP stage
            return output
        return self.vas_tap.output(output)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self.vas_tap is not None:
            hidden_states = self.vas_tap.publish(hidden_states)
        return super().compute_logits(hidden_states)


@cache
def tap_class(name: str) -> type:
    """The class registered as `name`: vLLM's class with TapMixin, or vLLM's class itself when it
    has no aux hidden-state outputs."""
    base = vllm_class(name)
    if not supports_tap(base):
        return base
    return type(f"Tap{base.__name__}", (TapMixin, base), {"__module__": __name__, "__qualname__": name})


def __getattr__(name: str) -> type:
    if not name.startswith(_PREFIX) or _CLASS_SEP not in name:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return tap_class(name)
