"""`eval` on the tiny model: the KL estimator against a brute-force full-vocabulary computation,
and the whole evaluation (real vLLM) end to end through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch


from reference_vas import ReferenceValueModel

from value_models.evaluate import EvalConfig, Generation, GenerationCache, vas_kl
from vas_server.core.format import TrunkSpec
from vas_server.core.model import load_value_model
from value_models.synthetic import random_value_model

TOP_K = 20


@pytest.fixture(scope="module")
def eval_value_model(tiny_dir, tiny_base) -> Path:
    # Heads named after built-in rewards, so `eval` scores each with the reward of its name.
    return random_value_model(tiny_dir / "eval_vm", tiny_base, [("simple", "state"), ("concise", "token")],
                              seed=21, trunk=TrunkSpec("base_prefix", num_layers=1), scale=2.0)


def test_vas_kl_matches_brute_force(tiny_base, eval_value_model):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    ref = ReferenceValueModel(str(eval_value_model), str(tiny_base))
    weights = {"simple": 1.5, "concise": -2.0}
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (3, 7, 5)]
    lengths = (4, 1, 6)
    responses, topk, exact_ref, mc_ref = [], [], [], []
    with torch.no_grad():
        for p, T in zip(prompts, lengths):
            s, steps, kl_sum, mc_sum = list(p), [], 0.0, 0.0
            for _ in range(T):
                logits = base(torch.tensor([s])).logits[0, -1].double()
                lp0 = logits.log_softmax(-1)
                top = lp0.topk(TOP_K)
                cand = top.indices.tolist()
                steered = logits.clone()
                for head, w in weights.items():
                    q = ref.values(head, s, cand).double()
                    steered[top.indices] += w * (q - q.mean())
                lpv = steered.log_softmax(-1)
                y = int(torch.multinomial(lpv.exp(), 1, generator=g))  # y ~ p_vas
                kl_sum += float((lpv.exp() * (lpv - lp0)).sum())
                mc_sum += float(lpv[y] - lp0[y])
                steps.append((cand, top.values.tolist()))
                s.append(y)
            responses.append(s[len(p):])
            topk.append(steps)
            exact_ref.append(kl_sum)
            mc_ref.append(mc_sum)
    vm = load_value_model(eval_value_model, tiny_base)
    exact, mc = vas_kl(vm, prompts, Generation(responses, [""] * 3, topk, 0.0), weights, top_k=TOP_K, max_len=64,
                       batch_size=2)  # 2 < 3 prompts: slots are reused across batches
    assert exact == pytest.approx(exact_ref, rel=1e-4, abs=1e-5)
    assert mc == pytest.approx(mc_ref, rel=1e-4, abs=1e-5)
    assert all(k > 0 for k in exact)
    # Weight 0: no steering, no KL.
    zero, _ = vas_kl(vm, prompts, Generation(responses, [""] * 3, topk, 0.0), {"simple": 0.0}, top_k=TOP_K, max_len=64)
    assert zero == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)


def test_generation_cache_shares_the_base_run_but_not_vas_runs(tmp_path, eval_value_model):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(eval_value_model, copy)

    def cache(model: Path) -> GenerationCache:
        return GenerationCache(tmp_path / "gen", EvalConfig(value_model=str(model), base="b", prompts=["hi"]), [4])

    key = (("simple", 2.0),)
    original, moved = cache(eval_value_model), cache(copy)
    assert original._path(()) == moved._path(()) and original._path(key) == moved._path(key)  # content, not path
    (copy / "heads.safetensors").write_bytes((copy / "heads.safetensors").read_bytes()[:-4] + b"\0\0\0\1")
    retrained = cache(copy)
    assert retrained._path(()) == original._path(())  # the base's samples do not depend on the value model
    assert retrained._path(key) != original._path(key)  # stale VAS responses are never reused
    other_k = GenerationCache(tmp_path / "gen", EvalConfig(value_model=str(eval_value_model), base="b",
                                                            prompts=["hi"], top_k=40), [4])
    assert other_k._path(()) == original._path(())  # VAS's top-K does not touch the base run
    assert other_k._path(key) != original._path(key)


@pytest.mark.slow
def test_eval_cli_end_to_end(tmp_path, tiny_base, eval_value_model):
    from value_models.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello, how are you\nWhat is the capital of France?\nGood morning\nThis is terrible\n")
    out = tmp_path / "eval"
    argv = ["eval", str(eval_value_model), "--base", str(tiny_base), "--prompts", str(prompts), "--num-prompts", "4",
            "--weights=-1,0,1,2,4", "--grid-weights", "0,2", "--bon", "2,4,16", "--bon-prompts", "4,4,2",
            "--max-tokens", "8", "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16",
            "--top-k", "32", "--out", str(out)]  # K > 20: more log-probs than vLLM's default max_logprobs
    main(argv)
    for name in ("eval.json", "eval.md", "reward_vs_weight.png", "reward_vs_kl.png", "grid.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "eval.json").read_text())
    assert report["num_prompts"] == 4 and report["heads"] == ["simple", "concise"]
    assert report["config"]["top_k"] == 32
    assert report["rewards"] == {"simple": "simple", "concise": "concise"}
    for head in ("simple", "concise"):
        rows = report["per_head"][head]
        assert [r["weights"].get(head, 0.0) for r in rows] == [-1, 0, 1, 2, 4]
        zero = rows[1]
        assert zero["kl"][0] == 0 and zero["tokens"] > 0
        assert all(r["kl"][0] > 0 for i, r in enumerate(rows) if i != 1)
        assert set(report["checks"][head]) >= {"monotonic", "negative_lowers", "beats_bon2", "beats_bon4", "beats_bon16"}
        assert report["checks"][head]["vs_bon16"]["prompts"] == 2
    assert report["bon"]["4"]["kl"] == pytest.approx(math.log(4) - 3 / 4)
    bon2, bon4 = report["bon"]["2"]["reward"]["concise"][0], report["bon"]["4"]["reward"]["concise"][0]
    assert bon4 >= bon2 >= report["per_head"]["concise"][1]["reward"]["concise"][0]
    assert report["bon"]["4"]["tokens"] > report["bon"]["2"]["tokens"]
    assert report["bon"]["16"]["prompts"] == 2 and report["base"]["responses"] == 2 * 16 + 2 * 4
    assert set(report["per_head"]["concise"][2]["subset"]) == {"2"}
    grid = report["grid"]
    assert [[r["weights"] for r in row] for row in grid] == [
        [{}, {"concise": 2.0}], [{"simple": 2.0}, {"concise": 2.0, "simple": 2.0}]]
    assert "## Two heads" in (out / "eval.md").read_text()

    # Started again with the same settings, into another directory that shares the saved
    # generations, it generates nothing (no engine) and reports the same numbers.
    import vllm

    first = (out / "eval.json").read_text()
    original = vllm.LLM
    vllm.LLM = None  # would fail if an engine were built
    try:
        main(argv[:-1] + [str(tmp_path / "again"), "--generations", str(out / "generations")])
    finally:
        vllm.LLM = original
    assert not (tmp_path / "again" / "generations").exists()
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert again["per_head"] == json.loads(first)["per_head"] and again["bon"] == json.loads(first)["bon"]
