"""convert-trl: a TRL AutoModelForCausalLMWithValueHead checkpoint, written by hand (TRL's layout:
the LM's weights with v_head.summary.weight / bias next to them), becomes a state head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


from tiny_models import build_llama, build_tokenizer

from vas_server.core.format import TokenizerIdentity, TokenizerMismatchError, load_spec
from vas_server.core.model import load_value_model
from value_models.trl import convert_trl


@pytest.fixture(scope="module")
def trl_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trl")
    build_tokenizer(root / "tokenizer")
    lm = build_llama(root / "trl", root / "tokenizer", seed=3, num_layers=1)
    weights = load_file(str(lm / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    weights["v_head.summary.weight"] = torch.randn(1, 128, generator=g)
    weights["v_head.summary.bias"] = torch.tensor([0.25])
    save_file(weights, str(lm / "model.safetensors"), metadata={"format": "pt"})
    return lm


def test_trl_checkpoint_becomes_a_state_head(trl_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    path = convert_trl(trl_checkpoint, tmp_path / "vm", head_name="helpful", reward_mean=1.0, reward_std=2.0)
    spec = load_spec(path)
    assert spec.trunk.type == "standalone"
    assert [(h.name, h.kind, h.reward_mean, h.reward_std) for h in spec.heads] == [("helpful", "state", 1.0, 2.0)]
    assert not any(k.startswith("v_head") for k in load_file(str(path / "trunk" / "model.safetensors")))

    # TRL's value: v_head applied to the LM's last hidden state (after the final norm).
    tokens = torch.tensor([[5, 17, 99, 42, 7]])
    weights = load_file(str(trl_checkpoint / "model.safetensors"))
    lm = AutoModelForCausalLM.from_pretrained(str(trl_checkpoint), dtype=torch.float32)
    with torch.no_grad():
        last_hidden = lm(input_ids=tokens, output_hidden_states=True).hidden_states[-1]
    trl_values = last_hidden[0] @ weights["v_head.summary.weight"][0] + weights["v_head.summary.bias"]

    model = load_value_model(path, trl_checkpoint)
    with torch.no_grad():
        ours = model.value_heads.state(model.trunk.forward_causal(tokens))[0, :, 0]
    assert torch.allclose(ours, trl_values, atol=1e-4)


def test_trl_checkpoint_with_another_vocabulary_is_refused(trl_checkpoint, tmp_path):
    with pytest.raises(TokenizerMismatchError):
        convert_trl(trl_checkpoint, tmp_path / "vm", base_tokenizer=TokenizerIdentity(384, "0" * 64))


def test_plain_lm_is_not_a_trl_checkpoint(tmp_path):
    build_tokenizer(tmp_path / "tok")
    lm = build_llama(tmp_path / "lm", tmp_path / "tok", seed=0, num_layers=1)
    with pytest.raises(ValueError, match="not a TRL value-head checkpoint"):
        convert_trl(lm, tmp_path / "vm")
