"""Reward functions on fixed texts."""

from __future__ import annotations

import math
import re

import pytest


from value_models.rewards import load_reward


def score(spec: str, *responses: str) -> list[float]:
    return load_reward(spec).score([""] * len(responses), list(responses))


def test_positive_is_vader_compound():
    happy, sad, neutral = score("positive", "I love this, it is wonderful!", "This is terrible and sad.",
                                "The train leaves at noon.")
    assert happy > 0.5 and sad < -0.5 and neutral == 0.0


def test_concise_prefers_shorter_and_is_bounded():
    empty, short, long = score("concise", "", "Yes, at noon.", " ".join(["word"] * 150))
    assert empty == 1.0
    assert short == pytest.approx(math.exp(-3 / 50))
    assert long == pytest.approx(math.exp(-3)) and 0 < long < short < empty


def test_simple_is_clipped_flesch_reading_ease():
    easy, hard, empty = score(
        "simple", "The cat sat on the mat. It was fun.",
        "Photosynthesis constitutes a biochemical mechanism whereby chlorophyll-containing organisms "
        "transform electromagnetic radiation into chemically stored energy.", "")
    import textstat

    assert easy == pytest.approx(min(textstat.flesch_reading_ease("The cat sat on the mat. It was fun."), 100) / 100)
    assert easy > 0.9 and hard == 0.0 and empty == 0.0  # the hard text's raw score is negative


def test_clean_counts_profane_words():
    assert score("clean", "What a lovely day.", "What the shit.", "shit shit") == [1.0, 0.5, 1 / 3]


def length_in_characters(prompt: str, response: str) -> float:
    """Characters in the response (a user reward for the test)."""
    return float(len(response))


def test_user_reward_from_module_function():
    reward = load_reward("test_rewards:length_in_characters")
    assert reward.score(["p", "q"], ["abc", ""]) == [3.0, 0.0]
    assert reward.description == "Characters in the response (a user reward for the test)."


def test_unknown_and_broken_rewards_fail_clearly():
    with pytest.raises(ValueError, match="unknown reward 'happy'"):
        load_reward("happy")
    with pytest.raises(ValueError, match="cannot import"):
        load_reward("test_rewards:no_such_function")
    with pytest.raises(ValueError, match="not a local Hugging Face model directory"):
        load_reward("hf:/nonexistent/classifier")


def test_classifier_directory_reward(tmp_path):
    from tiny_models import build_classifier, build_tokenizer

    build_tokenizer(tmp_path / "tok")
    build_classifier(tmp_path / "clf", tmp_path / "tok", ("negative", "positive"))
    texts = ["I love sunny days.", "This is terrible.", "Paris"]
    positive = score(f"hf:{tmp_path / 'clf'}", *texts)  # default: the last label
    negative = score(f"hf:{tmp_path / 'clf'}#negative", *texts)
    assert all(0 < p < 1 for p in positive)
    assert positive == pytest.approx([1 - n for n in negative], abs=1e-5)
    assert len(set(round(p, 6) for p in positive)) == 3  # depends on the text
    with pytest.raises(ValueError, match="no label 'joy'"):
        load_reward(f"hf:{tmp_path / 'clf'}#joy")


def length_in_words_or_none(prompt: str, response: str):
    """Returns None for an empty response: a user's bug."""
    return len(response.split()) or None


def text_reward(prompt: str, response: str):
    return "high"


def raising_reward(prompt: str, response: str) -> float:
    return 1.0 / len(response)


@pytest.mark.parametrize("spec, response, message", [
    ("test_rewards:length_in_words_or_none", "", "returned None (NoneType)"),
    ("test_rewards:text_reward", "hi", "returned 'high' (str)"),
    ("test_rewards:raising_reward", "", "raised ZeroDivisionError"),
])
def test_a_reward_that_returns_no_number_or_raises_is_named(spec, response, message):
    with pytest.raises(ValueError, match=rf"reward '{spec}' {re.escape(message)}"):
        score(spec, "fine", response)


def test_an_hf_directory_that_is_not_a_classifier_is_refused(tiny_base):
    with pytest.raises(ValueError, match="is not a sequence-classification model .*LlamaForCausalLM"):
        load_reward(f"hf:{tiny_base}")


def test_the_cli_reports_bad_rewards_and_samples_without_a_traceback(tmp_path, capsys):
    from value_models.cli import main
    from value_models.records import Sample, write_samples

    samples = tmp_path / "s.jsonl"
    write_samples(samples, [Sample(prompt="p", prompt_token_ids=[1], response="", response_token_ids=[2],
                                   finish_reason="stop", base_logprob=-1.0, vocab_hash="x")])
    with pytest.raises(SystemExit, match="vas-train score: reward 'test_rewards:raising_reward' raised"):
        main(["score", str(samples), "--reward", "test_rewards:raising_reward"])
    with pytest.raises(SystemExit, match="vas-train score: unknown reward 'nope'"):
        main(["score", str(samples), "--reward", "nope"])
