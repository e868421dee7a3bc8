"""Prompts for training and evaluation, from the PyPI package `chitchat-dataset` (MIT).

Each conversation's turns (consecutive messages of one sender, joined) become single-turn user
prompts. The held-out split is fixed by a hash of the conversation id, so it never changes between
runs or machines, and no conversation contributes to both splits.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 10
MIN_WORDS = 4  # "hi" / "lol" turns say nothing to steer
MAX_WORDS = 40


def split_of(conversation_id: str) -> str:
    bucket = int(hashlib.sha256(conversation_id.encode()).hexdigest(), 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def chitchat_prompts(split: str) -> list[str]:
    """All usable prompts of one split, deduplicated, in a fixed order (sorted conversation ids,
    then turn order)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    import chitchat_dataset

    conversations = chitchat_dataset.Dataset()
    seen: set[str] = set()
    prompts: list[str] = []
    for conversation_id in sorted(conversations):
        if split_of(conversation_id) != split:
            continue
        for turn in conversations[conversation_id]["messages"]:
            text = " ".join(m["text"].strip() for m in turn if m["text"].strip())
            if MIN_WORDS <= len(text.split()) <= MAX_WORDS and text not in seen:
                seen.add(text)
                prompts.append(text)
    return prompts


def read_prompts(path: Path | str) -> list[str]:
    """Prompts from a file: JSONL with a "prompt" field per line, or plain text, one per line."""
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        return [json.loads(line)["prompt"] for line in lines]
    return lines


def pick(prompts: list[str], count: int | None, seed: int = 0) -> list[str]:
    """`count` prompts drawn without replacement by a seeded shuffle (neighbouring turns of one
    conversation are alike, so a prefix would be a poor sample). None: all, in the given order."""
    if count is None:
        return list(prompts)
    if count > len(prompts):
        raise ValueError(f"asked for {count} prompts but only {len(prompts)} exist")
    return random.Random(seed).sample(prompts, count)
