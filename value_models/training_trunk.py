"""The trunk as trained: a Hugging Face causal LM cut to its first N layers, optionally with LoRA.

Training uses transformers (and peft) rather than vas_server.core.trunk, for two reasons:
  * every architecture transformers implements trains without a hand-written decoder: the trunk
    state is transformers' own residual stream after layer N through the model's own final norm
    (`last_hidden_state` of the decoder cut to N layers), the very number vLLM's decoder hands the
    shared path (vas_server.engine.hidden_states; tests/test_architectures.py compares the two);
  * what it saves is exactly what those libraries write: a PEFT adapter whose keys name the HF
    modules ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") and, for a
    standalone trunk, an ordinary HF causal-LM directory. vas_server.core.trunk reproduces the HF
    forward for the types it covers, so separate-runtime values equal the trained ones
    (tests/test_training.py checks this round trip).

Cutting to N layers: the config's layer count (and its per-layer lists, such as `layer_types`) is
cut so that only N layers are built and loaded. Where the weights themselves depend on the layer
count (Gemma 3n/4's per-layer input embeddings, [V, layers x dim]), the whole model is loaded and
its layer list cut instead: same states, more memory while loading.

Trainable parts, by trunk type:
  * base_prefix: frozen, or LoRA (`lora_r > 0`) on every linear layer of the kept blocks;
  * standalone: frozen, or fully fine-tuned (`train_trunk`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrunkPlan:
    type: str  # "base_prefix" | "standalone"
    model_dir: str  # the base (base_prefix) or the standalone HF directory
    num_layers: int | None = None  # None: all layers
    lora_r: int = 0  # base_prefix: LoRA rank, 0 = no LoRA
    lora_alpha: float = 16.0
    train_trunk: bool = False  # standalone: fine-tune every weight

    def __post_init__(self):
        if self.type not in ("base_prefix", "standalone"):
            raise ValueError(f"trunk type must be base_prefix or standalone, got {self.type!r}")
        if self.type == "base_prefix" and not self.num_layers:
            raise ValueError("a base_prefix trunk needs num_layers (how many base layers to keep)")
        if self.lora_r and self.type != "base_prefix":
            raise ValueError("LoRA is for base_prefix trunks; fine-tune a standalone trunk with train_trunk")
        if self.train_trunk and self.type != "standalone":
            raise ValueError("train_trunk is for standalone trunks; use LoRA (lora_r) for base_prefix")

    @property
    def trainable(self) -> bool:
        return bool(self.lora_r) or self.train_trunk


class TrainingTrunk:
    def __init__(self, plan: TrunkPlan, dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.plan = plan
        config = AutoConfig.from_pretrained(plan.model_dir)
        self.base_config = config.get_text_config()
        self.base_architecture = (config.architectures or [type(config).__name__])[0]
        self.base_num_layers = self.base_config.num_hidden_layers
        n = plan.num_layers
        if n is not None and not 1 <= n <= self.base_num_layers:
            raise ValueError(f"num_layers must be in 1..{self.base_num_layers}, got {n}")
        layer_shaped = bool(getattr(self.base_config, "hidden_size_per_layer_input", 0))
        if n is not None and not layer_shaped:
            _cut_layers(self.base_config, n)  # layers past n are not loaded (transformers reports them unused)
        self.causal_lm = AutoModelForCausalLM.from_pretrained(plan.model_dir, config=config, dtype=dtype)
        self.causal_lm.requires_grad_(plan.train_trunk)
        self.decoder = self.causal_lm.model  # embeddings, blocks, final norm: the trunk proper
        if n is not None and layer_shaped:
            self.decoder.layers = self.decoder.layers[:n]
        self.peft_model = None
        if plan.lora_r:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=plan.lora_r, lora_alpha=plan.lora_alpha, lora_dropout=0.0,
                              target_modules=LORA_TARGETS, bias="none")
            # peft swaps the targeted Linear modules in place, so self.decoder now runs with LoRA.
            self.peft_model = get_peft_model(self.causal_lm, lora)
        self.decoder.train(plan.trainable)

    @property
    def hidden_size(self) -> int:
        return self.causal_lm.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.causal_lm.config.vocab_size

    def embedding(self) -> torch.Tensor:
        """The input embedding matrix [V, H] that token heads are tied to (never trained)."""
        return self.causal_lm.get_input_embeddings().weight.detach()

    def spec(self):
        """The checkpoint's trunk entry; a base_prefix one records the base it was trained on."""
        from vas_server.core.format import TrunkSpec

        if self.plan.type != "base_prefix":
            return TrunkSpec("standalone")
        return TrunkSpec("base_prefix", num_layers=self.plan.num_layers, lora=bool(self.plan.lora_r),
                         base_architecture=self.base_architecture, base_num_layers=self.base_num_layers,
                         base_hidden_size=self.base_config.hidden_size)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final hidden states (after the final norm) [B, L, H] of right-padded tokens [B, L].
        No attention mask: attention is causal, so pads after a sequence cannot change it."""
        return self.decoder(input_ids=tokens, use_cache=False).last_hidden_state

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.causal_lm.named_parameters() if p.requires_grad}

    def save(self, checkpoint_dir: Path) -> tuple[Path | None, Path | None]:
        """Write what the checkpoint needs besides the heads: (lora dir, standalone dir)."""
        from vas_server.core.format import LORA_DIR, STANDALONE_DIR

        if self.peft_model is not None:
            self.peft_model.save_pretrained(str(checkpoint_dir / LORA_DIR))
            return checkpoint_dir / LORA_DIR, None
        if self.plan.type == "standalone":
            from transformers import AutoTokenizer

            out = checkpoint_dir / STANDALONE_DIR
            self.causal_lm.save_pretrained(str(out))
            AutoTokenizer.from_pretrained(self.plan.model_dir).save_pretrained(str(out))
            return None, out
        return None, None


def _cut_layers(config, n: int) -> None:
    """Make an HF text config describe its first n layers: the count and the per-layer attention
    types (`layer_types`, transformers' one per-layer list: sliding/full, linear/full)."""
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:n]
    config.num_hidden_layers = n
