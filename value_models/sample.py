"""`sample`: responses from the frozen base model, the data value models learn from (docs/VAS_RULE.md §2).

The base samples at temperature 1 with no top-k / top-p truncation, so the responses follow the
base policy p0 whose values VAS needs. Each prompt is wrapped in the base's chat template as one
user turn, exactly as the server would see a chat request. Every (prompt, sample index) gets its
own seed, so a prompt's responses do not depend on which other prompts share the batch.

With a value model and weights, the responses come from the VAS-steered policy instead (iterated
values, docs/TRAINING.md): values fitted to them are the steered policy's, not p0's.

Each record keeps, per response token, the base's top-K candidates and their raw log-probs
(`record_top_k`, default 20; 0: none): the data of the steering proxy that `fit` reports on its
held-out split (value_models/proxy.py).

vLLM starts worker processes: scripts that call `sample` need an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from value_models.records import Sample

SEEDS_PER_PROMPT = 1_000  # seed of sample j of prompt i: seed + i * SEEDS_PER_PROMPT + j
DEFAULT_RECORD_TOP_K = 20  # the server's default VAS top-K, and vLLM's default max_logprobs
# Recorded log-probs are rounded: a third of the digits of a float's repr, and p0 stays within a
# relative 5e-5 of the engine's.
LOGPROB_DECIMALS = 4


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    # The template already contains any BOS token it wants.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sample(base_model_dir: Path | str, prompts: list[str], *, samples_per_prompt: int = 1, max_tokens: int = 96,
           seed: int = 0, dtype: str | None = None, max_model_len: int = 1024, first_sample: int = 0,
           value_model: str | None = None, weights: dict[str, float] | None = None, top_k: int | None = None,
           record_top_k: int = DEFAULT_RECORD_TOP_K, **engine_overrides) -> list[Sample]:
    """Samples j = first_sample .. first_sample + samples_per_prompt - 1 of every prompt. A later
    call with a higher `first_sample` extends a data set with new responses to the same prompts
    (each sample's seed depends only on its prompt's index and j). `value_model` and `weights`
    (and optionally `top_k`, else the model's default): sample with VAS at those weights; every
    record's `policy` says so. base_logprob stays the raw base's (vLLM's log-probs are taken
    before logits processors). `dtype` None: the engine's own choice, the one `vas-server serve`
    makes on this machine (float32 on an x86 CPU that emulates bfloat16); it is printed.
    `record_top_k`: each step's top-K raw base candidates kept in the records' `topk` (0: none)."""
    from transformers import AutoTokenizer

    from vas_server.core.format import tokenizer_identity
    from vas_server.params import make_extra_args

    _check_arguments(samples_per_prompt, first_sample, value_model, weights, record_top_k)
    policy = {"value_model": Path(value_model).name, "weights": dict(weights), "top_k": top_k} if value_model else {}
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    vocab_hash = tokenizer_identity(tokenizer).vocab_hash
    prompt_ids = _fitting_prompt_ids(tokenizer, prompts, max_tokens, max_model_len)
    extra = make_extra_args(weights, top_k=top_k) if value_model else None
    llm = _engine(base_model_dir, value_model, dtype, max_model_len, seed, record_top_k, engine_overrides)
    requests, params, owners = _requests(prompt_ids, range(first_sample, first_sample + samples_per_prompt),
                                         seed=seed, max_tokens=max_tokens, record_top_k=record_top_k, extra=extra)
    start = time.perf_counter()
    outputs = llm.generate(requests, params)
    result = [_record(prompts[i], prompt_ids[i], out.outputs[0], vocab_hash, policy, record_top_k)
              for i, out in zip(owners, outputs)]
    _print_speed(result, time.perf_counter() - start, record_top_k)  # sampling and records, not the engine's start
    return result


def _check_arguments(samples_per_prompt: int, first_sample: int, value_model: str | None,
                     weights: dict[str, float] | None, record_top_k: int) -> None:
    """Refuse sample indices outside a prompt's seed range, steering without both a value model and
    weights, and a negative record_top_k."""
    if first_sample < 0 or first_sample + samples_per_prompt > SEEDS_PER_PROMPT:
        raise ValueError(f"sample indices must lie in 0..{SEEDS_PER_PROMPT - 1}")
    if bool(value_model) != bool(weights):
        raise ValueError("steered sampling needs both a value model and weights")
    if record_top_k < 0:
        raise ValueError("record_top_k must be >= 0")


def _fitting_prompt_ids(tokenizer, prompts: list[str], max_tokens: int, max_model_len: int) -> list[list[int]]:
    """Each prompt's chat token ids; refused unless every prompt leaves room for max_tokens."""
    prompt_ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) + max_tokens > max_model_len]
    if too_long:
        raise ValueError(f"{len(too_long)} prompts (first: #{too_long[0]}) do not fit max_model_len={max_model_len} "
                         f"with max_tokens={max_tokens}")
    return prompt_ids


def _engine(base_model_dir: Path | str, value_model: str | None, dtype: str | None, max_model_len: int, seed: int,
            record_top_k: int, engine_overrides: dict):
    """The vLLM engine of the base (with VAS when steering by `value_model`); prints its dtype.
    `engine_overrides`: the caller's extra engine arguments, to which it adds its defaults."""
    from vllm import LLM

    from vas_server.config import VASConfig
    from vas_server.engine_args import engine_dtype, engine_kwargs

    # No chunked prefill: vLLM 0.32 (CPU) fails on a seeded request whose prefill is split
    # ("CPU Generator does not use offset"), and we seed every request.
    engine_overrides.setdefault("enable_chunked_prefill", False)
    engine_overrides.setdefault("max_logprobs", max_logprobs_for(record_top_k))
    vas = VASConfig(value_models={"sample": str(value_model)}) if value_model else None
    if dtype is not None:
        engine_overrides["dtype"] = dtype
    llm = LLM(**engine_kwargs(str(base_model_dir), vas, max_model_len=max_model_len, seed=seed, **engine_overrides))
    print(f"vas-train sample: engine dtype {engine_dtype(llm)}", file=sys.stderr, flush=True)
    return llm


def _requests(prompt_ids: list[list[int]], sample_indices: range, *, seed: int, max_tokens: int, record_top_k: int,
              extra) -> tuple[list, list, list[int]]:
    """(prompts, sampling params, prompt index) of every (prompt i, sample j): seeded
    seed + i * SEEDS_PER_PROMPT + j, at temperature 1 with no truncation (the base policy p0)."""
    from vllm import SamplingParams, TokensPrompt

    requests, params, owners = [], [], []
    for i, ids in enumerate(prompt_ids):
        for j in sample_indices:
            requests.append(TokensPrompt(prompt_token_ids=ids))
            # logprobs=K: the raw base log-probs (before logits processors) of each step's top K and
            # of the sampled token (K = 0: only the latter, which base_logprob sums).
            params.append(SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_tokens,
                                         seed=seed + i * SEEDS_PER_PROMPT + j, logprobs=record_top_k,
                                         extra_args=extra))
            owners.append(i)
    return requests, params, owners


def _print_speed(result: list[Sample], seconds: float, record_top_k: int) -> None:
    tokens = sum(len(s.response_token_ids) for s in result)
    print(f"vas-train sample: {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.0f} tokens/s, top-K recorded: "
          f"{record_top_k or 'none'})", file=sys.stderr, flush=True)


def _record(prompt: str, prompt_ids: list[int], completion, vocab_hash: str, policy: dict,
            record_top_k: int) -> Sample:
    """The record of one vLLM completion of `prompt`."""
    return Sample(prompt=prompt, prompt_token_ids=list(prompt_ids), response=completion.text,
                  response_token_ids=list(completion.token_ids), finish_reason=str(completion.finish_reason),
                  base_logprob=completion.cumulative_logprob, vocab_hash=vocab_hash, policy=policy,
                  topk=_recorded_topk(completion.logprobs, record_top_k))


def topk_candidates(step, k: int) -> tuple[list[int], list[float]]:
    """One step's top-k (ids, raw base log-probs), best first, from vLLM's log-probs of the step
    (which also hold the sampled token, ranked below k when it is no top-k candidate)."""
    best = sorted((lp.rank, t, lp.logprob) for t, lp in step.items() if lp.rank <= k)
    return [t for _, t, _ in best], [lp for _, _, lp in best]


def max_logprobs_for(top_k: int) -> int:
    """vLLM's `max_logprobs` for an engine whose requests ask for the top-K base log-probs of
    every step: vLLM refuses more than max_logprobs (default 20) per step."""
    return max(20, top_k)


def _recorded_topk(logprobs, k: int) -> list[list[list]] | None:
    if not k:
        return None
    steps = (topk_candidates(step, k) for step in logprobs)
    return [[ids, [round(lp, LOGPROB_DECIMALS) for lp in lps]] for ids, lps in steps]
