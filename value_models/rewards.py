"""Reward functions: one scalar per (prompt, response), given at the end of the response.

A reward is named by a spec string:
  * a built-in name: `positive`, `concise`, `simple`, `clean` (see BUILTINS);
  * `module:function` -- a user function `f(prompt: str, response: str) -> float`;
  * `hf:<directory>` or `hf:<directory>#<label>` -- a local Hugging Face sequence-classification
    model: the probability of `<label>` (default: the last label, e.g. "positive" in a binary
    sentiment model), or the raw score of a single-output (regression) model.

Every reward is used through `Reward.score(prompts, responses) -> list[float]`, batched so that a
classifier runs once per batch instead of once per text.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

HF_PREFIX = "hf:"
# `concise`: the reward halves roughly every 35 words (exp(-words / 50)).
CONCISE_SCALE_WORDS = 50.0
_WORD = re.compile(r"\S+")


@dataclass
class Reward:
    name: str  # the spec string it was made from
    description: str
    score: Callable[[Sequence[str], Sequence[str]], list[float]]


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def positive(prompt: str, response: str) -> float:
    """VADER compound sentiment of the response, in [-1, 1]."""
    return float(_vader().polarity_scores(response)["compound"])


def concise(prompt: str, response: str) -> float:
    """Shorter is better: exp(-words / 50), in (0, 1]; 1 for an empty response, 0.37 at 50 words,
    0.05 at 150. Words, not tokens, so that the reward does not depend on the tokenizer; smooth
    and never saturating, so that every extra word costs something at any length."""
    return math.exp(-word_count(response) / CONCISE_SCALE_WORDS)


def simple(prompt: str, response: str) -> float:
    """Readability: textstat's Flesch reading ease clipped to its documented 0..100 scale, divided
    by 100 (1 = very easy). The formula extrapolates past 100 for one-syllable fragments and to
    206.8 for empty text, so an empty response scores 0 rather than "very easy"."""
    if word_count(response) == 0:
        return 0.0
    import textstat

    return min(max(float(textstat.flesch_reading_ease(response)), 0.0), 100.0) / 100.0


def clean(prompt: str, response: str) -> float:
    """No profanity: 1 / (1 + number of profane words), so 1 when clean, 0.5 with one profane word."""
    from better_profanity import profanity

    words = _WORD.findall(response)
    profane = sum(1 for w in words if profanity.contains_profanity(w))
    return 1.0 / (1.0 + profane)


BUILTINS: dict[str, Callable[[str, str], float]] = {
    "positive": positive,
    "concise": concise,
    "simple": simple,
    "clean": clean,
}


_VADER = None


def _vader():
    global _VADER
    if _VADER is None:  # building the analyzer reads its lexicon: do it once
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return _VADER


def _per_text(fn: Callable[[str, str], float], spec: str) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
    """A per-response function as a batched scorer; anything but a finite number from it, or an
    exception, is a ValueError naming the reward and the response."""
    def score(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        out = []
        for p, r in zip(prompts, responses, strict=True):
            try:
                value = fn(p, r)
            except Exception as e:  # noqa: BLE001 - the user's function: report it, whatever it raised
                raise ValueError(f"reward {spec!r} raised {type(e).__name__}: {e} (response {r[:60]!r})") from e
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"reward {spec!r} returned {value!r} ({type(value).__name__}) for response "
                                 f"{r[:60]!r}; a reward must return a finite number")
            out.append(float(value))
        return out

    return score


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0]


def describe(spec: str) -> str:
    """A one-line description of a reward spec, without loading any model."""
    if spec in BUILTINS:
        return " ".join((BUILTINS[spec].__doc__ or "").split())
    return f"reward {spec}"


def load_reward(spec: str) -> Reward:
    """The reward named by `spec` (see the module docstring)."""
    if spec in BUILTINS:
        fn = BUILTINS[spec]
        return Reward(spec, describe(spec), _per_text(fn, spec))
    if spec.startswith(HF_PREFIX):
        return _classifier_reward(spec)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {spec!r}: cannot import {attr!r} from {module_name!r} ({e})") from None
        if not callable(fn):
            raise ValueError(f"reward {spec!r} is not callable")
        return Reward(spec, _first_line(fn.__doc__) or f"user reward {spec}", _per_text(fn, spec))
    raise ValueError(
        f"unknown reward {spec!r}: use one of {', '.join(BUILTINS)}, a Python 'module:function', "
        f"or '{HF_PREFIX}<classifier directory>[#label]'")


def _classifier_reward(spec: str, batch_size: int = 32) -> Reward:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    location, _, label = spec[len(HF_PREFIX):].partition("#")
    directory = Path(location)
    if not (directory / "config.json").is_file():
        raise ValueError(f"reward {spec!r}: {directory} is not a local Hugging Face model directory")
    import json

    architectures = json.loads((directory / "config.json").read_text()).get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"reward {spec!r}: {directory} is not a sequence-classification model (its architectures: "
                         f"{', '.join(architectures) or 'none'}); hf: rewards need one, e.g. a sentiment classifier")
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForSequenceClassification.from_pretrained(str(directory)).eval()
    num_labels = model.config.num_labels
    if num_labels == 1:
        if label:
            raise ValueError(f"reward {spec!r}: a single-output model has no label {label!r}")
        index = None
        what = "score"
    else:
        names = {v: int(k) for k, v in model.config.id2label.items()}
        if label and label not in names:
            raise ValueError(f"reward {spec!r}: no label {label!r}; labels are {sorted(names)}")
        index = names[label] if label else num_labels - 1
        what = f"probability of {model.config.id2label[index]!r}"

    def score(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(responses), batch_size):
            batch = list(responses[start:start + batch_size])
            enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True)
            with torch.no_grad():
                logits = model(**enc).logits.float()
            values = logits[:, 0] if index is None else logits.softmax(-1)[:, index]
            out.extend(values.tolist())
        return out

    return Reward(spec, f"classifier {directory.name}: {what} of the response", score)
