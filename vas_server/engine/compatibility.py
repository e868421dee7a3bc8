"""Which value models a served base can take, checked once at engine start (vas_server.plugin).

A value model reaches the base by one of two paths (vas_server.config.runtime_path):
  * shared: token heads on the base's own layer-N states, read out of vLLM's forward. It needs
    vLLM's aux hidden-state outputs for the base's architecture (vas_server.engine.tap_models);
  * separate: the value model's own trunk in vas_server.core.trunk, a hand-written decoder that
    covers the dense model types in SUPPORTED_MODEL_TYPES (a base_prefix trunk is the base's own
    layers, so the base's type; a standalone trunk its own).

A base_prefix value model also records the base it was trained on (architecture, layers, hidden
size); a different served base would steer with states the heads never saw, so it is refused.
Every refusal names the value model, the base and what would work instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from vas_server.config import HeadInfo
from vas_server.core.format import STANDALONE_DIR, TrunkSpec
from vas_server.core.heads import KINDS


def check_value_models(head_infos: Mapping[str, HeadInfo], model_config) -> None:
    """ValueError for the first value model the served base cannot take. `head_infos` is
    VASConfig.read_heads(): every value model has at least one head (format.load_spec refuses
    one without), and its heads' infos carry what the checks read of its vas.json (trunk,
    runtime path, head kinds), so no vas.json is read here again."""
    hf = model_config.hf_text_config
    arch = model_config.architecture
    by_model: dict[str, list[HeadInfo]] = {}
    for info in head_infos.values():
        by_model.setdefault(info.value_model, []).append(info)
    for name, infos in by_model.items():
        trunk, path = infos[0].trunk, infos[0].path
        check_trained_base(name, trunk, arch, hf)
        if infos[0].runtime == "shared":
            check_shared_path(name, trunk, arch, model_config)
        else:
            check_separate_trunk(name, trunk, [info.spec.kind for info in infos], path, arch, hf)


def check_trained_base(name: str, trunk: TrunkSpec, arch: str, hf) -> None:
    """A base_prefix model's depth fits the base, and the base is the one it was trained on."""
    if trunk.type != "base_prefix":
        return
    if not 1 <= trunk.num_layers <= hf.num_hidden_layers:
        raise ValueError(f"value model {name!r} reads the base's first {trunk.num_layers} layers, but the served "
                         f"base ({arch}) has {hf.num_hidden_layers}")
    trained = (trunk.base_architecture, trunk.base_num_layers, trunk.base_hidden_size)
    served = (arch, hf.num_hidden_layers, hf.hidden_size)
    if any(t is not None and t != s for t, s in zip(trained, served)):
        raise ValueError(f"value model {name!r} was trained on a base_prefix trunk of {_describe(*trained)}, but "
                         f"the served base is {_describe(*served)}: its heads would read states they never saw. "
                         "Serve it with the base it was trained on, or train it on this one (vas-train fit).")


def check_shared_path(name: str, trunk: TrunkSpec, arch: str, model_config) -> None:
    """The base's vLLM class has the tap (vas_server.engine.tap_models), so its states can be read."""
    from vllm.model_executor.models.registry import ModelRegistry

    from vas_server.engine.tap_models import TapMixin

    model_cls, _ = ModelRegistry.resolve_model_cls(model_config.architectures, model_config)
    if issubclass(model_cls, TapMixin):
        return
    separate = ("or give it a state head or LoRA so that it takes the separate runtime on the base's own "
                "layers, " if _trunk_support(model_config.hf_text_config.to_dict()) is None else "")
    raise ValueError(
        f"value model {name!r} takes the shared path (token heads on the base's own layer-{trunk.num_layers} "
        f"hidden states), which needs vLLM's aux hidden-state outputs (EagleModelMixin / SupportsEagle3); vLLM's "
        f"{arch} ({model_cls.__name__}) has none. It can still be served {separate}with a standalone trunk of "
        f"its own (vas-train fit --trunk standalone, a model of type {', '.join(_supported_types())} that shares "
        "the base's tokenizer), or by remote mode's separate trunks.")


def check_separate_trunk(name: str, trunk: TrunkSpec, head_kinds: Sequence[str], path: str, arch: str, hf) -> None:
    """The separate runtime's hand-written trunk covers the trunk's model type."""
    if trunk.type == "base_prefix":
        source, hf_dict = f"the base's ({arch})", hf.to_dict()
    else:
        source = "its standalone trunk's"
        hf_dict = json.loads((Path(path) / STANDALONE_DIR / "config.json").read_text())
    reason = _trunk_support(hf_dict)
    if reason is None:
        return
    candidate_kinds = [kind for kind in head_kinds if KINDS[kind].reads_candidate_states]
    why = f"a {candidate_kinds[0]} head" if candidate_kinds else "LoRA" if trunk.lora else "its trunk"
    shared = (" Token heads without LoRA on the base's own layers take the shared path instead, which "
              "covers every architecture with vLLM aux hidden states." if trunk.type == "base_prefix" else "")
    raise ValueError(f"value model {name!r} needs the separate runtime ({why}), whose trunk cannot run "
                     f"{source} layers: {reason}.{shared}")


def _trunk_support(hf_dict: dict) -> str | None:
    """None when vas_server.core.trunk can build this HF config, else why not."""
    from vas_server.core.trunk import TrunkConfig

    try:
        TrunkConfig.from_hf(hf_dict)
    except (ValueError, KeyError) as e:
        return str(e)
    return None


def _supported_types() -> tuple[str, ...]:
    from vas_server.core.trunk import SUPPORTED_MODEL_TYPES

    return SUPPORTED_MODEL_TYPES


def _describe(arch, layers, hidden) -> str:
    return f"{arch or 'an unrecorded architecture'} ({layers or '?'} layers, hidden size {hidden or '?'})"
