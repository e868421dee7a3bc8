"""`eval`: how well a value model steers the base, against Best-of-N from the same base.

On held-out prompts (the chitchat `heldout` split by default), with one vLLM engine that serves
the value model:
  * base: `max(bon)` (64) responses per prompt sampled from the plain base at temperature 1, seed
    `seed + i * 1000 + j` for sample j of prompt i (as `sample` does);
  * VAS: one response per prompt for every weight setting -- each head alone at `weights`, and a
    3x3 grid of two heads' weights -- at temperature 1 with the seed of base sample 0 (common
    random numbers: weight 0 *is* base sample 0, since a request with no weight is plain vLLM);
  * Best-of-N (N in `bon`): per prompt, the best of the first N base samples by the head's reward.
Every response is scored with every head's reward (the reward spec each head was trained on).

KL from the base, KL(p_vas || p0), per response:
  vLLM reports the raw base log-probs (before logits processors) of the top-K tokens at each step,
  which are exactly the VAS candidates C. Re-running the value model over the sampled tokens
  (value_models' serving runtime, same dtype as the engine) gives each candidate's bonus
  b(a) = sum_h w_h (q_h(a) - mean_C q_h). VAS samples from p(a) = p0(a) exp(b(a) - Z) with
  Z = log(1 + sum_C p0(a) (exp(b(a)) - 1)) (b = 0 outside C), so per step the KL is exact:
      KL_t = sum_C p0 e^(b-Z) (b - Z) - (1 - sum_C p0) e^(-Z) Z,
  and the sum over the steps of a sampled response is an unbiased estimate of the sequence-level
  KL (reported, with its standard error). The plain Monte-Carlo estimate sum_t log p/p0 (y_t)
  = sum_t (b(y_t) - Z_t) is reported next to it as a check.
  Best-of-N uses the usual analytic value log N - (N - 1) / N.

Cost: generated tokens and wall time of each VAS run (one response per prompt) against those of
Best-of-N (N responses per prompt; wall time of the base run pro-rated by tokens).

Outputs in `out_dir`: eval.json (everything), eval.md (tables and checks of the quality bar) and
PNG plots reward_vs_weight.png, reward_vs_kl.png, grid.png.

vLLM starts worker processes: scripts that call `evaluate` need an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from value_models.sample import SEEDS_PER_PROMPT, chat_prompt_ids

DEFAULT_WEIGHTS = (-2.0, 0.0, 1.0, 2.0, 3.0, 4.0, 8.0)
DEFAULT_GRID_WEIGHTS = (0.0, 2.0, 4.0)
DEFAULT_BON = (4, 16, 64)


@dataclass
class EvalConfig:
    value_model: str  # checkpoint directory
    base: str  # base model HF directory
    prompts: list[str]
    weights: list[float] = field(default_factory=lambda: list(DEFAULT_WEIGHTS))
    grid_heads: list[str] | None = None  # two heads; default: the first two
    grid_weights: list[float] = field(default_factory=lambda: list(DEFAULT_GRID_WEIGHTS))
    bon: list[int] = field(default_factory=lambda: list(DEFAULT_BON))
    # Best-of-N for bon[k] on the first bon_prompts[k] prompts only (None: all). Large N costs
    # N responses per prompt; a smaller subset for the largest N keeps the run affordable.
    bon_prompts: list[int] | None = None
    rewards: dict[str, str] | None = None  # head -> reward spec; default: what each head was trained on
    heads: list[str] | None = None  # heads to evaluate; default: all
    max_tokens: int = 48
    top_k: int = 20
    seed: int = 0
    dtype: str = "bfloat16"
    max_model_len: int = 512
    max_num_seqs: int = 64
    kl_batch_size: int = 128  # rows replayed at once (value-cache slots)
    engine_overrides: dict = field(default_factory=dict)


def head_rewards(value_model_dir: Path | str) -> dict[str, str]:
    """head -> the reward spec it was trained on (from the training record in vas.json), else the
    head's name (a built-in reward of that name)."""
    from value_models.format import load_spec

    spec = load_spec(value_model_dir)
    trained = {h["name"]: h["reward"] for h in (spec.extra.get("training") or {}).get("heads", [])
               if isinstance(h, dict) and "name" in h and "reward" in h}
    return {h.name: trained.get(h.name, h.name) for h in spec.heads}


def _key(weights: dict[str, float]) -> tuple:
    return tuple(sorted((h, float(w)) for h, w in weights.items() if w != 0))


def _label(key: tuple) -> str:
    return ", ".join(f"{h}={w:g}" for h, w in key) or "base (all weights 0)"


@dataclass
class _Gen:
    """The responses of one run: one list entry per request."""

    token_ids: list[list[int]]
    texts: list[str]
    topk: list[list[tuple[list[int], list[float]]]] | None  # per response, per step: (ids, raw logprobs)
    seconds: float

    @property
    def tokens(self) -> int:
        return sum(map(len, self.token_ids))


def _generate(llm, prompt_ids: list[list[int]], *, n: int | list[int], seed: int, max_tokens: int,
              weights: dict[str, float] | None, top_k: int, keep_topk: bool) -> _Gen:
    """`n` responses per prompt (or n[i] for prompt i), in prompt order."""
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
            steps = []
            for step in c.logprobs:
                best = sorted(((lp.rank, t, lp.logprob) for t, lp in step.items() if lp.rank <= top_k))
                steps.append(([t for _, t, _ in best], [lp for _, _, lp in best]))
            topk.append(steps)
    return _Gen(token_ids, texts, topk, seconds)


def replay_steps(runtime, prompt_ids: list[list[int]], token_ids: list[list[int]],
                 topk: list[list[tuple[list[int], list[float]]]], heads: frozenset[int], batch_size: int):
    """Replay sampled responses through the serving value runtime, one decoding step at a time, as
    the engine scored them. Response i follows prompt_ids[i]; topk[i][t] holds step t's candidates
    and their raw base log-probs. Per step of each batch of `batch_size` responses, yields
    (live [B] response indices, candidates [B, k], base log-probs [B, k] float64,
    values of every runtime head [B, n_heads, k] float64 -- only `heads` are computed --,
    the sampled tokens [B])."""
    from vas_server.value_runtime import RowInput

    for start in range(0, len(prompt_ids), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompt_ids))))
        rows = [RowInput(runtime.allocate(), list(prompt_ids[i]), [], heads) for i in idx]
        try:
            for t in range(max(len(token_ids[i]) for i in idx)):
                live = [b for b, i in enumerate(idx) if t < len(token_ids[i])]
                steps = [topk[idx[b]][t] for b in live]
                k = min(len(ids) for ids, _ in steps)
                candidates = torch.tensor([ids[:k] for ids, _ in steps], dtype=torch.long)
                logp0 = torch.tensor([lps[:k] for _, lps in steps], dtype=torch.float64)
                values = runtime.score([rows[b] for b in live], candidates).double()
                chosen = torch.tensor([token_ids[idx[b]][t] for b in live])
                yield torch.tensor([idx[b] for b in live]), candidates, logp0, values, chosen
                for b in live:
                    rows[b].outputs.append(token_ids[idx[b]][t])
        finally:
            for row in rows:
                runtime.release(row.slot)


@torch.no_grad()
def vas_kl(value_model, prompt_ids: list[list[int]], gen: _Gen, weights: dict[str, float], *, top_k: int,
           max_len: int, batch_size: int = 32) -> tuple[list[float], list[float]]:
    """Per response: (exact-per-step KL summed over the steps, Monte-Carlo sum_t log p/p0 (y_t)).
    `value_model` is a loaded ValueModel; the runtime is the one the server steers with."""
    from vas_server import rule
    from vas_server.value_runtime import ValueRuntime

    runtime = ValueRuntime([value_model], batch_size, max_len, "cpu", next(value_model.trunk.parameters()).dtype)
    w = rule.weight_vector(weights, runtime.head_index, dtype=torch.float64)
    used = frozenset(runtime.head_index[n] for n, v in weights.items() if v != 0)
    exact = torch.zeros(len(prompt_ids), dtype=torch.float64)
    mc = torch.zeros(len(prompt_ids), dtype=torch.float64)
    for live, candidates, lp0, values, chosen in replay_steps(runtime, prompt_ids, gen.token_ids, gen.topk, used,
                                                              batch_size):
        bonus = rule.bonus(values, w)  # [B, k]: the processor's own rule
        p0 = lp0.exp()
        z = torch.log1p((p0 * torch.expm1(bonus)).sum(-1))  # [B]
        rest = (1 - p0.sum(-1)).clamp(min=0)
        kl_t = (p0 * torch.exp(bonus - z[:, None]) * (bonus - z[:, None])).sum(-1) - rest * torch.exp(-z) * z
        b_y = (bonus * (candidates == chosen[:, None])).sum(-1)
        exact[live] += kl_t
        mc[live] += b_y - z
    return exact.tolist(), mc.tolist()


def max_logprobs_for(top_k: int) -> int:
    """vLLM's `max_logprobs` for an engine whose runs keep the top-K base log-probs of every step
    (the KL needs every candidate's): vLLM refuses more than max_logprobs (default 20) per step."""
    return max(20, top_k)


class _GenerationCache:
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

    def get(self, key: tuple) -> _Gen | None:
        path = self._path(key)
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        topk = [[(ids, lps) for ids, lps in steps] for steps in raw["topk"]] if raw["topk"] is not None else None
        return _Gen(raw["token_ids"], raw["texts"], topk, raw["seconds"])

    def put(self, key: tuple, gen: _Gen) -> None:
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


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def evaluate(config: EvalConfig, out_dir: Path | str, *, progress: bool = True,
             generations_dir: Path | str | None = None) -> dict:
    """Run the evaluation, write eval.json / eval.md / PNGs to `out_dir`, return the report.
    Each run's responses are kept in `generations_dir` (default `out_dir/generations`); evaluations
    that share it reuse each other's base run (and VAS runs of the same model and top-K)."""
    from transformers import AutoTokenizer
    from vllm import LLM

    from value_models.format import load_spec, tokenizer_identity
    from value_models.model import load_value_model
    from value_models.rewards import load_reward
    from vas_server.config import VASConfig
    from vas_server.engine import engine_kwargs

    def log(msg: str) -> None:
        if progress:
            print(f"[eval {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    out_dir = Path(out_dir)
    generations_dir = out_dir / "generations" if generations_dir is None else Path(generations_dir)
    t_start = time.perf_counter()
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
    n_base = max(config.bon)
    n_prompts = len(config.prompts)
    bon_prompts = [min(m, n_prompts) for m in (config.bon_prompts or [n_prompts] * len(config.bon))]
    if len(bon_prompts) != len(config.bon):
        raise ValueError("bon_prompts needs one prompt count per Best-of-N size")
    # Prompt i gets as many base samples as the largest N whose subset contains it (at least 1).
    base_counts = [max([1] + [n for n, m in zip(config.bon, bon_prompts) if i < m]) for i in range(n_prompts)]
    offsets = [sum(base_counts[:i]) for i in range(n_prompts)]

    tokenizer = AutoTokenizer.from_pretrained(config.base)
    prompt_ids = [chat_prompt_ids(tokenizer, p) for p in config.prompts]
    too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) + config.max_tokens > config.max_model_len]
    if too_long:
        raise ValueError(f"{len(too_long)} prompts do not fit max_model_len={config.max_model_len}")

    # Settings to run: weight 0 is base sample 0 (same seed, and an unweighted request is plain vLLM).
    settings: dict[tuple, dict[str, float]] = {}
    for h in heads:
        for w in config.weights:
            settings.setdefault(_key({h: w}), {h: w})
    if grid_heads:
        for wa in config.grid_weights:
            for wb in config.grid_weights:
                settings.setdefault(_key({grid_heads[0]: wa, grid_heads[1]: wb}), {grid_heads[0]: wa, grid_heads[1]: wb})

    overrides = dict(dtype=config.dtype, max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
                     seed=config.seed, disable_log_stats=True, max_logprobs=max_logprobs_for(config.top_k))
    overrides.setdefault("enable_chunked_prefill", False)  # vLLM 0.32 CPU: seeded requests (see sample.py)
    overrides.update(config.engine_overrides)
    vas = VASConfig(value_models={"eval": str(config.value_model)}, dtype="auto")
    cache = _GenerationCache(generations_dir, config, base_counts)
    llm = LLM(**engine_kwargs(config.base, vas, **overrides)) if not cache.complete(list(settings)) else None
    log(f"engine ready ({time.perf_counter() - t_start:.0f} s); {len(prompt_ids)} prompts, "
        f"{len(settings)} settings, base x{n_base}")

    base = cache.get(())
    if base is None:
        base = _generate(llm, prompt_ids, n=base_counts, seed=config.seed, max_tokens=config.max_tokens, weights=None,
                         top_k=config.top_k, keep_topk=False)
        cache.put((), base)
    log(f"base: {len(base.token_ids)} responses, {base.tokens} tokens in {base.seconds:.0f} s "
        f"({base.tokens / base.seconds:.0f} tok/s)")
    runs: dict[tuple, _Gen] = {}
    for key, weights in settings.items():
        if not key:
            continue
        runs[key] = cache.get(key)
        if runs[key] is None:
            runs[key] = _generate(llm, prompt_ids, n=1, seed=config.seed, max_tokens=config.max_tokens,
                                  weights=weights, top_k=config.top_k, keep_topk=True)
            cache.put(key, runs[key])
        log(f"VAS {_label(key)}: {runs[key].tokens} tokens in {runs[key].seconds:.1f} s")
    del llm
    import gc

    gc.collect()

    # Rewards of every response under every head's reward.
    specs = sorted(set(rewards.values()))
    scorers = {s: load_reward(s) for s in specs}
    prompts_rep = [p for p, c in zip(config.prompts, base_counts) for _ in range(c)]
    base_scores = {s: scorers[s].score(prompts_rep, base.texts) for s in specs}
    run_scores = {key: {s: scorers[s].score(config.prompts, g.texts) for s in specs} for key, g in runs.items()}
    # Weight 0: base sample 0 of every prompt.
    zero = _Gen([base.token_ids[o] for o in offsets], [base.texts[o] for o in offsets], None,
                base.seconds * sum(len(base.token_ids[o]) for o in offsets) / base.tokens)
    zero_scores = {s: [base_scores[s][o] for o in offsets] for s in specs}

    # KL of every VAS run (offline, the serving runtime in the engine's dtype).
    dtype = getattr(torch, config.dtype) if config.dtype != "auto" else torch.bfloat16
    vm = load_value_model(config.value_model, config.base, base_tokenizer=tokenizer_identity(tokenizer), dtype=dtype)
    kls: dict[tuple, tuple[list[float], list[float]]] = {}
    t_kl = time.perf_counter()
    for key, g in runs.items():
        kls[key] = vas_kl(vm, prompt_ids, g, dict(key), top_k=config.top_k, max_len=config.max_model_len,
                          batch_size=config.kl_batch_size)
    log(f"KL of {len(runs)} runs in {time.perf_counter() - t_kl:.0f} s")

    subsets = sorted(set(m for m in bon_prompts if m < n_prompts))

    def summary(key: tuple) -> dict:
        g = runs.get(key, zero)
        scores = run_scores.get(key, zero_scores)
        exact, mc = kls.get(key, ([0.0] * n_prompts, [0.0] * n_prompts))
        row = {"weights": dict(key), "label": _label(key), "tokens": g.tokens, "seconds": g.seconds,
               "mean_length": g.tokens / n_prompts,
               "kl": _mean_se(exact), "kl_mc": _mean_se(mc),
               "reward": {h: _mean_se(scores[rewards[h]]) for h in heads},
               # The same on the first m prompts, to compare with a Best-of-N run on that subset.
               "subset": {str(m): {"kl": _mean_se(exact[:m]),
                                   "reward": {h: _mean_se(scores[rewards[h]][:m]) for h in heads}}
                          for m in subsets}}
        if not key:
            row["note"] = "base sample 0 (seconds: the base run's time pro-rated by tokens)"
        return row

    bon = {}
    for n, m in zip(config.bon, bon_prompts):
        toks = sum(len(base.token_ids[offsets[i] + j]) for i in range(m) for j in range(n))
        row = {"n": n, "prompts": m, "kl": math.log(n) - (n - 1) / n, "tokens": toks,
               "tokens_per_prompt": toks / m, "seconds": base.seconds * toks / base.tokens, "reward": {}}
        for h in heads:
            s = base_scores[rewards[h]]
            row["reward"][h] = _mean_se([max(s[offsets[i]:offsets[i] + n]) for i in range(m)])
        bon[n] = row

    report = {
        "config": {k: v for k, v in asdict(config).items() if k != "prompts"},
        "num_prompts": n_prompts,
        "heads": heads,
        "rewards": rewards,
        "grid_heads": grid_heads,
        "per_head": {h: [summary(_key({h: w})) for w in config.weights] for h in heads},
        "grid": ([[summary(_key({grid_heads[0]: wa, grid_heads[1]: wb})) for wb in config.grid_weights]
                  for wa in config.grid_weights] if grid_heads else []),
        "bon": {str(n): r for n, r in bon.items()},
        "base": {"responses": len(base.token_ids), "tokens": base.tokens, "seconds": base.seconds},
        "seconds_total": None,
    }
    report["checks"] = quality_checks(report, config)
    report["examples"] = _examples(config.prompts, zero.texts, runs, heads, config.weights)
    report["seconds_total"] = time.perf_counter() - t_start
    write_report(report, out_dir)
    log(f"wrote {out_dir} ({report['seconds_total']:.0f} s in all)")
    return report


def _examples(prompts, base_texts, runs, heads, weights, count: int = 3) -> list[dict]:
    top = max(weights)
    out = []
    for i in range(min(count, len(prompts))):
        ex = {"prompt": prompts[i], "base": base_texts[i]}
        for h in heads:
            g = runs.get(_key({h: top}))
            if g is not None:
                ex[f"{h}={top:g}"] = g.texts[i]
        out.append(ex)
    return out


def quality_checks(report: dict, config: EvalConfig) -> dict:
    """The quality bar of issue 5, per head. Comparisons with a Best-of-N computed on a subset
    of the prompts use VAS's numbers on that same subset."""
    out = {}
    weights = list(config.weights)
    bon = report["bon"]
    total = report["num_prompts"]
    for h in report["heads"]:
        rows = report["per_head"][h]
        by_w = {w: r for w, r in zip(weights, rows)}
        positive = sorted(w for w in weights if w >= 0)
        means = [by_w[w]["reward"][h][0] for w in positive]
        monotonic = all(b > a for a, b in zip(means, means[1:]))
        negatives = [w for w in weights if w < 0]
        lowers = {f"{w:g}": by_w[w]["reward"][h][0] < by_w[0.0]["reward"][h][0] for w in negatives} if 0.0 in by_w else {}
        check = {"weights": positive, "means": means, "monotonic": monotonic, "negative_lowers": lowers}
        if "16" in bon:
            budget = bon["16"]["kl"]
            check["kl_budget_bon16"] = budget
            for n, b in bon.items():
                m = b["prompts"]

                def stats(r):
                    return (r["kl"][0], r["reward"][h][0]) if m == total else (
                        r["subset"][str(m)]["kl"][0], r["subset"][str(m)]["reward"][h][0])

                within = [r for r in rows if stats(r)[0] <= budget]
                best = max(within, key=lambda r: stats(r)[1]) if within else None
                check[f"vs_bon{n}"] = {
                    "prompts": m, "bon_reward": b["reward"][h][0],
                    "vas_weights": best["weights"] if best else None,
                    "vas_reward": stats(best)[1] if best else None, "vas_kl": stats(best)[0] if best else None}
                check[f"beats_bon{n}"] = bool(best and stats(best)[1] >= b["reward"][h][0])
        best_any = max(rows, key=lambda r: r["reward"][h][0])
        check["best_vas_any_kl"] = {"weights": best_any["weights"], "reward": best_any["reward"][h][0],
                                    "kl": best_any["kl"][0]}
        out[h] = check
    return out


# ---------------------------------------------------------------------------------------------
# Report files


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "eval.md").write_text(markdown(report))
    plot(report, out_dir)


def _fmt(ms: tuple | list, digits: int = 3) -> str:
    m, se = ms
    return f"{m:.{digits}f} ± {se:.{digits}f}" if not math.isnan(se) else f"{m:.{digits}f}"


def markdown(report: dict) -> str:
    c = report["config"]
    heads = report["heads"]
    lines = [f"# VAS evaluation: {Path(c['value_model']).name}", "",
             f"{report['num_prompts']} held-out prompts, max_tokens {c['max_tokens']}, temperature 1, "
             f"VAS top_k {c['top_k']}, seed {c['seed']}, dtype {c['dtype']}. Rewards: "
             + ", ".join(f"`{h}` = `{report['rewards'][h]}`" for h in heads)
             + ". Values are mean ± standard error over prompts. KL: nats per response "
               "(VAS: exact per-step KL summed along the sampled responses; BoN: log N - (N-1)/N).", ""]
    bon = report["bon"]
    for h in heads:
        lines += [f"## Head `{h}`", "",
                  "| setting | KL | " + " | ".join(f"reward `{x}`" for x in heads) + " | tokens | seconds |",
                  "|---|---|" + "---|" * len(heads) + "---|---|"]
        for r in report["per_head"][h]:
            lines.append(f"| VAS {h}={r['weights'].get(h, 0.0):g} | {_fmt(r['kl'], 2)} | "
                         + " | ".join(_fmt(r["reward"][x]) for x in heads)
                         + f" | {r['tokens']} | {r['seconds']:.1f} |")
        for n, r in bon.items():
            lines.append(f"| BoN-{n} by `{h}` ({r['prompts']} prompts) | {r['kl']:.2f} | "
                         + " | ".join(_fmt(r["reward"][x]) if x == h else "" for x in heads)
                         + f" | {r['tokens']} | {r['seconds']:.1f} |")
        ch = report["checks"][h]
        lines += ["", f"- monotonic over weights {', '.join(f'{w:g}' for w in ch['weights'])}: "
                      f"**{'yes' if ch['monotonic'] else 'no'}** ({', '.join(f'{m:.3f}' for m in ch['means'])})"]
        for w, ok in ch["negative_lowers"].items():
            lines.append(f"- weight {w} lowers the reward below weight 0: **{'yes' if ok else 'no'}**")
        if "kl_budget_bon16" in ch:
            lines.append(f"- VAS at KL <= KL(BoN-16) = {ch['kl_budget_bon16']:.2f} against Best-of-N:")
            for n in bon:
                v = ch[f"vs_bon{n}"]
                where = (f"best VAS {_label(tuple(v['vas_weights'].items()))}: {v['vas_reward']:.3f} "
                         f"(KL {v['vas_kl']:.2f})" if v["vas_weights"] is not None else "no VAS setting within the budget")
                lines.append(f"  - BoN-{n} ({v['prompts']} prompts): {v['bon_reward']:.3f}; {where}; "
                             f"reaches it: **{'yes' if ch[f'beats_bon{n}'] else 'no'}**")
        lines.append("")
    if report["grid"]:
        a, b = report["grid_heads"]
        ws = report["config"]["grid_weights"]
        lines += [f"## Two heads: `{a}` x `{b}`", "",
                  f"Mean rewards `{a}` / `{b}`; rows: weight of `{a}`, columns: weight of `{b}`.", "",
                  "| " + f"{a} \\ {b} | " + " | ".join(f"{w:g}" for w in ws) + " |",
                  "|---|" + "---|" * len(ws)]
        for wa, row in zip(ws, report["grid"]):
            lines.append(f"| {wa:g} | " + " | ".join(
                f"{r['reward'][a][0]:.3f} / {r['reward'][b][0]:.3f} (KL {r['kl'][0]:.1f})" for r in row) + " |")
        lines.append("")
    n_prompts = report["num_prompts"]
    lines += ["## Cost", "", "Per prompt: generated tokens and wall seconds (Best-of-N: pro-rated from the base run "
              "by tokens).", "", "| run | responses per prompt | prompts | tokens / prompt | seconds / prompt |",
              "|---|---|---|---|---|"]
    vas_rows = [r for h in heads for r in report["per_head"][h] if r["weights"]]
    for r in vas_rows:
        lines.append(f"| VAS {r['label']} | 1 | {n_prompts} | {r['tokens'] / n_prompts:.1f} | "
                     f"{r['seconds'] / n_prompts:.3f} |")
    for n, r in bon.items():
        lines.append(f"| BoN-{n} | {n} | {r['prompts']} | {r['tokens'] / r['prompts']:.1f} | "
                     f"{r['seconds'] / r['prompts']:.3f} |")
    if vas_rows:
        vt = sum(r["tokens"] for r in vas_rows) / len(vas_rows) / n_prompts
        vs = sum(r["seconds"] for r in vas_rows) / len(vas_rows) / n_prompts
        lines += ["", f"Average VAS run: {vt:.1f} tokens and {vs:.3f} s per prompt. Ratio VAS / BoN-N per prompt "
                  "(tokens, wall time): "
                  + "; ".join(f"N={n}: {vt / (r['tokens'] / r['prompts']):.3f}, {vs / (r['seconds'] / r['prompts']):.3f}"
                              for n, r in bon.items())]
    lines += ["", "## Examples", ""]
    for ex in report.get("examples", []):
        lines.append(f"- prompt: {ex['prompt']!r}")
        for k, v in ex.items():
            if k != "prompt":
                lines.append(f"  - {k}: {v!r}")
    lines += ["", f"Total wall time {report['seconds_total']:.0f} s.", ""]
    return "\n".join(lines)


def plot(report: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = report["heads"]
    ws = report["config"]["weights"]
    fig, axes = plt.subplots(1, len(heads), figsize=(4.2 * len(heads), 3.6), squeeze=False)
    for ax, h in zip(axes[0], heads):
        rows = report["per_head"][h]
        for x in heads:
            m = [r["reward"][x][0] for r in rows]
            se = [r["reward"][x][1] for r in rows]
            ax.errorbar(ws, m, yerr=se, marker="o", capsize=3, label=f"reward {x}", alpha=1.0 if x == h else 0.4)
        ax.set_title(f"steering {h}")
        ax.set_xlabel(f"weight of {h}")
        ax.set_ylabel("mean reward")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "reward_vs_weight.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(heads), figsize=(4.2 * len(heads), 3.6), squeeze=False)
    for ax, h in zip(axes[0], heads):
        rows = sorted(report["per_head"][h], key=lambda r: r["weights"].get(h, 0.0))
        rows = [r for r in rows if r["weights"].get(h, 0.0) >= 0]
        ax.plot([r["kl"][0] for r in rows], [r["reward"][h][0] for r in rows], "o-", label="VAS")
        for r in rows:
            ax.annotate(f"w={r['weights'].get(h, 0.0):g}", (r["kl"][0], r["reward"][h][0]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        bon = report["bon"]
        base0 = rows[0]["reward"][h][0] if rows else None
        xs = [0.0] + [r["kl"] for r in bon.values()]
        ys = [base0] + [r["reward"][h][0] for r in bon.values()]
        ax.plot(xs, ys, "s--", label="Best-of-N")
        for n, r in bon.items():
            ax.annotate(f"N={n}", (r["kl"], r["reward"][h][0]), fontsize=7, xytext=(3, -9), textcoords="offset points")
        ax.set_title(h)
        ax.set_xlabel("KL from base (nats)")
        ax.set_ylabel(f"mean reward {h}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "reward_vs_kl.png", dpi=110)
    plt.close(fig)

    if report["grid"]:
        a, b = report["grid_heads"]
        gw = report["config"]["grid_weights"]
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6))
        for ax, h in zip(axes, (a, b)):
            m = [[r["reward"][h][0] for r in row] for row in report["grid"]]
            im = ax.imshow(m, origin="lower", cmap="viridis")
            ax.set_xticks(range(len(gw)), [f"{w:g}" for w in gw])
            ax.set_yticks(range(len(gw)), [f"{w:g}" for w in gw])
            ax.set_xlabel(f"weight of {b}")
            ax.set_ylabel(f"weight of {a}")
            ax.set_title(f"mean reward {h}")
            for i, row in enumerate(m):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out_dir / "grid.png", dpi=110)
        plt.close(fig)
