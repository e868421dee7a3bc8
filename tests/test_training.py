"""TD(λ) value training on a synthetic task whose true values are known in closed form.

Task: a prompt of random tokens (from 16 ids), then a response [y_0, filler..., EOS] where y_0 is uniform over 8
"choice" tokens. Head `first` (a state head) gets reward 1 if y_0 is one of the first four choices,
else 0; head `other` (a token head) gets reward 5 + 2 * [y_0 is one of choices 2..5]. For a reward
R(y_0) with P(R = high) = 1/2, the values of the data policy are:
    state head  V(s_0) = E[R] (y_0 not yet drawn),  V(s_i) = R(y_0) for i >= 1;
    token head  Q(s_i)[y_i] = R(y_0) for every i (y_0 is the action at s_0).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch


from tiny_models import build_llama, build_tokenizer

from vas_server.core.format import TokenizerMismatchError, load_spec, tokenizer_identity
from vas_server.core.model import load_value_model
from value_models.predict import state_values
from value_models.records import Sample
from value_models.train import CURVE_FILE, FitConfig, HeadPlan, fit
from value_models.training_trunk import TrunkPlan

CHOICES = list(range(100, 108))
FIRST_HIGH = set(CHOICES[:4])
OTHER_HIGH = set(CHOICES[2:6])
FILLER = 42
# Root-mean-square error (reward units) of the fitted values against the true ones, over the
# states of fresh samples. `first` is a 0/1 reward (std 0.5), `other` a 5/7 one (std 1): a model
# that learned nothing but the mean is off by ~0.43 and ~0.87. Fitting gets ~0.14 and ~0.18.
FIRST_THRESHOLD = 0.2
OTHER_THRESHOLD = 0.3


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("training_models")
    build_tokenizer(root / "tokenizer")
    other_root = root / "other_tokenizer"
    build_tokenizer(other_root, vocab_size=320)
    return {
        # Small weights keep each position's own token embedding dominant in its final hidden state,
    # so a linear head on this frozen random trunk can tell which token it is; with large random
    # weights the context swamps it and no head could fit even the true values.
    "base": build_llama(root / "base", root / "tokenizer", seed=0, init_std=0.02),
        "standalone": build_llama(root / "standalone", root / "tokenizer", seed=1, num_layers=1),
        "other_tokenizer": build_llama(root / "other", other_root, seed=2, num_layers=1),
    }


@pytest.fixture(scope="module")
def vocab_hash(models) -> str:
    from transformers import AutoTokenizer

    return tokenizer_identity(AutoTokenizer.from_pretrained(str(models["base"]))).vocab_hash


def first_reward(y0: int) -> float:
    return float(y0 in FIRST_HIGH)


def other_reward(y0: int) -> float:
    return 5.0 + 2.0 * (y0 in OTHER_HIGH)


def synthetic_samples(n: int, seed: int, vocab_hash: str, response_length: int = 2) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(200, 216, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        y0 = CHOICES[int(torch.randint(0, len(CHOICES), (1,), generator=g))]
        response = [y0] + [FILLER] * (response_length - 1)
        out.append(Sample(prompt="", prompt_token_ids=prompt, response="", response_token_ids=response,
                          vocab_hash=vocab_hash, rewards={"first": first_reward(y0), "other": other_reward(y0)}))
    return out


def true_values(sample: Sample) -> dict[str, list[float]]:
    T = len(sample.response_token_ids)
    y0 = sample.response_token_ids[0]
    return {
        "first": [0.5] + [first_reward(y0)] * (T - 1),  # E[first] = 4/8
        "other": [other_reward(y0)] * T,
    }


def value_rmse(model_dir: Path, base_dir: Path, samples: list[Sample]) -> dict[str, float]:
    model = load_value_model(model_dir, base_dir)
    predicted = state_values(model, [s.prompt_token_ids for s in samples], [s.response_token_ids for s in samples])
    errors: dict[str, list[float]] = {name: [] for name in model.value_heads.names}
    for s, values in zip(samples, predicted):
        truth = true_values(s)
        for h, name in enumerate(model.value_heads.names):
            errors[name].extend(((values[h] - torch.tensor(truth[name])) ** 2).tolist())
    return {name: (sum(e) / len(e)) ** 0.5 for name, e in errors.items()}


HEADS = [HeadPlan("first", "state", "first"), HeadPlan("other", "token", "other")]


def frozen_prefix_config(base: Path, **overrides) -> FitConfig:
    settings = dict(heads=HEADS, trunk=TrunkPlan("base_prefix", str(base), num_layers=2), epochs=8,
                    batch_size=32, lr=3e-3, token_proj_lr=None, seed=0, checkpoint_every=0,
                    validation_fraction=0.0)
    settings.update(overrides)
    return FitConfig(**settings)


def test_fit_learns_true_values(models, vocab_hash, tmp_path):
    train = synthetic_samples(512, seed=1, vocab_hash=vocab_hash)
    fresh = synthetic_samples(64, seed=2, vocab_hash=vocab_hash)
    result = fit(train, frozen_prefix_config(models["base"]), tmp_path / "vm", progress=False)
    rmse = value_rmse(result.path, models["base"], fresh)
    assert rmse["first"] < FIRST_THRESHOLD and rmse["other"] < OTHER_THRESHOLD, rmse

    spec = load_spec(result.path)
    first, other = spec.head("first"), spec.head("other")
    assert (first.kind, other.kind) == ("state", "token")
    rewards = torch.tensor([[s.rewards["first"], s.rewards["other"]] for s in train])
    assert first.reward_mean == pytest.approx(float(rewards[:, 0].mean()), abs=1e-6)
    assert other.reward_std == pytest.approx(float(rewards[:, 1].std()), abs=1e-6)
    assert first.num_training_samples == 512
    losses = [c["loss"] for c in result.curve if "loss" in c]
    assert losses[-1]["first"] < losses[0]["first"]


def test_fit_on_shuffled_rewards_does_not_learn(models, vocab_hash, tmp_path):
    train = synthetic_samples(512, seed=1, vocab_hash=vocab_hash)
    g = torch.Generator().manual_seed(3)
    for name in ("first", "other"):
        shuffled = [train[i].rewards[name] for i in torch.randperm(len(train), generator=g).tolist()]
        for s, r in zip(train, shuffled):
            s.rewards[name] = r
    fresh = synthetic_samples(64, seed=2, vocab_hash=vocab_hash)
    result = fit(train, frozen_prefix_config(models["base"]), tmp_path / "vm", progress=False)
    rmse = value_rmse(result.path, models["base"], fresh)
    assert rmse["first"] > 1.75 * FIRST_THRESHOLD and rmse["other"] > 1.75 * OTHER_THRESHOLD, rmse


def test_soft_fit_learns_soft_values(models, vocab_hash, tmp_path):
    """With soft_beta the state head's value before the choice is the soft value (1/β) log E[exp(β r)]
    of the standardised reward, not its mean; after the choice the outcome is certain and both agree."""
    beta = 2.0
    train = synthetic_samples(512, seed=1, vocab_hash=vocab_hash)
    fresh = synthetic_samples(64, seed=2, vocab_hash=vocab_hash)
    result = fit(train, frozen_prefix_config(models["base"], soft_beta=beta), tmp_path / "vm", progress=False)
    first = load_spec(result.path).head("first")
    rewards = torch.tensor([s.rewards["first"] for s in train], dtype=torch.float64)
    standardised = (rewards - first.reward_mean) / first.reward_std
    soft = first.reward_mean + first.reward_std * float(torch.logsumexp(beta * standardised, 0)
                                                        - math.log(len(train))) / beta
    assert soft - 0.5 > 0.3  # the mean (what the squared error learns, test_fit_learns_true_values) is 0.5

    model = load_value_model(result.path, models["base"])
    values = state_values(model, [s.prompt_token_ids for s in fresh], [s.response_token_ids for s in fresh])
    h = model.value_heads.names.index("first")
    before = torch.tensor([float(v[h, 0]) for v in values])
    after = torch.cat([v[h, 1:] - first_reward(s.response_token_ids[0]) for s, v in zip(fresh, values)])
    assert float(before.mean()) == pytest.approx(soft, abs=0.1)
    assert float(after.pow(2).mean().sqrt()) < FIRST_THRESHOLD, after
    assert load_spec(result.path).extra["training"]["soft_beta"] == beta


def small_run_config(models, trunk: TrunkPlan, **overrides) -> FitConfig:
    settings = dict(heads=HEADS, trunk=trunk, epochs=2, batch_size=8, lr=1e-2, trunk_lr=1e-2, seed=0,
                    checkpoint_every=2, token_proj_lr=None, validation_fraction=0.0)
    settings.update(overrides)
    return FitConfig(**settings)


def test_lora_checkpoint_round_trip(models, vocab_hash, tmp_path):
    """The saved PEFT adapter, merged by the server's loader, gives the trained trunk's values."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from value_models.states import gather_states, head_values, make_batch

    samples = synthetic_samples(32, seed=4, vocab_hash=vocab_hash, response_length=3)
    config = small_run_config(models, TrunkPlan("base_prefix", str(models["base"]), num_layers=1, lora_r=4))
    path = fit(samples, config, tmp_path / "vm", progress=False).path
    assert not (path / "train_state").exists()  # removed once training completed
    spec = load_spec(path)
    assert spec.trunk.type == "base_prefix" and spec.trunk.num_layers == 1 and spec.trunk.lora

    # Independent reference: peft's own loader on the HF model, with our heads on top.
    hf = AutoModelForCausalLM.from_pretrained(str(models["base"]), num_hidden_layers=1, dtype=torch.float32)
    hf = PeftModel.from_pretrained(hf, str(path / "lora")).eval()
    served = load_value_model(path, models["base"])
    batch = make_batch([s.prompt_token_ids for s in samples], [s.response_token_ids for s in samples])
    with torch.no_grad():
        hidden = hf.base_model.model.model(input_ids=batch.tokens).last_hidden_state
        reference = head_values(served.value_heads, gather_states(hidden, batch.positions),
                                served.trunk.embed_tokens.weight, batch.next_tokens)
    ours = state_values(served, [s.prompt_token_ids for s in samples], [s.response_token_ids for s in samples],
                        reward_units=False)
    for b, v in enumerate(ours):
        assert torch.allclose(v, reference[:, b, :v.shape[1]], atol=1e-4)
    # The adapter was trained (peft initialises B to 0): without it the hidden states differ.
    without_lora = AutoModelForCausalLM.from_pretrained(str(models["base"]), num_hidden_layers=1)
    with torch.no_grad():
        base_hidden = without_lora.model(input_ids=batch.tokens).last_hidden_state
    assert not torch.allclose(base_hidden, hidden, atol=1e-4)


def test_resume_after_interruption_matches_uninterrupted_run(models, vocab_hash, tmp_path):
    samples = synthetic_samples(32, seed=5, vocab_hash=vocab_hash, response_length=3)
    config = small_run_config(models, TrunkPlan("base_prefix", str(models["base"]), num_layers=1, lora_r=4),
                              lr_decay="linear")
    whole = fit(samples, config, tmp_path / "whole", progress=False)

    interrupted = fit(samples, config, tmp_path / "resumed", progress=False, stop_after_steps=3)
    assert interrupted.steps == 3 and (tmp_path / "resumed" / "train_state" / "state.pt").is_file()
    # Linear decay: step 3 of 8 ran at (1 - 2/8) of each group's rate (heads 1e-2, token proj 1e-2, LoRA 1e-2).
    saved = torch.load(tmp_path / "resumed" / "train_state" / "state.pt", weights_only=True)
    assert [g["lr"] for g in saved["optimizer"]["param_groups"]] == pytest.approx([0.75e-2] * 3)
    resumed = fit(samples, config, tmp_path / "resumed", progress=False)
    assert resumed.steps == whole.steps == 8
    assert resumed.curve == whole.curve
    from safetensors.torch import load_file

    for name in ("heads.safetensors", "lora/adapter_model.safetensors"):
        a, b = load_file(str(whole.path / name)), load_file(str(resumed.path / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_states_cache_gives_the_same_model_and_skips_the_trunk(models, vocab_hash, tmp_path, monkeypatch):
    import value_models.train as train

    samples = synthetic_samples(32, seed=7, vocab_hash=vocab_hash)
    config = small_run_config(models, TrunkPlan("base_prefix", str(models["base"]), num_layers=1))
    plain = fit(samples, config, tmp_path / "plain", progress=False)
    first = fit(samples, config, tmp_path / "first", progress=False, states_cache=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("trunk-states-*.pt"))) == 1

    def no_trunk(*args, **kwargs):
        raise AssertionError("the trunk ran although its states were cached")

    monkeypatch.setattr(train, "_precompute_states", no_trunk)
    second = fit(samples, config, tmp_path / "second", progress=False, states_cache=tmp_path / "cache")
    assert plain.curve == first.curve == second.curve
    # Other token ids are other states: the cache must not serve them.
    with pytest.raises(AssertionError, match="cached"):
        fit(synthetic_samples(32, seed=8, vocab_hash=vocab_hash), config, tmp_path / "third", progress=False,
            states_cache=tmp_path / "cache")


def test_unknown_lr_decay_is_refused(models):
    with pytest.raises(ValueError, match="lr_decay"):  # when the settings are made, before any trunk loads
        small_run_config(models, TrunkPlan("base_prefix", str(models["base"]), num_layers=1), lr_decay="cosine")


def test_resume_refuses_other_settings(models, vocab_hash, tmp_path):
    samples = synthetic_samples(16, seed=6, vocab_hash=vocab_hash)
    trunk = TrunkPlan("base_prefix", str(models["base"]), num_layers=1)
    fit(samples, small_run_config(models, trunk), tmp_path / "vm", progress=False, stop_after_steps=1)
    with pytest.raises(ValueError, match="different settings"):
        fit(samples, small_run_config(models, trunk, lr=0.5), tmp_path / "vm", progress=False)


def test_standalone_trunk_is_fine_tuned_and_saved(models, vocab_hash, tmp_path):
    from safetensors.torch import load_file

    samples = synthetic_samples(16, seed=7, vocab_hash=vocab_hash)
    config = small_run_config(models, TrunkPlan("standalone", str(models["standalone"]), train_trunk=True),
                              checkpoint_every=0)
    path = fit(samples, config, tmp_path / "vm", progress=False).path
    assert load_spec(path).trunk.type == "standalone"
    saved = load_file(str(path / "trunk" / "model.safetensors"))
    original = load_file(str(models["standalone"] / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(saved[key], original[key])
    model = load_value_model(path, models["base"])  # the base dir is not used by a standalone trunk
    assert model.trunk.config.num_layers == 1


def test_trunk_with_another_tokenizer_is_refused(models, vocab_hash, tmp_path):
    samples = synthetic_samples(8, seed=8, vocab_hash=vocab_hash)
    config = small_run_config(models, TrunkPlan("standalone", str(models["other_tokenizer"])))
    with pytest.raises(TokenizerMismatchError, match="different tokenizer"):
        fit(samples, config, tmp_path / "vm", progress=False)


def test_constant_reward_is_refused(models, vocab_hash, tmp_path):
    samples = synthetic_samples(8, seed=9, vocab_hash=vocab_hash)
    for s in samples:
        s.rewards["first"] = 1.0
    with pytest.raises(ValueError, match="nothing to learn"):
        fit(samples, small_run_config(models, TrunkPlan("base_prefix", str(models["base"]), num_layers=1)),
            tmp_path / "vm", progress=False)


def test_held_out_error_is_reported_and_a_rise_is_warned(models, vocab_hash, tmp_path, capsys):
    """A held-out split reports the Monte-Carlo return error before training and after every epoch
    (in training_curve.json too); it falls while the heads learn, and an epoch that raises it
    (here: a learning rate far too high) prints a warning."""
    train = synthetic_samples(320, seed=1, vocab_hash=vocab_hash)
    good = fit(train, frozen_prefix_config(models["base"], epochs=3, validation_fraction=0.1), tmp_path / "good",
               progress=False)
    held = [c for c in good.curve if "validation" in c]
    assert [c["epoch"] for c in held] == [-1, 0, 1, 2]
    assert load_spec(good.path).head("first").num_training_samples == 320 - 32
    assert all(held[-1]["validation"][h] < 0.8 * held[0]["validation"][h] for h in ("first", "other"))
    assert json.loads((good.path / CURVE_FILE).read_text()) == good.curve
    assert "WARNING" not in capsys.readouterr().out
    fit(train, frozen_prefix_config(models["base"], epochs=3, validation_fraction=0.1, lr=30.0, passes_per_batch=4),
        tmp_path / "bad", progress=False)
    assert "WARNING: the held-out error of" in capsys.readouterr().out


# The steering proxy (value_models/proxy.py) and fit's per-epoch report of it.

def test_proxy_matches_a_hand_computed_example():
    """One head, three responses; candidates [10, 11] with values [1, 3] (centred: -1, +1) and base
    probabilities [1/2, 1/4] (1/4 outside): E c = -1/4, Var c = 3/4 - 1/16 = 11/16. Response 0
    samples 11 (S = 1 + 1/4), response 1 a non-candidate (S = 0 + 1/4) and then a step whose
    candidates have equal values (centred: 0), response 2 samples 10 (S = -1 + 1/4)."""
    from value_models.proxy import ProxySums

    sums = ProxySums(3, 1)
    candidates = torch.tensor([[10, 11]] * 4)
    values = torch.tensor([[[1.0, 3.0]], [[1.0, 3.0]], [[2.0, 2.0]], [[1.0, 3.0]]])  # [steps, heads, K]
    logp0 = torch.tensor([[0.5, 0.25]] * 4).log()
    # Steps of one response may share a batch (response 1 has two here).
    sums.add(torch.tensor([0, 1, 1, 2]), values, candidates, logp0, torch.tensor([11, 12, 10, 10]))
    assert sums.s[:, 0].tolist() == pytest.approx([1.25, 0.25, -0.75])
    assert sums.var[:, 0].tolist() == pytest.approx([11 / 16, 11 / 16, 11 / 16])
    # r = [1, 0, 0]: Cov(S, r) = 1/3, std S = sqrt(2/3), std r = sqrt(2/9), so corr = sqrt(3)/2.
    r = torch.tensor([1.0, 0.0, 0.0])
    summary = sums.summary(0, r, kl=0.5)
    assert summary["corr"] == pytest.approx(math.sqrt(3) / 2)
    assert summary["gain_at_kl"] == pytest.approx((1 / 3) / math.sqrt(11 / 16))  # Cov / sqrt(E Var) * sqrt(2 KL)
    assert summary["weight_at_kl"] == pytest.approx(math.sqrt(1 / (11 / 16)))
    assert sums.corr(0, r) == summary["corr"]
    assert ProxySums(3, 1).corr(0, r) == 0.0  # S never varies: no gain, not NaN


def with_base_topk(samples: list[Sample]) -> list[Sample]:
    """The synthetic task's base policy as recorded top-K candidates (K = 8): y_0 is uniform over
    the choices, then the filler is all but certain (the other candidates share ~1e-12)."""
    others = [t for t in range(300, 307)]
    for s in samples:
        first = [CHOICES, [math.log(1 / len(CHOICES))] * len(CHOICES)]
        rest = [[FILLER] + others, [0.0] + [-30.0] * len(others)]
        s.topk = [first] + [rest] * (len(s.response_token_ids) - 1)
    return samples


def test_fit_reports_the_steering_proxy_of_token_heads_per_epoch(models, vocab_hash, tmp_path, capsys):
    """On held-out samples with top-K candidates, fit reports each token head's proxy corr(S, r)
    after every epoch: 0 for the zero-initialised head, near 1 once it has learned the (here
    learnable) true values; a head fitted to shuffled rewards learns values that do not point
    towards the reward, and its correlation stays far below."""
    config = frozen_prefix_config(models["base"], epochs=3, validation_fraction=0.1)
    train = with_base_topk(synthetic_samples(320, seed=1, vocab_hash=vocab_hash))
    good = fit(train, config, tmp_path / "good", progress=False)
    held = [c for c in good.curve if "validation" in c]
    assert [c["epoch"] for c in held] == [-1, 0, 1, 2]
    assert all(set(c["proxy_corr"]) == {"other"} for c in held)  # token heads only: `first` is a state head
    corr = [c["proxy_corr"]["other"] for c in held]
    assert corr[0] == 0.0 and corr[-1] > 0.9, corr
    assert json.loads((good.path / CURVE_FILE).read_text()) == good.curve
    out = capsys.readouterr().out
    assert "steering proxy corr(S, r) on 32 of them: other" in out
    assert out.count("for token heads only, not for first") == 1

    g = torch.Generator().manual_seed(3)
    shuffled = [train[i].rewards["other"] for i in torch.randperm(len(train), generator=g).tolist()]
    for s, r in zip(train, shuffled):
        s.rewards["other"] = r
    noise = fit(train, config, tmp_path / "noise", progress=False)
    noise_corr = [c["proxy_corr"]["other"] for c in noise.curve if "validation" in c]
    assert max(abs(c) for c in noise_corr) < 0.5 < corr[-1] - 0.4, noise_corr


def test_samples_without_topk_still_train_and_skip_the_proxy(models, vocab_hash, tmp_path, capsys):
    """Sample files written before `topk` existed load (as topk None) and train; the proxy is
    skipped with one message. Steered samples are not scored either: the proxy's expectations are
    under the base policy."""
    from value_models.records import read_samples

    old = tmp_path / "old.jsonl"
    rows = [{k: v for k, v in dataclasses.asdict(s).items() if k != "topk"}
            for s in synthetic_samples(160, seed=1, vocab_hash=vocab_hash)]
    old.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = read_samples(old)
    assert all(s.topk is None for s in samples)
    config = frozen_prefix_config(models["base"], epochs=2, validation_fraction=0.1)
    result = fit(samples, config, tmp_path / "old_vm", progress=False)
    held = [c for c in result.curve if "validation" in c]
    assert len(held) == 3 and not any("proxy_corr" in c for c in held)
    assert capsys.readouterr().out.count("no steering proxy") == 1

    steered = with_base_topk(synthetic_samples(160, seed=1, vocab_hash=vocab_hash))
    for s in steered:
        s.policy = {"value_model": "vm", "weights": {"other": 2.0}, "top_k": 8}
    result = fit(steered, config, tmp_path / "steered_vm", progress=False)
    assert not any("proxy_corr" in c for c in result.curve)
