"""Hand-built value models: random heads (for throughput benchmarks and tests) and heads that
value one chosen token (for steering tests). No training involved."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from vas_server.core.format import HeadSpec, TrunkSpec, ValueModelSpec, tokenizer_identity
from vas_server.core.heads import ValueHeads
from vas_server.core.model import save_value_model
from vas_server.core.trunk import TrunkConfig


def _config(model_dir: Path) -> TrunkConfig:
    import json

    return TrunkConfig.from_hf(json.loads((model_dir / "config.json").read_text()))


def random_value_model(out: Path, base_dir: Path, heads: list[tuple[str, str]], *, seed: int,
                       trunk: TrunkSpec, standalone_dir: Path | None = None, scale: float = 1.0) -> Path:
    """A value model whose heads have random weights (values of order `scale`)."""
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    c = _config(standalone_dir or base_dir)
    specs = [HeadSpec(name, kind, f"random {kind} head {name}") for name, kind in heads]
    module = ValueHeads(specs, c.hidden_size, c.vocab_size)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.state_weight.copy_(torch.randn(module.state_weight.shape, generator=g) * scale / c.hidden_size ** 0.5)
        module.state_bias.copy_(torch.randn(module.state_bias.shape, generator=g))
        module.token_proj.copy_(torch.randn(module.token_proj.shape, generator=g) * scale / c.hidden_size)
        module.token_bias.copy_(torch.randn(module.token_bias.shape, generator=g) * scale)
        module.token_baseline.copy_(torch.randn(module.token_baseline.shape, generator=g) * scale / c.hidden_size ** 0.5)
    spec = ValueModelSpec(trunk=trunk, heads=specs, tokenizer=tokenizer_identity(tok))
    return save_value_model(out, spec, module, standalone_dir=standalone_dir)


def token_lover(out: Path, base_dir: Path, name: str, token_id: int, strength: float = 1.0) -> Path:
    """A token head that values exactly one token: Q(s)[a] = strength if a == token_id else 0."""
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    c = _config(base_dir)
    spec = ValueModelSpec(trunk=TrunkSpec("base_prefix", num_layers=1),
                          heads=[HeadSpec(name, "token", f"likes token {token_id}")],
                          tokenizer=tokenizer_identity(tok))
    module = ValueHeads(spec.heads, c.hidden_size, c.vocab_size)
    with torch.no_grad():
        module.token_bias[0, token_id] = strength
    return save_value_model(out, spec, module)
