"""Hand-built value models: random heads (for throughput benchmarks and tests) and heads that
value one chosen token (for steering tests). No training involved."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from vas_server.core.format import HeadSpec, TrunkSpec, ValueModelSpec, tokenizer_identity
from vas_server.core.heads import ValueHeads
from vas_server.core.model import save_value_model


def _config(model_dir: Path):
    """The HF text config (hidden_size, vocab_size) of any architecture transformers knows."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir)).get_text_config()


def _recording_base(trunk: TrunkSpec, base_dir: Path) -> TrunkSpec:
    """A base_prefix trunk entry with the base's identity filled in, as `vas-train fit` writes it."""
    import dataclasses

    if trunk.type != "base_prefix" or trunk.base_architecture is not None:
        return trunk
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(base_dir))
    text = config.get_text_config()
    return dataclasses.replace(trunk, base_architecture=(config.architectures or [None])[0],
                               base_num_layers=text.num_hidden_layers, base_hidden_size=text.hidden_size)


def random_value_model(out: Path, base_dir: Path, heads: list[tuple[str, str]], *, seed: int,
                       trunk: TrunkSpec, standalone_dir: Path | None = None, scale: float = 1.0) -> Path:
    """A value model whose heads have random weights (values of order `scale`)."""
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    c = _config(standalone_dir or base_dir)
    specs = [HeadSpec(name, kind, f"random {kind} head {name}") for name, kind in heads]
    module = ValueHeads(specs, c.hidden_size, c.vocab_size)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.state.weight.copy_(torch.randn(module.state.weight.shape, generator=g) * scale / c.hidden_size ** 0.5)
        module.state.bias.copy_(torch.randn(module.state.bias.shape, generator=g))
        module.token.proj.copy_(torch.randn(module.token.proj.shape, generator=g) * scale / c.hidden_size)
        module.token.bias.copy_(torch.randn(module.token.bias.shape, generator=g) * scale)
        module.token.baseline.copy_(torch.randn(module.token.baseline.shape, generator=g) * scale / c.hidden_size ** 0.5)
    spec = ValueModelSpec(trunk=_recording_base(trunk, base_dir), heads=specs, tokenizer=tokenizer_identity(tok))
    return save_value_model(out, spec, module, standalone_dir=standalone_dir)


def token_lover(out: Path, base_dir: Path, name: str, token_id: int, strength: float = 1.0,
                num_layers: int = 1) -> Path:
    """A token head that values exactly one token: Q(s)[a] = strength if a == token_id else 0."""
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    c = _config(base_dir)
    spec = ValueModelSpec(trunk=_recording_base(TrunkSpec("base_prefix", num_layers=num_layers), base_dir),
                          heads=[HeadSpec(name, "token", f"likes token {token_id}")],
                          tokenizer=tokenizer_identity(tok))
    module = ValueHeads(spec.heads, c.hidden_size, c.vocab_size)
    with torch.no_grad():
        module.token.bias[0, token_id] = strength
    return save_value_model(out, spec, module)
