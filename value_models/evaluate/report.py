"""The evaluation's report: summary statistics, examples, the quality bar, eval.json and eval.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

from value_models.evaluate.config import EvalConfig, setting_key, setting_label
from value_models.evaluate.generation import Generation
from value_models.evaluate.plots import plot


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (nan where undefined)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def run_summary(key: tuple, gen: Generation, scores: dict[str, list[float]], kl: tuple[list[float], list[float]],
                rewards: dict[str, str], subsets: list[int]) -> dict:
    """The report's row of one weight setting: one response per prompt in `gen`, `scores` (reward
    spec -> score of each response), `kl` (exact, Monte-Carlo) per response, `rewards` (head ->
    reward spec), and the same numbers on the first m prompts for each m in `subsets`."""
    n_prompts = len(gen.token_ids)
    exact, mc = kl
    row = {"weights": dict(key), "label": setting_label(key), "tokens": gen.tokens, "seconds": gen.seconds,
           "mean_length": gen.tokens / n_prompts,
           "kl": mean_se(exact), "kl_mc": mean_se(mc),
           "reward": {h: mean_se(scores[rewards[h]]) for h in rewards},
           # The same on the first m prompts, to compare with a Best-of-N run on that subset.
           "subset": {str(m): {"kl": mean_se(exact[:m]),
                               "reward": {h: mean_se(scores[rewards[h]][:m]) for h in rewards}}
                      for m in subsets}}
    if not key:
        row["note"] = "base sample 0 (seconds: the base run's time pro-rated by tokens)"
    return row


def bon_summary(n: int, prompts: int, base: Generation, offsets: list[int], scores: dict[str, list[float]]) -> dict:
    """The report's row of Best-of-n on the first `prompts` prompts: per head, the best of each
    prompt's first n base samples (prompt i's start at offsets[i]) by `scores[head]`, the head's
    reward of every base sample; its cost is the base run's pro-rated by tokens."""
    toks = sum(len(base.token_ids[offsets[i] + j]) for i in range(prompts) for j in range(n))
    row = {"n": n, "prompts": prompts, "kl": math.log(n) - (n - 1) / n, "tokens": toks,
           "tokens_per_prompt": toks / prompts, "seconds": base.seconds * toks / base.tokens, "reward": {}}
    for h, s in scores.items():
        row["reward"][h] = mean_se([max(s[offsets[i]:offsets[i] + n]) for i in range(prompts)])
    return row


def examples(prompts, base_texts, runs, heads, weights, count: int = 3) -> list[dict]:
    """The first `count` prompts with the base's response and each head's at the largest weight."""
    top = max(weights)
    out = []
    for i in range(min(count, len(prompts))):
        ex = {"prompt": prompts[i], "base": base_texts[i]}
        for h in heads:
            g = runs.get(setting_key({h: top}))
            if g is not None:
                ex[f"{h}={top:g}"] = g.texts[i]
        out.append(ex)
    return out


def quality_checks(report: dict, config: EvalConfig) -> dict:
    """The quality bar per head (docs/QUALITY.md): monotonic in the weight, a negative weight
    lowers the reward, and VAS against Best-of-N at the same KL. Comparisons with a Best-of-N computed on a subset
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


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "eval.md").write_text(markdown(report))
    plot(report, out_dir)


def _fmt(ms: tuple | list, digits: int = 3) -> str:
    m, se = ms
    return f"{m:.{digits}f} ± {se:.{digits}f}" if not math.isnan(se) else f"{m:.{digits}f}"


def markdown(report: dict) -> str:
    """eval.md: the setup, per head its weight sweep against Best-of-N and its checks, the two-head
    grid, the cost per prompt and example responses."""
    lines = _md_setup(report)
    for h in report["heads"]:
        lines += _md_head_table(report, h) + _md_head_checks(report, h) + [""]
    if report["grid"]:
        lines += _md_grid(report)
    lines += _md_cost(report) + _md_examples(report)
    lines += ["", f"Total wall time {report['seconds_total']:.0f} s.", ""]
    return "\n".join(lines)


def _md_setup(report: dict) -> list[str]:
    """The title and a paragraph on the evaluation's settings and units."""
    c = report["config"]
    return [f"# VAS evaluation: {Path(c['value_model']).name}", "",
            f"{report['num_prompts']} held-out prompts, max_tokens {c['max_tokens']}, temperature 1, "
            f"VAS top_k {c['top_k']}, seed {c['seed']}, dtype {c['dtype'] or 'the engine default'}. Rewards: "
            + ", ".join(f"`{h}` = `{report['rewards'][h]}`" for h in report["heads"])
            + ". Values are mean ± standard error over prompts. KL: nats per response "
              "(VAS: exact per-step KL summed along the sampled responses; BoN: log N - (N-1)/N).", ""]


def _md_head_table(report: dict, h: str) -> list[str]:
    """Head `h`'s section: a row per VAS weight of `h` and per Best-of-N by `h`, every head's reward."""
    heads = report["heads"]
    lines = [f"## Head `{h}`", "",
             "| setting | KL | " + " | ".join(f"reward `{x}`" for x in heads) + " | tokens | seconds |",
             "|---|---|" + "---|" * len(heads) + "---|---|"]
    for r in report["per_head"][h]:
        lines.append(f"| VAS {h}={r['weights'].get(h, 0.0):g} | {_fmt(r['kl'], 2)} | "
                     + " | ".join(_fmt(r["reward"][x]) for x in heads)
                     + f" | {r['tokens']} | {r['seconds']:.1f} |")
    for n, r in report["bon"].items():  # Best-of-N by h reports only h's reward
        lines.append(f"| BoN-{n} by `{h}` ({r['prompts']} prompts) | {r['kl']:.2f} | "
                     + " | ".join(_fmt(r["reward"][x]) if x == h else "" for x in heads)
                     + f" | {r['tokens']} | {r['seconds']:.1f} |")
    return lines


def _md_head_checks(report: dict, h: str) -> list[str]:
    """Head `h`'s quality checks (quality_checks) as a list: monotonic, negative weights, VAS
    against Best-of-N within BoN-16's KL."""
    ch = report["checks"][h]
    lines = ["", f"- monotonic over weights {', '.join(f'{w:g}' for w in ch['weights'])}: "
                 f"**{'yes' if ch['monotonic'] else 'no'}** ({', '.join(f'{m:.3f}' for m in ch['means'])})"]
    for w, ok in ch["negative_lowers"].items():
        lines.append(f"- weight {w} lowers the reward below weight 0: **{'yes' if ok else 'no'}**")
    if "kl_budget_bon16" in ch:
        lines.append(f"- VAS at KL <= KL(BoN-16) = {ch['kl_budget_bon16']:.2f} against Best-of-N:")
        for n in report["bon"]:
            v = ch[f"vs_bon{n}"]
            where = (f"best VAS {setting_label(tuple(v['vas_weights'].items()))}: {v['vas_reward']:.3f} "
                     f"(KL {v['vas_kl']:.2f})" if v["vas_weights"] is not None else "no VAS setting within the budget")
            lines.append(f"  - BoN-{n} ({v['prompts']} prompts): {v['bon_reward']:.3f}; {where}; "
                         f"reaches it: **{'yes' if ch[f'beats_bon{n}'] else 'no'}**")
    return lines


def _md_grid(report: dict) -> list[str]:
    """The two-head grid: both heads' mean rewards and the KL at every pair of weights."""
    a, b = report["grid_heads"]
    ws = report["config"]["grid_weights"]
    lines = [f"## Two heads: `{a}` x `{b}`", "",
             f"Mean rewards `{a}` / `{b}`; rows: weight of `{a}`, columns: weight of `{b}`.", "",
             "| " + f"{a} \\ {b} | " + " | ".join(f"{w:g}" for w in ws) + " |",
             "|---|" + "---|" * len(ws)]
    for wa, row in zip(ws, report["grid"]):
        lines.append(f"| {wa:g} | " + " | ".join(
            f"{r['reward'][a][0]:.3f} / {r['reward'][b][0]:.3f} (KL {r['kl'][0]:.1f})" for r in row) + " |")
    return lines + [""]


def _md_cost(report: dict) -> list[str]:
    """Tokens and seconds per prompt of every steered VAS run and every Best-of-N, and their ratios."""
    n_prompts, bon = report["num_prompts"], report["bon"]
    lines = ["## Cost", "", "Per prompt: generated tokens and wall seconds (Best-of-N: pro-rated from the base run "
             "by tokens).", "", "| run | responses per prompt | prompts | tokens / prompt | seconds / prompt |",
             "|---|---|---|---|---|"]
    vas_rows = [r for h in report["heads"] for r in report["per_head"][h] if r["weights"]]  # weight 0 is the base
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
    return lines


def _md_examples(report: dict) -> list[str]:
    """Each example prompt with its responses, one per run."""
    lines = ["", "## Examples", ""]
    for ex in report.get("examples", []):
        lines.append(f"- prompt: {ex['prompt']!r}")
        for k, v in ex.items():
            if k != "prompt":
                lines.append(f"  - {k}: {v!r}")
    return lines
