"""Tiny models built on the fly for tests: a byte-level BPE tokenizer and a random Llama with
head size 64 (what vLLM's CPU attention supports), saved as HF safetensors directories."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = (
    "The quick brown fox jumps over the lazy dog. Hello, how are you today? I am fine, thank you. "
    "What is the capital of France? Paris is the capital of France. Good morning and good night. "
    "I love sunny days and happy people. This is terrible, awful and sad. Short answers are best. "
) * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(out_dir: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_llama(out_dir: Path, tokenizer_dir: Path, *, seed: int, num_layers: int = 2, hidden: int = 128,
                init_std: float = 0.2, num_kv_heads: int = 1) -> Path:
    """A random Llama (hidden / 64 query heads x 64, `num_kv_heads` KV heads; by default 2 and 1)
    in float32, saved with the tokenizer. Tensor parallelism over 2 ranks needs hidden = 256 and
    2 KV heads (each rank takes 2 query heads and 1 KV head).

    `init_std` is large so that next-token logits are peaked: greedy decoding then has clear
    margins and float32 differences between implementations cannot flip an argmax.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=num_layers, num_attention_heads=hidden // 64, num_key_value_heads=num_kv_heads, head_dim=64,
        max_position_embeddings=1024, rms_norm_eps=1e-6, initializer_range=init_std,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def token_copy(src: str, out: Path, rename: dict[str, str]) -> str:
    """A value model with some of `src`'s token heads under new names and nothing else: same trunk
    depth, no state head, no LoRA, so it takes the shared path (the base's own hidden states)."""
    import dataclasses

    from vas_server.core.format import TrunkSpec, ValueModelSpec, load_head_tensors, load_spec, save_head_tensors, save_spec

    spec = load_spec(src)
    heads = [dataclasses.replace(h, name=rename[h.name]) for h in spec.heads if h.name in rename]
    save_spec(out, ValueModelSpec(TrunkSpec("base_prefix", num_layers=spec.trunk.num_layers), heads, spec.tokenizer))
    tensors = load_head_tensors(src)
    save_head_tensors(out, {f"{rename[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in tensors.items()
                            if k.split(".")[0] in rename})
    return str(out)


def build_classifier(out_dir: Path, tokenizer_dir: Path, labels: tuple[str, ...], *, seed: int = 0) -> Path:
    """A random tiny sequence classifier (Llama, one layer) on the tokenizer of `tokenizer_dir`,
    saved with it: what an `hf:<dir>` reward loads."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=64, num_labels=len(labels),
                         id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


# Tiny random bases of other architectures (tests/test_architectures.py): 2 layers, hidden 128,
# 2 query heads x 64 and 1 KV head, plus each architecture's own features (MoE routing, Granite's
# multipliers, sliding windows, Gemma 4's per-layer inputs) switched on.
ARCHITECTURES = ("qwen3", "qwen3_moe", "phi3", "granite", "gpt_oss", "gemma4")


def build_arch(kind: str, out_dir: Path, tokenizer_dir: Path, *, seed: int, num_layers: int = 2,
               hidden: int = 128, init_std: float = 0.2) -> Path:
    """A random HF causal LM of architecture `kind` in float32, saved with the tokenizer. Norm
    weights are random too (not HF's constant init), so that a state computed with the wrong
    final norm, or none, differs from the right one."""
    import transformers as T
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                  num_attention_heads=hidden // 64, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, initializer_range=init_std, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    layer_types = ["sliding_attention", "full_attention"] * (num_layers // 2) + ["full_attention"] * (num_layers % 2)
    if kind == "qwen3":
        config, cls = T.Qwen3Config(**common), T.Qwen3ForCausalLM
    elif kind == "qwen3_moe":
        config = T.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden,
                                  decoder_sparse_step=1, norm_topk_prob=True)
        cls = T.Qwen3MoeForCausalLM
    elif kind == "phi3":
        common.pop("head_dim")  # hidden / heads
        config, cls = T.Phi3Config(**common), T.Phi3ForCausalLM
    elif kind == "granite":
        config = T.GraniteConfig(**common, embedding_multiplier=3.0, residual_multiplier=0.5,
                                 attention_multiplier=0.1, logits_scaling=2.0)
        cls = T.GraniteForCausalLM
    elif kind == "gpt_oss":
        config = T.GptOssConfig(**common, num_local_experts=4, num_experts_per_tok=2, sliding_window=128,
                                layer_types=layer_types)  # its default YaRN rope, which vLLM requires
        cls = T.GptOssForCausalLM
    elif kind == "gemma4":
        config = T.Gemma4TextConfig(**common, global_head_dim=64, sliding_window=128, layer_types=layer_types,
                                    per_layer_config={}, hidden_size_per_layer_input=16,
                                    vocab_size_per_layer_input=len(tok))
        cls = T.Gemma4ForCausalLM
    else:
        raise ValueError(f"no tiny builder for {kind!r}: one of {ARCHITECTURES}")
    config.architectures = [cls.__name__]
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    return out_dir
