"""vas-server's vLLM plugin (entry point `vllm.general_plugins` -> `register`), which vLLM loads in
every process it starts (API server, engine core, workers), `vllm serve` included:

  * the base-model classes with the hidden-state tap (vas_server.tap_models), registered for
    their architectures (lazily, by name: nothing heavy is imported until vLLM builds the model);
  * a configuration check for those architectures (vLLM's per-architecture `MODELS_CONFIG_MAP`
    hook, run when an engine's VllmConfig is created): with VAS value models in
    `additional_config["vas"]` it reads their vas.json files, so that a bad directory or a
    head-name clash fails the engine's start, naming it, with or without `vas-server serve`.

Without VAS settings both are inert: the classes are vLLM's own, and the check does nothing.
"""

from __future__ import annotations

# HF architecture name -> class in vas_server.tap_models (the trunk types value_models supports)
TAP_MODELS = {
    "LlamaForCausalLM": "TapLlamaForCausalLM",
    "MistralForCausalLM": "TapMistralForCausalLM",
    "Qwen2ForCausalLM": "TapQwen2ForCausalLM",
}


def register() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    for architecture, name in TAP_MODELS.items():
        ModelRegistry.register_model(architecture, f"vas_server.tap_models:{name}")
        previous = MODELS_CONFIG_MAP.get(architecture, VerifyAndUpdateConfig)
        if not getattr(previous, "vas_check", False):
            MODELS_CONFIG_MAP[architecture] = _with_vas_check(previous)


def _with_vas_check(previous: type) -> type:
    class VASConfigCheck(previous):
        vas_check = True

        @classmethod
        def verify_and_update_config(cls, vllm_config) -> None:
            previous.verify_and_update_config(vllm_config)
            check_vas_config(vllm_config)

    return VASConfigCheck


def check_vas_config(vllm_config) -> None:
    """Read the value models' specs: ValueError for a bad directory or a head-name clash."""
    from vas_server.config import ADDITIONAL_CONFIG_KEY, VASConfig

    if not (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY):
        return
    VASConfig.from_additional_config(vllm_config.additional_config).read_heads()
