"""A Llama-family decoder trunk in plain torch (gpt-fast style), loaded from HF safetensors.

The trunk maps tokens to final hidden states (after the final norm); heads sit on top. Attention
is delegated to a callable so one module serves both uses:
  * training / reference: ordinary causal attention over a padded batch (`causal_attend`);
  * serving: the value runtime's cache-aware attention (vas_server.core.value_runtime).

Supported HF `model_type`s: llama, mistral (without sliding window), qwen2 (q/k/v bias), qwen3
(per-head RMSNorm on q and k before the rotary embedding). These are the dense Llama-shaped
decoders that differ by a flag; other architectures train with transformers' own implementation
(value_models.training_trunk) and serve on the shared path (vas_server.engine.hidden_states), and the
separate runtime refuses them at startup (vas_server.engine.compatibility).
A `base_prefix` trunk is the first N layers of the served base, plus its embeddings and final
norm, with an optional PEFT LoRA adapter merged into the weights at load time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# attend(layer_index, q, k, v) -> attention output [B, L, num_heads * head_dim].
# q: [B, num_heads, L, head_dim], k/v: [B, num_kv_heads, L, head_dim], rotary already applied.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrunkConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool = False  # qwen3: RMSNorm over each head's q and k

    @classmethod
    def from_hf(cls, hf: dict, num_layers: int | None = None) -> "TrunkConfig":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"value-model trunks support HF model_type {SUPPORTED_MODEL_TYPES}, got {model_type!r}"
            )
        if (model_type == "mistral" and hf.get("sliding_window")) or hf.get("use_sliding_window"):
            raise ValueError(f"{model_type} trunks with a sliding window are not supported")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not supported by the value-model trunk")
        total_layers = hf["num_hidden_layers"]
        n = total_layers if num_layers is None else num_layers
        if not 1 <= n <= total_layers:
            raise ValueError(f"num_layers must be in 1..{total_layers}, got {n}")
        heads = hf["num_attention_heads"]
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=n,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama's RMSNorm: normalise in float32, cast back, scale. The trunk's final norm and the
    shared-trunk path (vas_server.engine.hidden_states) both use this one definition."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Block(nn.Module):
    def __init__(self, c: TrunkConfig):
        super().__init__()
        self.c = c
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x, cos, sin, layer: int, attend: Attend) -> torch.Tensor:
        c = self.c
        B, L, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(B, L, c.num_heads, c.head_dim)
        k = self.k_proj(h).view(B, L, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(h).view(B, L, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        x = x + self.o_proj(attend(layer, q, k, v))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Trunk(nn.Module):
    """Embeddings, `num_layers` decoder blocks and the final norm. Output: final hidden states."""

    def __init__(self, c: TrunkConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos/sin of shape [B, 1, L, head_dim] for integer positions [B, L]."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        cos, sin = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, i, attend)
        return self.norm(x)

    def forward_causal(self, tokens: torch.Tensor) -> torch.Tensor:
        """Plain causal forward over [B, L] (right padding is harmless: pads come last)."""
        B, L = tokens.shape
        positions = torch.arange(L, device=tokens.device).expand(B, L)
        return self.forward(tokens, positions, causal_attend)


def causal_attend(layer: int, q, k, v) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    B, H, L, D = out.shape
    return out.transpose(1, 2).reshape(B, L, H * D)


# ---------------------------------------------------------------------------------------------
# Loading


def _safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return files


def _read_weights(model_dir: Path, wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    out = {}
    for f in _safetensors_files(model_dir):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if wanted(key):
                    out[key] = st.get_tensor(key)
    return out


def _merge_lora(state: dict[str, torch.Tensor], lora_dir: Path) -> None:
    """Fold a PEFT LoRA adapter into the weights: W += (alpha / r) * B @ A."""
    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    if cfg.get("use_dora") or cfg.get("use_rslora"):
        raise ValueError("only plain LoRA adapters are supported (no DoRA / rsLoRA)")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    pattern_r = cfg.get("rank_pattern") or {}
    pattern_a = cfg.get("alpha_pattern") or {}
    weights = _read_weights(lora_dir, lambda k: "lora_" in k)
    for key_a, a in weights.items():
        if ".lora_A." not in key_a:
            continue
        b = weights[key_a.replace(".lora_A.", ".lora_B.")]
        # "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" -> "layers.0.self_attn.q_proj"
        module = key_a.split(".lora_A.")[0]
        module = module[module.index("layers."):] if "layers." in module else module.split("model.")[-1]
        rr = next((v for k, v in pattern_r.items() if module.endswith(k)), r)
        aa = next((v for k, v in pattern_a.items() if module.endswith(k)), alpha)
        target = _hf_to_trunk_key("model." + module + ".weight")
        if target not in state:
            raise ValueError(f"LoRA adapter targets {module!r}, which is not in the trunk")
        w = state[target]
        state[target] = (w.float() + (aa / rr) * (b.float() @ a.float())).to(w.dtype)


def _hf_to_trunk_key(key: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.q_proj.weight'."""
    key = key.removeprefix("model.")
    return key.replace(".self_attn.", ".").replace(".mlp.", ".")


def load_trunk(model_dir: Path | str, num_layers: int | None = None, lora_dir: Path | str | None = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Trunk:
    """Build a Trunk from an HF causal-LM directory: its first `num_layers` layers (all if None)."""
    model_dir = Path(model_dir)
    config = TrunkConfig.from_hf(json.loads((model_dir / "config.json").read_text()), num_layers)

    def wanted(key: str) -> bool:
        if key in ("model.embed_tokens.weight", "model.norm.weight"):
            return True
        if key.startswith("model.layers."):
            return int(key.split(".")[2]) < config.num_layers
        return False

    state = {_hf_to_trunk_key(k): v for k, v in _read_weights(model_dir, wanted).items()}
    if lora_dir is not None:
        _merge_lora(state, Path(lora_dir))
    with torch.device("meta"):
        trunk = Trunk(config)
    trunk = trunk.to_empty(device=device)
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "inv_freq"]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: trunk weights missing {missing[:5]} unexpected {unexpected[:5]}")
    trunk = trunk.to(dtype).eval().requires_grad_(False)
    # inv_freq is a non-persistent buffer (left empty on the meta device); keep it in float32.
    trunk.inv_freq = 1.0 / (config.rope_theta ** (
        torch.arange(0, config.head_dim, 2, dtype=torch.float32, device=device) / config.head_dim))
    return trunk
