"""Training samples as JSONL, one response per line.

Fields: prompt (the user text), prompt_token_ids (chat template applied), response,
response_token_ids (as sampled, end-of-sequence token included when the model stopped),
finish_reason, base_logprob (sum of the base's log-probs of the response tokens), vocab_hash
(of the tokenizer that made the ids, checked before training), policy ({} for the base;
for VAS-steered samples the value model's directory name, weights and top-K), topk (per response
token, the base's top-K candidates at that step as [ids, raw log-probs], best first: the steering
proxy's data, value_models/proxy.py; null when not recorded, as in files written before it was),
and after `score`, rewards {reward spec: value}.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable


@dataclass
class Sample:
    prompt: str
    prompt_token_ids: list[int]
    response: str
    response_token_ids: list[int]
    finish_reason: str = ""
    base_logprob: float | None = None
    vocab_hash: str = ""
    policy: dict = field(default_factory=dict)
    rewards: dict[str, float] = field(default_factory=dict)
    topk: list[list[list]] | None = None  # per step: [[ids], [log-probs]]


def write_samples(path: Path | str, samples: Iterable[Sample]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for s in samples:
            f.write(json.dumps(asdict(s)) + "\n")
    tmp.replace(path)  # never leave a half-written file under the real name


def read_samples(path: Path | str) -> list[Sample]:
    out = []
    with Path(path).open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(Sample(**json.loads(line)))
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{path}:{n}: not a sample record ({e})") from None
    return out


def vocab_hash_of(samples: list[Sample]) -> str:
    """The one tokenizer hash all samples share (error if they were made by different tokenizers)."""
    hashes = {s.vocab_hash for s in samples}
    if len(hashes) != 1 or "" in hashes:
        raise ValueError(f"samples must all carry the same vocab_hash, found {sorted(hashes)[:3]}")
    return hashes.pop()
