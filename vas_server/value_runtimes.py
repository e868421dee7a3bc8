"""The separate value runtime, shared by the engine side (vas_server.engine.runtime_factory, for
its separate-trunk value models) and remote mode (every value model, since no hidden state comes
over HTTP): one place, so that neither side imports the other."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vas_server.config import VASConfig
from vas_server.core.value_runtime import ValueRuntime

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def value_dtype(config: VASConfig, model_config) -> torch.dtype:
    """The value models' dtype: the configured one, else the base's."""
    return model_config.dtype if config.dtype == "auto" else getattr(torch, config.dtype)


def separate_runtime(config: VASConfig, vllm_config: "VllmConfig", identity, names: list[str],
                     device: torch.device | str, shared: list = ()) -> ValueRuntime:
    """The value runtime with the value models `names` on their own trunks on `device` (plus the
    `shared` scorers): the worker's (build_runtime), and remote mode's, where every model is
    separate since no hidden state comes over HTTP. `identity` is the base tokenizer's, checked
    against each model's."""
    from vas_server.core.model import load_value_model

    model_config = vllm_config.model_config
    base_dir = model_config.model
    dtype = value_dtype(config, model_config)
    specs = config.specs()
    models = [load_value_model(config.value_models[name], base_dir, name=name, base_tokenizer=identity,
                               base_model_name=base_dir, dtype=dtype, device=device, spec=specs[name])
              for name in names]
    max_requests = config.max_requests or vllm_config.scheduler_config.max_num_seqs
    return ValueRuntime(models, max_requests, model_config.max_model_len, device, dtype, shared)
