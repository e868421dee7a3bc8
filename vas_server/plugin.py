"""vas-server's vLLM plugin (entry point `vllm.general_plugins` -> `register`), which vLLM loads in
every process it starts (API server, engine core, workers), `vllm serve` included:

  * the base-model classes with the hidden-state tap (vas_server.engine.tap_models), registered for
    every text-generation architecture of vLLM's registry, lazily, by name: nothing is imported
    until vLLM builds the model, and an architecture whose vLLM class has no aux hidden-state
    outputs resolves to vLLM's own class;
  * a configuration check for those architectures (vLLM's per-architecture `MODELS_CONFIG_MAP`
    hook, run when an engine's VllmConfig is created): with VAS value models in
    `additional_config["vas"]` it reads their vas.json files and checks them against the served
    base (vas_server.engine.compatibility), so that a bad directory, a head-name clash, a value model
    trained on another base, or a path the architecture cannot take fails the engine's start,
    naming both, with or without `vas-server serve`.

Without VAS settings both are inert: the classes are vLLM's own, and the check does nothing.
"""

from __future__ import annotations


def register() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig
    from vllm.model_executor.models.registry import _TEXT_GENERATION_MODELS, _LazyRegisteredModel

    from vas_server.engine.tap_models import tap_class_name

    for architecture in _TEXT_GENERATION_MODELS:
        entry = ModelRegistry.models.get(architecture)
        # vLLM's own lazy entry; one already loaded or registered by someone else is left alone.
        if isinstance(entry, _LazyRegisteredModel) and entry.module_name.startswith("vllm."):
            name = tap_class_name(entry.module_name, entry.class_name)
            ModelRegistry.register_model(architecture, f"vas_server.engine.tap_models:{name}")
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
    """Read the value models' specs and check them against the served base: ValueError for a bad
    directory, a head-name clash, or a value model this base cannot serve."""
    from vas_server.engine.compatibility import check_value_models
    from vas_server.config import ADDITIONAL_CONFIG_KEY, VASConfig

    if not (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY):
        return
    config = VASConfig.from_additional_config(vllm_config.additional_config)
    check_value_models(config.read_heads(), vllm_config.model_config)  # one read of each vas.json
