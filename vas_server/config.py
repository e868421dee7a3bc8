"""VAS plugin configuration: what reaches the worker through vLLM's `additional_config["vas"]`.

Reading a config touches only the value models' `vas.json` files, never their weights, so the
API process can list and validate heads without loading any model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Literal, Mapping

from vas_server.core.format import (
    DEFAULT_TOP_K,
    SPEC_FILE,
    TOP_K_RANGE,
    HeadSpec,
    TrunkSpec,
    ValueModelSpec,
    is_top_k,
    load_spec,
)
from vas_server.core.heads import KINDS
from vas_server.params import VASRequest

if TYPE_CHECKING:
    from vas_server.presets import PresetTable

ADDITIONAL_CONFIG_KEY = "vas"
# Remote mode's key for what the upstream accepts (vas_server.remote.capabilities.Capabilities.report),
# read by the middleware (vas_server.http.server_view).
REMOTE_KEY = "vas_remote"
# Which value runtime serves a value model (runtime_path): the base's own hidden states, or its own trunk.
Runtime = Literal["shared", "separate"]


@dataclass(frozen=True)
class HeadInfo:
    """One steerable head as the API sees it."""

    name: str
    value_model: str
    path: str
    spec: HeadSpec
    trunk: TrunkSpec
    runtime: Runtime  # "shared" (reads the base's own hidden states) or "separate" (own trunk + value cache)
    default_top_k: int | None = None  # its value model's declared top-K (vas.json), if any


# vas.json as read, by (resolved path, modification time, size): each file is read once per process
# and again only if it changed (tests rewrite value models in place).
_SPECS: dict[tuple[str, int, int], ValueModelSpec] = {}


def read_spec(path: str | Path) -> ValueModelSpec:
    """format.load_spec of a value-model directory, read once per process while the file is unchanged."""
    path = Path(path)
    try:
        stat = (path / SPEC_FILE).stat()
    except OSError:
        return load_spec(path)  # it raises the format's own error for a missing vas.json
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _SPECS:
        _SPECS[key] = load_spec(path)
    return _SPECS[key]


def runtime_path(spec: ValueModelSpec) -> Runtime:
    """Which value runtime serves a value model: "shared" when its trunk is the base's own first
    layers without LoRA and every head reads only the context's state, not each candidate's
    (token heads: then the base's forward pass already computes that state), else "separate"."""
    shared = (spec.trunk.type == "base_prefix" and not spec.trunk.lora
              and not any(KINDS[h.kind].reads_candidate_states for h in spec.heads))
    return "shared" if shared else "separate"


@dataclass
class VASConfig:
    value_models: dict[str, str] = field(default_factory=dict)  # name -> checkpoint directory
    # The server's --default-top-k; None: each value model's own (vas.json), else the spec's 20.
    default_top_k: int | None = None
    # Most requests holding a value cache at once. engine_kwargs resolves None (to max_num_seqs or
    # DEFAULT_VAS_REQUESTS) and caps vLLM's max_num_seqs at it, so the preallocated cache is never
    # full: extra requests wait in vLLM's queue.
    max_requests: int | None = None
    # Value-model dtype; "auto" follows the base model (bfloat16 for the embedded SmolLM2, where
    # it is native on CPUs with AMX or AVX512-BF16 and on GPUs; engine_args picks float32 for the
    # engine where a CPU emulates bfloat16), "float32" for exact reference checks.
    dtype: str = "auto"
    device: str | None = None  # None: the worker's device
    # HTTP request bodies past this many bytes are refused with a 413 before they are parsed.
    max_body_bytes: int = 8 * 2**20
    # What one HTTP request may queue: prompts x n (x best_of) past this is a 422 (request_guard).
    max_sequences_per_request: int = 128
    # Named steering settings served as models (vas_server.presets): name -> Preset fields.
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        if self.default_top_k is not None and not is_top_k(self.default_top_k):
            raise ValueError(f"default_top_k must be an integer in {TOP_K_RANGE[0]}..{TOP_K_RANGE[1]}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError("max_requests must be >= 1")
        if self.max_sequences_per_request < 1:
            raise ValueError("max_sequences_per_request must be >= 1")

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> "VASConfig":
        raw = dict((additional_config or {}).get(ADDITIONAL_CONFIG_KEY) or {})
        return cls(**raw)

    def to_additional_config(self) -> dict[str, Any]:
        return {ADDITIONAL_CONFIG_KEY: asdict(self)}

    def specs(self) -> dict[str, ValueModelSpec]:
        """Every value model's vas.json as one typed object, by name: read once per process
        (read_spec), whichever VASConfig asks (the plugin, the processor, the runtime factory and
        the HTTP side each build their own from additional_config)."""
        return {name: read_spec(path) for name, path in self.value_models.items()}

    def read_heads(self) -> dict[str, HeadInfo]:
        """All heads by public name, from every value model's spec (`specs`). Head names must be
        unique across value models."""
        out: dict[str, HeadInfo] = {}
        for model_name, spec in self.specs().items():
            path = self.value_models[model_name]
            for h in spec.heads:
                if h.name in out:
                    raise ValueError(
                        f"head {h.name!r} is defined by both value models "
                        f"{out[h.name].value_model!r} and {model_name!r}; head names must be unique")
                out[h.name] = HeadInfo(h.name, model_name, str(path), h, spec.trunk, runtime_path(spec),
                                       spec.default_top_k)
        return out

    def preset_table(self, head_infos: Mapping[str, HeadInfo], served_names: Collection[str]) -> "PresetTable":
        """Every preset the server offers (the configured ones and one per head), checked:
        ValueError naming the preset for an unknown head, a bad weight or top-K, or a name clash."""
        from vas_server.presets import PresetTable

        return PresetTable.build(self.presets, list(head_infos), served_names)

    def top_k_for(self, request: VASRequest, head_infos: Mapping[str, HeadInfo]) -> int:
        """A request's VAS top-K: its `vas_top_k`; else the server's `--default-top-k`; else the
        largest top-K declared by the value models of the heads it weights (for token heads the
        cost does not depend on K, so the larger choice costs nothing); else the spec's 20."""
        if request.top_k is not None:
            return request.top_k
        if self.default_top_k is not None:
            return self.default_top_k
        declared = [head_infos[h].default_top_k for h in request.weights if h in head_infos]
        return max((k for k in declared if k is not None), default=DEFAULT_TOP_K)
