"""The trunk as trained: a Hugging Face causal LM cut to its first N layers, optionally with LoRA.

Training uses transformers (and peft) rather than vas_server.core.trunk so that what it saves is
exactly what those libraries write: a PEFT adapter whose keys name the HF modules
("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") and, for a standalone trunk,
an ordinary HF causal-LM directory. vas_server.core.trunk reproduces the HF forward exactly, so the
served values equal the trained ones (tests/test_training.py checks this round trip).

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
        if plan.num_layers is not None:
            if not 1 <= plan.num_layers <= config.num_hidden_layers:
                raise ValueError(f"num_layers must be in 1..{config.num_hidden_layers}, got {plan.num_layers}")
            config.num_hidden_layers = plan.num_layers
        # Layers beyond num_layers are simply not loaded (transformers reports them as unused).
        self.causal_lm = AutoModelForCausalLM.from_pretrained(plan.model_dir, config=config, dtype=dtype)
        self.causal_lm.requires_grad_(plan.train_trunk)
        self.decoder = self.causal_lm.model  # embeddings, blocks, final norm: the trunk proper
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
        return self.decoder.embed_tokens.weight.detach()

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
