"""Generation runs: the responses of one weight setting from a vLLM engine, and their cache on disk."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from value_models.evaluate.config import EvalConfig
from value_models.sample import SEEDS_PER_PROMPT, topk_candidates


@dataclass
class Generation:
    """The responses of one run: one list entry per request."""

    token_ids: list[list[int]]
    texts: list[str]
    topk: list[list[tuple[list[int], list[float]]]] | None  # per response, per step: (ids, raw logprobs)
    seconds: float

    @property
    def tokens(self) -> int:
        return sum(map(len, self.token_ids))


def generate(llm, prompt_ids: list[list[int]], *, n: int | list[int], seed: int, max_tokens: int,
             weights: dict[str, float] | None, top_k: int, keep_topk: bool) -> Generation:
    """`n` responses per prompt (or n[i] for prompt i), in prompt order, at temperature 1; sample j
    of prompt i has seed `seed + i * SEEDS_PER_PROMPT + j` (as `sample` does). With `keep_topk`,
    each step's top-K raw base log-probs are kept (the engine needs max_logprobs_for(top_k))."""
    from vllm import SamplingParams, TokensPrompt

    from vas_server.params import make_extra_args

    counts = n if isinstance(n, list) else [n] * len(prompt_ids)
    requests, params = [], []
    for i, ids in enumerate(prompt_ids):
        for j in range(counts[i]):
            extra = make_extra_args(weights, top_k=top_k) if weights else None
            requests.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_tokens,
                                         seed=seed + i * SEEDS_PER_PROMPT + j,
                                         logprobs=top_k if keep_topk else None, extra_args=extra))
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    token_ids, texts, topk = [], [], [] if keep_topk else None
    for out in outputs:
        c = out.outputs[0]
        token_ids.append(list(c.token_ids))
        texts.append(c.text)
        if keep_topk:
            topk.append([topk_candidates(step, top_k) for step in c.logprobs])
    return Generation(token_ids, texts, topk, seconds)


class GenerationCache:
    """Each run's responses, saved as soon as it is generated (generations/<hash>.json), so an
    interrupted evaluation started again with the same settings generates only what is missing.

    The base run (key ()) depends only on the base and the sampling settings, so evaluations of
    different value models (or VAS top-K) share it; VAS runs are keyed by the value model's content
    and the top-K as well, so a retrained model at the same path never reuses stale responses."""

    def __init__(self, directory: Path, config: EvalConfig, base_counts: list[int]):
        self.directory = directory
        settings = {k: v for k, v in asdict(config).items()
                    if k in ("base", "prompts", "max_tokens", "seed", "dtype")}  # not top_k: unused by the base
        settings["base_counts"] = base_counts
        self.base_fingerprint = _digest(json.dumps(settings, sort_keys=True).encode())
        self.vas_fingerprint = _digest(json.dumps([self.base_fingerprint, _model_digest(config.value_model),
                                                   config.top_k]).encode())

    def _path(self, key: tuple) -> Path:
        fingerprint = self.vas_fingerprint if key else self.base_fingerprint
        return self.directory / f"{_digest(json.dumps([fingerprint, list(key)]).encode())}.json"

    def complete(self, keys: list[tuple]) -> bool:
        return all(self._path(k).is_file() for k in [(), *keys])

    def get(self, key: tuple) -> Generation | None:
        path = self._path(key)
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        topk = [[(ids, lps) for ids, lps in steps] for steps in raw["topk"]] if raw["topk"] is not None else None
        return Generation(raw["token_ids"], raw["texts"], topk, raw["seconds"])

    def put(self, key: tuple, gen: Generation) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": list(key), "token_ids": gen.token_ids, "texts": gen.texts,
                                   "topk": gen.topk, "seconds": gen.seconds}))
        tmp.replace(path)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _model_digest(value_model_dir: str) -> str:
    """Content hash of what a value model serves with (spec, heads, adapter), not of its path."""
    h = hashlib.sha256()
    root = Path(value_model_dir)
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith("train_state") and path.name != "training_curve.json":
            h.update(rel.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()
