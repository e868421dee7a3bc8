"""The value runtime of an engine's value models: the worker's (`build_runtime`: shared-path
scorers on the hidden-state tap, plus the separate runtime's own trunks, built by
vas_server.value_runtimes, which remote mode uses too)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vllm.logger import init_logger

from vas_server.config import VASConfig
from vas_server.core.value_runtime import ValueRuntime
from vas_server.engine.hidden_states import HiddenStateTap
from vas_server.value_runtimes import separate_runtime, value_dtype

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = init_logger("vllm.plugins.vas")  # under "vllm." so that the worker process prints it


def build_runtime(config: VASConfig, vllm_config: "VllmConfig",
                   device: torch.device) -> tuple[ValueRuntime, HiddenStateTap | None]:
    """The value runtime of all configured value models, and the hidden-state tap when any of
    them takes the shared path (vas_server.config.runtime_path, read from vas.json)."""
    from transformers import AutoTokenizer

    from vas_server.core.format import check_tokenizer, tokenizer_identity
    from vas_server.core.model import load_value_heads
    from vas_server.config import runtime_path
    from vas_server.core.shared_scorer import SharedScorer

    model_config = vllm_config.model_config
    base_dir = model_config.model
    tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer or base_dir,
                                              trust_remote_code=model_config.trust_remote_code)
    identity = tokenizer_identity(tokenizer)
    dtype = value_dtype(config, model_config)
    specs = config.specs()
    shared_specs = {name: spec for name, spec in specs.items() if runtime_path(spec) == "shared"}
    tap, shared = None, []
    if shared_specs:
        tap = HiddenStateTap.for_config(vllm_config)
        hf = model_config.hf_config
        for name, spec in shared_specs.items():
            path = config.value_models[name]
            check_tokenizer(spec, identity, value_model=path, base_model=base_dir)
            # On the worker's device (not config.device): the base's states and embedding live there.
            value_heads = load_value_heads(path, spec, hf.hidden_size, hf.vocab_size, dtype=dtype, device=device)
            shared.append(SharedScorer(name, value_heads, spec.trunk.num_layers, tap))
    separate = [name for name in specs if name not in shared_specs]
    runtime = separate_runtime(config, vllm_config, identity, separate, config.device or device, shared)
    base_layers = model_config.hf_config.num_hidden_layers
    for name, spec in specs.items():
        if name in shared_specs:
            logger.info("VAS value model %r: shared path (token heads on the base's own layer-%d of %d "
                        "hidden states, read inside its forward; no trunk, no value cache)", name,
                        spec.trunk.num_layers, base_layers)
        else:
            logger.info("VAS value model %r: separate runtime (own %s trunk%s, %s heads; value cache)", name,
                        spec.trunk.type, " with LoRA" if spec.trunk.lora else "",
                        "/".join(sorted({h.kind for h in spec.heads})))
    logger.info("VAS: %d value model(s), heads %s, value cache %.1f MiB now, growing with use to at most %.1f MiB "
                "(%d requests x %d tokens)", len(specs), runtime.head_names, runtime.cache_bytes / 2**20,
                runtime.max_cache_bytes / 2**20, runtime.max_requests, model_config.max_model_len)
    compilation = vllm_config.compilation_config
    logger.info("VAS steers the base's %s forward (compilation mode %s, CUDA graphs %s), %s runner",
                "eager" if model_config.enforce_eager else "compiled", compilation.mode,
                compilation.cudagraph_mode, "Model Runner V2" if vllm_config.use_v2_model_runner else "V1")
    return runtime, tap
