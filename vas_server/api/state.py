"""What the app is configured with (`ServerConfig`) and what it holds while running (`ServerState`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vas_server.config import HeadInfo, VASConfig
from vas_server.params import DEFAULT_TOP_K

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

    from vas_server.api.metrics import Metrics


@dataclass
class ServerConfig:
    model: str  # path or Hugging Face name of the base model
    served_model_name: str  # the `model` clients send
    vas: VASConfig | None = None  # None: no value models, plain vLLM
    engine_overrides: dict[str, Any] = field(default_factory=dict)  # any other vLLM engine arguments
    api_key: str | None = None

    def heads(self) -> dict[str, HeadInfo]:
        return self.vas.heads() if self.vas is not None else {}

    @property
    def default_top_k(self) -> int:
        return self.vas.default_top_k if self.vas is not None else DEFAULT_TOP_K


@dataclass
class ServerState:
    config: ServerConfig
    engine: "AsyncLLM"
    tokenizer: Any  # the engine's (thread-safe) tokenizer
    heads: dict[str, HeadInfo]
    max_model_len: int
    metrics: "Metrics"
    started_at: int  # unix time, reported as `created` in /v1/models
