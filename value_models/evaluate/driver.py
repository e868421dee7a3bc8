"""`evaluate`: plan the runs, generate them (or read them from the cache), score their rewards,
compute their KL, and write the report (the package docstring says what is measured)."""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from value_models.evaluate.config import EvalConfig, setting_key, setting_label
from value_models.evaluate.generation import Generation, GenerationCache, generate
from value_models.evaluate.kl import vas_kl
from value_models.evaluate.report import bon_summary, examples, quality_checks, run_summary, write_report
from value_models.sample import chat_prompt_ids, max_logprobs_for


def head_rewards(value_model_dir: Path | str) -> dict[str, str]:
    """head -> the reward spec it was trained on (from the training record in vas.json), else the
    head's name (a built-in reward of that name)."""
    from vas_server.core.format import load_spec

    spec = load_spec(value_model_dir)
    trained = {h["name"]: h["reward"] for h in (spec.extra.get("training") or {}).get("heads", [])
               if isinstance(h, dict) and "name" in h and "reward" in h}
    return {h.name: trained.get(h.name, h.name) for h in spec.heads}


@dataclass
class _Plan:
    """What an evaluation runs, worked out from its config and the value model's heads."""

    heads: list[str]  # heads evaluated
    rewards: dict[str, str]  # head -> reward spec
    grid_heads: list[str]  # the two heads of the grid, or none
    bon_prompts: list[int]  # Best-of-bon[k] on the first bon_prompts[k] prompts
    base_counts: list[int]  # base samples of each prompt
    offsets: list[int]  # index of each prompt's first base sample
    settings: dict[tuple, dict[str, float]]  # setting key -> weights; key () is the base


def _plan(config: EvalConfig) -> _Plan:
    from vas_server.core.format import load_spec

    spec = load_spec(config.value_model)
    all_heads = [h.name for h in spec.heads]
    heads = config.heads or all_heads
    unknown = [h for h in heads if h not in all_heads]
    if unknown:
        raise ValueError(f"unknown heads {unknown}; the value model has {all_heads}")
    rewards = {**head_rewards(config.value_model), **(config.rewards or {})}
    rewards = {h: rewards[h] for h in heads}
    grid_heads = config.grid_heads or heads[:2]
    if len(grid_heads) != 2 or any(h not in all_heads for h in grid_heads):
        grid_heads = [] if len(heads) < 2 else grid_heads
    if grid_heads and len(grid_heads) != 2:
        raise ValueError(f"grid_heads must name two heads of {all_heads}")
    n_prompts = len(config.prompts)
    bon_prompts = [min(m, n_prompts) for m in (config.bon_prompts or [n_prompts] * len(config.bon))]
    if len(bon_prompts) != len(config.bon):
        raise ValueError("bon_prompts needs one prompt count per Best-of-N size")
    # Prompt i gets as many base samples as the largest N whose subset contains it (at least 1).
    base_counts = [max([1] + [n for n, m in zip(config.bon, bon_prompts) if i < m]) for i in range(n_prompts)]
    offsets = [sum(base_counts[:i]) for i in range(n_prompts)]
    # Settings to run: weight 0 is base sample 0 (same seed, and an unweighted request is plain vLLM).
    settings: dict[tuple, dict[str, float]] = {}
    for h in heads:
        for w in config.weights:
            settings.setdefault(setting_key({h: w}), {h: w})
    if grid_heads:
        for wa in config.grid_weights:
            for wb in config.grid_weights:
                weights = {grid_heads[0]: wa, grid_heads[1]: wb}
                settings.setdefault(setting_key(weights), weights)
    return _Plan(heads, rewards, grid_heads, bon_prompts, base_counts, offsets, settings)


def _prompt_ids(config: EvalConfig, tokenizer) -> list[list[int]]:
    """Each prompt as the base's chat template wraps it; all must fit max_model_len with max_tokens."""
    prompt_ids = [chat_prompt_ids(tokenizer, p) for p in config.prompts]
    too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) + config.max_tokens > config.max_model_len]
    if too_long:
        raise ValueError(f"{len(too_long)} prompts do not fit max_model_len={config.max_model_len}")
    return prompt_ids


def _generate_runs(config: EvalConfig, plan: _Plan, prompt_ids: list[list[int]], cache: GenerationCache,
                   log: Callable[[str], None], t_start: float) -> tuple[Generation, dict[tuple, Generation]]:
    """The base run (plan.base_counts samples per prompt) and every VAS run (one response per
    prompt), each read from `cache` or generated and saved there. An engine starts only if a run
    is missing."""
    from vllm import LLM

    from vas_server.config import VASConfig
    from vas_server.engine_args import engine_dtype, engine_kwargs

    overrides = dict(max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
                     seed=config.seed, disable_log_stats=True, max_logprobs=max_logprobs_for(config.top_k))
    if config.dtype is not None:  # else the engine's own choice, as `vas-server serve` makes it
        overrides["dtype"] = config.dtype
    overrides.setdefault("enable_chunked_prefill", False)  # vLLM 0.32 CPU: seeded requests (see sample.py)
    overrides.update(config.engine_overrides)
    vas = VASConfig(value_models={"eval": str(config.value_model)}, dtype="auto")
    llm = LLM(**engine_kwargs(config.base, vas, **overrides)) if not cache.complete(list(plan.settings)) else None
    log(f"engine ready ({time.perf_counter() - t_start:.0f} s, dtype {engine_dtype(llm) if llm else 'unused'}); "
        f"{len(prompt_ids)} prompts, "
        f"{len(plan.settings)} settings, base x{max(config.bon)}")

    base = cache.get(())
    if base is None:
        base = generate(llm, prompt_ids, n=plan.base_counts, seed=config.seed, max_tokens=config.max_tokens,
                        weights=None, top_k=config.top_k, keep_topk=False)
        cache.put((), base)
    log(f"base: {len(base.token_ids)} responses, {base.tokens} tokens in {base.seconds:.0f} s "
        f"({base.tokens / base.seconds:.0f} tok/s)")
    runs: dict[tuple, Generation] = {}
    for key, weights in plan.settings.items():
        if not key:
            continue
        runs[key] = cache.get(key)
        if runs[key] is None:
            runs[key] = generate(llm, prompt_ids, n=1, seed=config.seed, max_tokens=config.max_tokens,
                                 weights=weights, top_k=config.top_k, keep_topk=True)
            cache.put(key, runs[key])
        log(f"VAS {setting_label(key)}: {runs[key].tokens} tokens in {runs[key].seconds:.1f} s")
    del llm
    gc.collect()
    return base, runs


def _score(config: EvalConfig, plan: _Plan, base: Generation, runs: dict[tuple, Generation]
           ) -> tuple[dict[str, list[float]], dict[tuple, dict[str, list[float]]]]:
    """Every response scored with every head's reward: (reward spec -> score of every base response,
    setting key -> reward spec -> score of each of its responses)."""
    from value_models.rewards import load_reward

    specs = sorted(set(plan.rewards.values()))
    scorers = {s: load_reward(s) for s in specs}
    prompts_rep = [p for p, c in zip(config.prompts, plan.base_counts) for _ in range(c)]
    base_scores = {s: scorers[s].score(prompts_rep, base.texts) for s in specs}
    run_scores = {key: {s: scorers[s].score(config.prompts, g.texts) for s in specs} for key, g in runs.items()}
    return base_scores, run_scores


def _weight_zero(base: Generation, offsets: list[int]) -> Generation:
    """Weight 0: base sample 0 of every prompt (its time: the base run's, pro-rated by tokens)."""
    return Generation([base.token_ids[o] for o in offsets], [base.texts[o] for o in offsets], None,
                      base.seconds * sum(len(base.token_ids[o]) for o in offsets) / base.tokens)


def _kls(config: EvalConfig, tokenizer, prompt_ids: list[list[int]], runs: dict[tuple, Generation],
         log: Callable[[str], None]) -> dict[tuple, tuple[list[float], list[float]]]:
    """The KL of every VAS run (offline, the serving runtime in the engine's dtype)."""
    from vas_server.core.format import tokenizer_identity
    from vas_server.core.model import load_value_model

    from transformers import AutoConfig

    from vas_server.engine_args import default_dtype

    # The engine's dtype: the one given, else float32 where the CPU emulates bfloat16, else the checkpoint's.
    chosen = default_dtype(config.dtype)
    dtype = getattr(torch, chosen) if chosen else AutoConfig.from_pretrained(config.base).dtype or torch.float32
    vm = load_value_model(config.value_model, config.base, base_tokenizer=tokenizer_identity(tokenizer), dtype=dtype)
    kls: dict[tuple, tuple[list[float], list[float]]] = {}
    t_kl = time.perf_counter()
    for key, g in runs.items():
        kls[key] = vas_kl(vm, prompt_ids, g, dict(key), top_k=config.top_k, max_len=config.max_model_len,
                          batch_size=config.kl_batch_size)
    log(f"KL of {len(runs)} runs in {time.perf_counter() - t_kl:.0f} s")
    return kls


def _report(config: EvalConfig, plan: _Plan, base: Generation, runs: dict[tuple, Generation],
            base_scores: dict[str, list[float]], run_scores: dict[tuple, dict[str, list[float]]],
            kls: dict[tuple, tuple[list[float], list[float]]]) -> dict:
    """Every setting (weight 0 included) and every Best-of-N summarised, with the quality checks."""
    zero = _weight_zero(base, plan.offsets)
    zero_scores = {s: [scores[o] for o in plan.offsets] for s, scores in base_scores.items()}

    n_prompts = len(config.prompts)
    no_kl = ([0.0] * n_prompts, [0.0] * n_prompts)
    subsets = sorted(set(m for m in plan.bon_prompts if m < n_prompts))

    def summary(key: tuple) -> dict:
        return run_summary(key, runs.get(key, zero), run_scores.get(key, zero_scores), kls.get(key, no_kl),
                           plan.rewards, subsets)

    head_scores = {h: base_scores[plan.rewards[h]] for h in plan.heads}
    bon = {n: bon_summary(n, m, base, plan.offsets, head_scores) for n, m in zip(config.bon, plan.bon_prompts)}
    a_b = plan.grid_heads
    report = {
        "config": {k: v for k, v in asdict(config).items() if k != "prompts"},
        "num_prompts": n_prompts,
        "heads": plan.heads,
        "rewards": plan.rewards,
        "grid_heads": plan.grid_heads,
        "per_head": {h: [summary(setting_key({h: w})) for w in config.weights] for h in plan.heads},
        "grid": ([[summary(setting_key({a_b[0]: wa, a_b[1]: wb})) for wb in config.grid_weights]
                  for wa in config.grid_weights] if a_b else []),
        "bon": {str(n): r for n, r in bon.items()},
        "base": {"responses": len(base.token_ids), "tokens": base.tokens, "seconds": base.seconds},
        "seconds_total": None,
    }
    report["checks"] = quality_checks(report, config)
    report["examples"] = examples(config.prompts, zero.texts, runs, plan.heads, config.weights)
    return report


def evaluate(config: EvalConfig, out_dir: Path | str, *, progress: bool = True,
             generations_dir: Path | str | None = None) -> dict:
    """Run the evaluation, write eval.json / eval.md / PNGs to `out_dir`, return the report.
    Each run's responses are kept in `generations_dir` (default `out_dir/generations`); evaluations
    that share it reuse each other's base run (and VAS runs of the same model and top-K)."""
    from transformers import AutoTokenizer

    def log(msg: str) -> None:
        if progress:
            print(f"[eval {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    out_dir = Path(out_dir)
    generations_dir = out_dir / "generations" if generations_dir is None else Path(generations_dir)
    t_start = time.perf_counter()
    if config.top_k is None:  # what a request without vas_top_k gets from the server
        from vas_server.core.format import DEFAULT_TOP_K, load_spec

        config = replace(config, top_k=load_spec(config.value_model).default_top_k or DEFAULT_TOP_K)
    plan = _plan(config)
    tokenizer = AutoTokenizer.from_pretrained(config.base)
    prompt_ids = _prompt_ids(config, tokenizer)
    cache = GenerationCache(generations_dir, config, plan.base_counts)
    base, runs = _generate_runs(config, plan, prompt_ids, cache, log, t_start)
    base_scores, run_scores = _score(config, plan, base, runs)
    kls = _kls(config, tokenizer, prompt_ids, runs, log)
    report = _report(config, plan, base, runs, base_scores, run_scores, kls)
    report["seconds_total"] = time.perf_counter() - t_start
    write_report(report, out_dir)
    log(f"wrote {out_dir} ({report['seconds_total']:.0f} s in all)")
    return report
