"""What vas-server's middleware knows of the running server, read once from vLLM's app.state:
the VAS configuration (from the engine's `additional_config["vas"]`), the heads and presets, the
API keys, and the served names and LoRA adapters that a request's `model` may name; and
`Admission`, steering settings made ready for vLLM, which it caches per preset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm import envs

from vas_server.http.auth import ApiKeys
from vas_server.config import REMOTE_KEY, HeadInfo, VASConfig
from vas_server.params import VASRequest, admitted
from vas_server.presets import PresetTable


@dataclass(frozen=True)
class Admission:
    """Steering settings ready for vLLM: validated, their top-K resolved (VASConfig.top_k_for),
    serialised and stamped (vas_server.http.steering_fields makes them). Invariant: `xargs` =
    params.admitted(request), `report` = server.applied(request.report()) (the top-K served),
    for one active request. Shared between requests: never modified."""

    xargs: dict[str, str]  # the `vllm_xargs` entries: {"vas": <JSON>, "vas_admitted": <stamp>}
    report: dict  # the `vas` echo

    @classmethod
    def of(cls, server: "ServerView", request: VASRequest) -> "Admission":
        # model_copy does not validate again: top_k_for gives a top-K in range.
        request = request.model_copy(update={"top_k": server.config.top_k_for(request, server.head_infos)})
        return cls(admitted(request), server.applied(request.report()))


@dataclass
class ServerView:
    """What the middleware needs from the running server, read once from app.state."""

    config: VASConfig  # the defaults when the engine has no additional_config["vas"]
    head_infos: dict[str, HeadInfo]  # by head name (VASConfig.read_heads)
    presets: PresetTable
    api_keys: ApiKeys
    state: Any  # app.state: engine_client for /metrics, openai_serving_models for model ids
    preset_requests: dict[str, int]  # requests per preset, for /metrics
    # Each preset's own settings, admitted at its first request (steering_fields._preset_admission).
    preset_admissions: dict[str, Admission] = field(default_factory=dict)
    # Over a remote base: what the upstream accepts (vas_server.remote.capabilities.Capabilities.report),
    # which remote mode puts in additional_config[REMOTE_KEY]; None in-process.
    upstream: dict[str, Any] | None = None

    @classmethod
    def of(cls, state) -> "ServerView":
        additional = getattr(state.vllm_config, "additional_config", None) or {}
        config = VASConfig.from_additional_config(additional)
        head_infos = config.read_heads()
        presets = config.preset_table(head_infos, [m.name for m in state.openai_serving_models.base_model_paths])
        return cls(config, head_infos, presets, ApiKeys(state), state, {}, upstream=additional.get(REMOTE_KEY))

    def applied(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Steering settings as reported (the `vas` field, a preset's card), their `top_k` the
        one served: over a remote base whose log-prob cap is below it, the cap, with what was
        asked and why (remote mode serves C = min(K, cap): vas_server.remote.capabilities.clamp)."""
        cap = (self.upstream or {}).get("logprob_cap")
        if cap is None or settings["top_k"] <= cap:
            return settings
        return {**settings, "top_k": cap, "top_k_requested": settings["top_k"], "upstream_logprob_cap": cap}

    @property
    def base_name(self) -> str:
        """The name vLLM answers to first (its responses' `model`)."""
        return self.state.openai_serving_models.base_model_paths[0].name

    def unknown_model(self, model: Any) -> str | None:
        """The 404 message for a `model` that is no served name, LoRA adapter or preset."""
        models = self.state.openai_serving_models
        served = [m.name for m in models.base_model_paths]
        if (not isinstance(model, str) or not model or model in served or model in models.lora_requests
                or self.presets.get(model) or envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING):
            return None
        valid = [*served, *models.lora_requests, *self.presets.presets]
        return f"The model `{model}` does not exist. Valid models: {', '.join(valid)}."
