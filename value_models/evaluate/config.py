"""What an evaluation runs: its settings, and the key that names each weight setting."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_WEIGHTS = (-2.0, 0.0, 1.0, 2.0, 3.0, 4.0, 8.0)
DEFAULT_GRID_WEIGHTS = (0.0, 2.0, 4.0)
DEFAULT_BON = (4, 16, 64)


@dataclass
class EvalConfig:
    value_model: str  # checkpoint directory
    base: str  # base model HF directory
    prompts: list[str]
    weights: list[float] = field(default_factory=lambda: list(DEFAULT_WEIGHTS))
    grid_heads: list[str] | None = None  # two heads; default: the first two
    grid_weights: list[float] = field(default_factory=lambda: list(DEFAULT_GRID_WEIGHTS))
    bon: list[int] = field(default_factory=lambda: list(DEFAULT_BON))
    # Best-of-N for bon[k] on the first bon_prompts[k] prompts only (None: all). Large N costs
    # N responses per prompt; a smaller subset for the largest N keeps the run affordable.
    bon_prompts: list[int] | None = None
    rewards: dict[str, str] | None = None  # head -> reward spec; default: what each head was trained on
    heads: list[str] | None = None  # heads to evaluate; default: all
    max_tokens: int = 48
    top_k: int | None = None  # None: the value model's own default (vas.json), else the spec's 20
    seed: int = 0
    dtype: str | None = None  # None: the engine's own choice (what `vas-server serve` picks here)
    max_model_len: int = 512
    max_num_seqs: int = 64
    kl_batch_size: int = 128  # rows replayed at once (value-cache slots)
    engine_overrides: dict = field(default_factory=dict)


def setting_key(weights: dict[str, float]) -> tuple:
    """The run of a weight setting: its non-zero weights, sorted by head (() is the base)."""
    return tuple(sorted((h, float(w)) for h, w in weights.items() if w != 0))


def setting_label(key: tuple) -> str:
    return ", ".join(f"{h}={w:g}" for h, w in key) or "base (all weights 0)"
