"""`convert-trl`: a TRL `AutoModelForCausalLMWithValueHead` checkpoint as a state head (docs/VAS_RULE.md §3).

TRL saves the language model's weights with the value head's `v_head.summary.weight` [1, H] and
`v_head.summary.bias` [1] next to them, and computes the value as that linear layer applied to
the LM's last hidden state (after the final norm), which is exactly our state head on a
standalone trunk. The converted checkpoint holds the LM (without the value head) as its trunk.

TRL trains on raw rewards, so the head's values are in the reward's own units: the stored mean 0
and std 1 keep them so unless the caller knows better (weight 1.0 then means one reward unit).
Only safetensors checkpoints are read (no pickle).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vas_server.core.format import (
    HeadSpec,
    TokenizerIdentity,
    TrunkSpec,
    ValueModelSpec,
    check_tokenizer,
    tokenizer_identity,
)
from vas_server.core.heads import ValueHeads
from vas_server.core.model import save_value_model

V_HEAD_WEIGHT = "v_head.summary.weight"
V_HEAD_BIAS = "v_head.summary.bias"
# Files of an HF directory besides the weights that the trunk directory keeps.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def convert_trl(trl_dir: Path | str, out_dir: Path | str, *, head_name: str = "value", description: str = "",
                reward_mean: float = 0.0, reward_std: float = 1.0,
                base_tokenizer: TokenizerIdentity | None = None) -> Path:
    trl_dir, out_dir = Path(trl_dir), Path(out_dir)
    files = sorted(trl_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{trl_dir}: no *.safetensors (pickled TRL checkpoints are not read)")
    lm_weights: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                (head if key.startswith("v_head.") else lm_weights)[key] = st.get_tensor(key)
    if V_HEAD_WEIGHT not in head or V_HEAD_BIAS not in head:
        raise ValueError(f"{trl_dir}: no {V_HEAD_WEIGHT} / {V_HEAD_BIAS}; not a TRL value-head checkpoint")

    from transformers import AutoTokenizer

    identity = tokenizer_identity(AutoTokenizer.from_pretrained(str(trl_dir)))
    spec = ValueModelSpec(
        trunk=TrunkSpec("standalone"),
        heads=[HeadSpec(head_name, "state", description or f"TRL value head from {trl_dir.name}",
                        reward_mean, reward_std)],
        tokenizer=identity, extra={"converted_from": "trl AutoModelForCausalLMWithValueHead"})
    if base_tokenizer is not None:
        check_tokenizer(spec, base_tokenizer, value_model=str(trl_dir), base_model="the base model")

    weight, bias = head[V_HEAD_WEIGHT].float(), head[V_HEAD_BIAS].float()
    hidden = weight.shape[-1]
    if weight.shape != (1, hidden) or bias.shape != (1,):
        raise ValueError(f"{trl_dir}: value head shapes {tuple(weight.shape)}, {tuple(bias.shape)}; expected (1, H), (1,)")
    heads = ValueHeads(spec.heads, hidden, 1)  # a state head does not use the vocabulary size
    with torch.no_grad():
        heads.state.weight.copy_(weight)
        heads.state.bias.copy_(bias)

    with tempfile.TemporaryDirectory() as tmp:
        trunk_dir = Path(tmp)
        for f in trl_dir.iterdir():
            if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
                shutil.copy2(f, trunk_dir / f.name)
        save_file({k: v.contiguous() for k, v in lm_weights.items()}, str(trunk_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        return save_value_model(out_dir, spec, heads, standalone_dir=trunk_dir)
