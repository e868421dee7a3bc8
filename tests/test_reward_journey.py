"""Bring your own reward, end to end from the command line, as docs/TRAINING.md's first section
tells a user to: `vas-train sample` (default dtype) -> `score` with a `module:function` reward
(defined in this file) and an `hf:<dir>` classifier reward (a tiny classifier built here) ->
`fit` a token head and a state head named with `NAME:KIND:module:function` -> `vas-server serve`
-> steering raises that reward over HTTP, by a margin the test computes from its own samples.

The base is the tiny random Llama of conftest (real vLLM on CPU); the reward counts the letter
"e", something a token's identity carries, so a head learns it from a few hundred responses.
"""

from __future__ import annotations

import statistics
import sys

import pytest

from http_server import start_server, stopped_at_the_end
from value_models.cli import main
from value_models.records import read_samples

REWARD = f"{__name__}:letter_e"  # module:function, as a user writes it
PROMPTS = ["Hello, how are you", "What is the capital of France?", "Good morning", "I love sunny days",
           "This is terrible", "Short answers are best", "The quick brown fox", "Paris is the capital"] * 5
SEEDS = 32
WEIGHT = 30.0


def letter_e(prompt: str, response: str) -> float:
    """How many times the response uses the letter e."""
    return float(response.count("e"))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_base) -> str:
    """A tiny sequence classifier (2 labels) on the tiny tokenizer, saved as a user's would be."""
    from tiny_models import build_classifier

    return str(build_classifier(tmp_path_factory.mktemp("classifier"), tiny_base, ("dull", "lively")))


@pytest.fixture(scope="module")
def journey(tmp_path_factory, tiny_base, classifier):
    """sample -> score -> fit, with the CLI's defaults except the sizes of this small run."""
    work = tmp_path_factory.mktemp("journey")
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    samples = work / "samples.jsonl"
    main(["sample", "--base", str(tiny_base), "--prompts", str(work / "prompts.txt"), "--samples-per-prompt", "8",
          "--max-tokens", "12", "--max-model-len", "128", "--out", str(samples)])
    main(["score", str(samples), "--reward", REWARD, "--reward", f"hf:{classifier}#lively"])
    models = {}
    for name, kind in (("e_token", "token"), ("e_state", "state")):
        models[name] = str(work / name)
        main(["fit", str(samples), "--head", f"{name}:{kind}:{REWARD}", "--base", str(tiny_base), "--num-layers", "1",
              "--epochs", "8", "--lr", "1e-2", "--token-proj-lr", "1e-5", "--lr-decay", "linear",
              "--checkpoint-every", "0", "--out", models[name]])
    return work, samples, models


@pytest.fixture(scope="module")
def served(journey, tiny_base, tmp_path_factory):
    """`vas-server serve BASE --value-model e_token=... --value-model e_state=...`."""
    _, _, models = journey
    yield from stopped_at_the_end(start_server(tmp_path_factory.mktemp("serve_journey"), tiny_base, models))


def test_score_takes_a_function_and_a_classifier(journey, classifier):
    _, samples, _ = journey
    records = read_samples(samples)
    hf = f"hf:{classifier}#lively"
    assert len(records) == 8 * len(PROMPTS)
    assert all(set(r.rewards) == {REWARD, hf} for r in records)
    assert all(r.rewards[REWARD] == letter_e(r.prompt, r.response) for r in records)
    lively = [r.rewards[hf] for r in records]
    assert all(0 <= p <= 1 for p in lively) and len(set(lively)) > 1


def _rewards(client, head: str, weight: float) -> list[tuple[str, float]]:
    """(answer, reward) of SEEDS sampled answers at `weight` (prompt and seed fixed per index)."""
    out = []
    for seed in range(SEEDS):
        prompt = PROMPTS[seed % 8]
        answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=1.0, seed=seed,
                                           extra_body={"vas_weights": {head: weight}}).choices[0].text
        out.append((answer, letter_e(prompt, answer)))
    return out


def test_the_served_token_head_raises_its_reward(served):
    """Over HTTP: the mean reward of SEEDS sampled answers at weight WEIGHT is above that at weight 0
    by more than three standard errors of the paired differences (same prompt and seed)."""
    client = served.client()
    gains = [b - a for (_, a), (_, b) in zip(_rewards(client, "e_token", 0.0), _rewards(client, "e_token", WEIGHT))]
    mean, se = statistics.fmean(gains), statistics.stdev(gains) / SEEDS ** 0.5
    print(f"e_token: reward gain at weight {WEIGHT}: {mean:.2f} +- {se:.2f}", file=sys.stderr)
    assert mean > 3 * se > 0, (mean, se, gains)


def test_the_served_state_head_steers(served):
    """The state head (own trunk, separate runtime) is served and steers: most answers change at
    weight WEIGHT. Its reward gain is not asserted: on this tiny random base a state head on the
    1-layer trunk does not learn the letter count (correlation of V(s+a) with the e's in a: 0.07,
    even from 1,600 responses), unlike the token head, which reads the token's own embedding."""
    client = served.client()
    plain, steered = _rewards(client, "e_state", 0.0), _rewards(client, "e_state", WEIGHT)
    assert sum(a != b for (a, _), (b, _) in zip(plain, steered)) > SEEDS // 2
