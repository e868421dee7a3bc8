"""The vas-train pipeline end to end on a tiny model: sample (real vLLM) -> score -> fit -> load."""

from __future__ import annotations

import json
import math

import pytest


from tiny_models import build_llama, build_tokenizer

from value_models.cli import main
from vas_server.core.format import load_spec
from vas_server.core.model import load_value_model
from value_models.records import read_samples


@pytest.mark.slow
def test_sample_score_fit(tmp_path):
    build_tokenizer(tmp_path / "tok")
    base = build_llama(tmp_path / "base", tmp_path / "tok", seed=0)
    (tmp_path / "prompts.txt").write_text("Hello, how are you\nWhat is the capital of France?\n")
    samples_file = tmp_path / "samples.jsonl"
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    # Top-K over the whole vocabulary: every sampled token is a candidate (see assert_base_topk).
    main(["sample", "--base", str(base), "--prompts", str(tmp_path / "prompts.txt"), "--samples-per-prompt", "3",
          "--max-tokens", "12", "--dtype", "float32", "--max-model-len", "128", "--record-top-k", str(vocab),
          "--out", str(samples_file)])
    samples = read_samples(samples_file)
    assert len(samples) == 6
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    first = samples[0]
    assert tok.decode(first.prompt_token_ids).startswith("<|user|>Hello, how are you<|end|><|assistant|>")
    assert 1 <= len(first.response_token_ids) <= 12 and first.base_logprob < 0
    # Seeded per (prompt, sample): the three samples of a prompt differ.
    assert len({tuple(s.response_token_ids) for s in samples[:3]}) == 3
    assert assert_base_topk(samples, k=vocab) == len(samples)
    assert all(sum(map(math.exp, lps)) == pytest.approx(1, abs=1e-2) for s in samples for _, lps in s.topk)

    # Extending the set: sample 2 of each prompt again, alone in its run, is the same response (with
    # no top-K recorded, which changes nothing in the sampling).
    more_file = tmp_path / "more.jsonl"
    main(["sample", "--base", str(base), "--prompts", str(tmp_path / "prompts.txt"), "--samples-per-prompt", "1",
          "--first-sample", "2", "--max-tokens", "12", "--dtype", "float32", "--max-model-len", "128",
          "--record-top-k", "0", "--out", str(more_file)])
    more = read_samples(more_file)
    assert [m.response_token_ids for m in more] == [samples[2].response_token_ids, samples[5].response_token_ids]
    assert all(m.topk is None for m in more)

    for path in (samples_file, more_file):
        main(["score", str(path), "--reward", "simple", "--reward", "concise"])
        assert all(set(s.rewards) == {"simple", "concise"} for s in read_samples(path))

    out = tmp_path / "vm"
    main(["fit", str(samples_file), str(more_file), "--base", str(base), "--head", "concise:token",
          "--head", "easy:state:simple", "--num-layers", "1", "--epochs", "2", "--batch-size", "4",
          "--lr-decay", "linear", "--out", str(out)])
    spec = load_spec(out)
    assert [h.name for h in spec.heads] == ["concise", "easy"]
    assert spec.head("concise").num_training_samples == 8  # both files
    assert spec.head("easy").description.startswith("Readability")
    load_value_model(out, base)
    assert all(s.policy == {} for s in samples)

    # Iterated values: the same prompts and seeds, sampled with VAS steered by the fitted model. A
    # huge weight makes any spread in the head's values decide the candidates' order, so the
    # responses cannot all be the base's (which they would be, seed for seed, without steering).
    steered_file = tmp_path / "steered.jsonl"
    main(["sample", "--base", str(base), "--prompts", str(tmp_path / "prompts.txt"), "--samples-per-prompt",
          "3", "--max-tokens", "12", "--dtype", "float32", "--max-model-len", "128", "--value-model", str(out),
          "--weight", "concise=100", "--top-k", "8", "--out", str(steered_file)])
    steered = read_samples(steered_file)
    assert all(s.policy == {"value_model": "vm", "weights": {"concise": 100.0}, "top_k": 8} for s in steered)
    assert [s.prompt_token_ids for s in steered] == [s.prompt_token_ids for s in samples]
    assert [s.response_token_ids for s in steered] != [s.response_token_ids for s in samples]
    assert_base_topk(steered, k=20)  # the default K
    with pytest.raises(SystemExit):
        main(["sample", "--base", str(base), "--prompts", str(tmp_path / "prompts.txt"), "--weight", "concise=1",
              "--out", str(tmp_path / "refused.jsonl")])


def assert_base_topk(samples, k: int) -> int:
    """Every step records k candidates, best first, with log-probs of a distribution, and they are
    the raw base's: in a response whose every sampled token is a candidate, the sampled tokens'
    log-probs sum to base_logprob. Returns the number of such responses."""
    for s in samples:
        assert len(s.topk) == len(s.response_token_ids)
        for ids, lps in s.topk:
            assert len(ids) == len(set(ids)) == len(lps) == k and lps == sorted(lps, reverse=True)
            assert sum(map(math.exp, lps)) <= 1 + 1e-3
    covered = [s for s in samples if all(y in ids for y, (ids, _) in zip(s.response_token_ids, s.topk))]
    for s in covered:
        chosen = sum(lps[ids.index(y)] for y, (ids, lps) in zip(s.response_token_ids, s.topk))
        assert chosen == pytest.approx(s.base_logprob, abs=1e-3)
    return len(covered)


class _EngineStarted(Exception):
    pass


@pytest.mark.parametrize("given, slow_bf16, want", [(None, True, "float32"), (None, False, None),
                                                    ("bfloat16", True, "bfloat16")])
def test_sample_takes_the_dtype_vas_server_would(tiny_base, monkeypatch, given, slow_bf16, want):
    """Without --dtype, `vas-train sample` starts the engine with the dtype `vas-server serve` picks:
    float32 on an x86 CPU that emulates bfloat16 (where "auto" meant emulated bfloat16, ~8x slower),
    else vLLM's own choice; a given dtype wins."""
    import vllm

    from value_models.sample import sample
    from vas_server import engine_args

    seen = {}

    def fake_llm(**kwargs):
        seen.update(kwargs)
        raise _EngineStarted

    monkeypatch.setattr(engine_args, "on_gpu", lambda: False)
    monkeypatch.setattr(engine_args, "cpu_lacks_fast_bfloat16", lambda: slow_bf16)
    monkeypatch.setattr(vllm, "LLM", fake_llm)
    with pytest.raises(_EngineStarted):
        sample(tiny_base, ["Hello"], max_tokens=4, max_model_len=64, dtype=given)
    assert seen.get("dtype") == want


@pytest.mark.parametrize("text, name, kind, reward", [
    ("food:token:mymodule:food_words", "food", "token", "mymodule:food_words"),
    ("tox:state:hf:C:/models/classifier", "tox", "state", "hf:C:/models/classifier"),
    ("positive:token", "positive", "token", "positive"),
])
def test_fit_head_keeps_the_colons_of_its_reward(text, name, kind, reward):
    """`fit --head NAME:KIND:REWARD` with the documented `module:function` and `hf:<dir>` rewards
    (a path may hold colons itself): only the first two colons separate."""
    from value_models.cli import _parse_head

    plan = _parse_head(text)
    assert (plan.name, plan.kind, plan.reward) == (name, kind, reward)
