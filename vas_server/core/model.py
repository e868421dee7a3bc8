"""Load and save whole value models: spec + trunk + heads (docs/VAS_RULE.md §3)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from vas_server.core.format import (
    HEADS_FILE,
    LORA_DIR,
    STANDALONE_DIR,
    TokenizerIdentity,
    ValueModelSpec,
    check_tokenizer,
    load_head_tensors,
    load_spec,
    save_head_tensors,
    save_spec,
)
from vas_server.core.heads import ValueHeads
from vas_server.core.trunk import Trunk, load_trunk


@dataclass
class ValueModel:
    name: str
    path: Path
    spec: ValueModelSpec
    trunk: Trunk
    value_heads: ValueHeads


def trunk_source(path: Path, spec: ValueModelSpec, base_model_dir: Path | str) -> tuple[Path, Path | None]:
    """(HF directory the trunk weights come from, LoRA directory or None)."""
    if spec.trunk.type == "base_prefix":
        return Path(base_model_dir), (path / LORA_DIR if spec.trunk.lora else None)
    return path / STANDALONE_DIR, None


def load_value_model(path: Path | str, base_model_dir: Path | str, *, name: str | None = None,
                     base_tokenizer: TokenizerIdentity | None = None, base_model_name: str | None = None,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     spec: ValueModelSpec | None = None) -> ValueModel:
    """Load a value model (`spec`: its vas.json, already read; else read here). With
    `base_tokenizer`, refuse one whose vocabulary differs."""
    path = Path(path)
    spec = spec if spec is not None else load_spec(path)
    if base_tokenizer is not None:
        check_tokenizer(spec, base_tokenizer, value_model=str(path), base_model=base_model_name or str(base_model_dir))
    source, lora = trunk_source(path, spec, base_model_dir)
    trunk = load_trunk(source, spec.trunk.num_layers, lora, dtype=dtype, device=device)
    c = trunk.config
    value_heads = load_value_heads(path, spec, c.hidden_size, c.vocab_size, dtype=dtype, device=device)
    return ValueModel(name=name or path.name, path=path, spec=spec, trunk=trunk, value_heads=value_heads)


def load_value_heads(path: Path | str, spec: ValueModelSpec, hidden_size: int, vocab_size: int, *,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> ValueHeads:
    """A value model's heads alone (the shared-trunk path reads its trunk state from the base)."""
    value_heads = ValueHeads.from_tensors(spec.heads, load_head_tensors(Path(path)), hidden_size, vocab_size)
    return value_heads.to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_value_model(path: Path | str, spec: ValueModelSpec, heads: ValueHeads, *,
                     lora_dir: Path | str | None = None, standalone_dir: Path | str | None = None) -> Path:
    """Write a checkpoint directory. `lora_dir` (a PEFT adapter directory) is copied for a
    base_prefix trunk with LoRA; `standalone_dir` (an HF directory) for a standalone trunk."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_spec(path, spec)
    save_head_tensors(path, heads.to_tensors())
    for src, dst, needed in ((lora_dir, LORA_DIR, spec.trunk.lora),
                             (standalone_dir, STANDALONE_DIR, spec.trunk.type == "standalone")):
        if needed and src is None:
            raise ValueError(f"spec needs {dst}/ but no source directory was given")
        if src is not None and Path(src).resolve() != (path / dst).resolve():
            shutil.copytree(src, path / dst, dirs_exist_ok=True)
    assert (path / HEADS_FILE).is_file()
    return path
