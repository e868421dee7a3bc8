"""Value targets: token heads fitted on the same samples with the spec's squared error
(β = 0: values of the policy that made the samples) and with soft targets at several β (`fit
--soft-beta`, docs/TRAINING.md "Soft values"), each steered by `vas-train eval` on the same held-out
prompts, seeds and base run, and compared at one KL budget (Best-of-16's by default). Given samples
of a VAS-steered policy (`sample --value-model`), β = 0 fits that policy's values: one round of
iterated values.

    .venv/bin/python benchmarks/value_targets.py SAMPLES... [--heads positive] [--betas 0,1,2.2] \
        [--weights 1.5,2.2,3,4,6] [--reference vas_server/demo/smollm2] [--work build/soft] \
        [--states-cache DIR] [--generations DIR] [--out benchmarks/results/value_targets.json]

SAMPLES: scored `vas-train sample` files. Each β gets one model with every head in --heads, fitted
with the shipped model's settings (trunk states cached in WORK/states or --states-cache, e.g.
depth_sweep.py's); --reference adds an already trained model (e.g. the shipped one) to the same
evaluation. Every evaluation is `vas-train eval` at --top-k 256 in float32 with Best-of-4 on 200
prompts and Best-of-16 on 50; its runs are cached in WORK/generations or --generations (the base
run is shared by all models and by every command given the same directory), so a repeated command
only generates what is missing. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from depth_sweep import FIT_SETTINGS  # noqa: E402

EVAL_SETTINGS = dict(max_tokens=32, bon=[4, 16], bon_prompts=[200, 50], top_k=256, dtype="float32",
                     max_num_seqs=200, grid_weights=[0.0], seed=0)
NUM_PROMPTS = 200


def reward_at_kl(rows: list[dict], head: str, budget: float) -> dict | None:
    """The head's reward at KL = budget, interpolated linearly in KL between the two measured
    settings around it (the base is the setting at KL 0), with the standard error interpolated the
    same way; None when no measured setting reaches the budget."""
    points = sorted((r["kl"][0], r["reward"][head][0], r["reward"][head][1], r["label"]) for r in rows)
    for (k0, r0, s0, l0), (k1, r1, s1, l1) in zip(points, points[1:]):
        if k0 <= budget <= k1:
            t = (budget - k0) / (k1 - k0) if k1 > k0 else 0.0
            return {"reward": r0 + t * (r1 - r0), "se": s0 + t * (s1 - s0), "between": [l0, l1]}
    return None


def _fitted(model_dir: Path, config) -> bool:
    """Whether model_dir already holds a finished fit with exactly this config."""
    spec = model_dir / "vas.json"
    return (spec.is_file() and not (model_dir / "train_state").exists()
            and json.loads(spec.read_text())["extra"].get("training") == json.loads(json.dumps(config.to_json())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("samples", nargs="+", type=Path)
    parser.add_argument("--heads", default="positive", help="comma-separated heads (rewards) to fit and steer")
    parser.add_argument("--betas", default="0,1,2.2", help="comma-separated soft betas; 0 is the squared error")
    parser.add_argument("--weights", default="1.5,2.2,3,4,6", help="comma-separated VAS weights per head")
    parser.add_argument("--reference", type=Path, help="an already trained value model evaluated alongside")
    parser.add_argument("--kl-budget", type=float, default=math.log(16) - 15 / 16, help="default: Best-of-16's KL")
    parser.add_argument("--work", type=Path, default=Path("build/soft"))
    parser.add_argument("--states-cache", type=Path, help="where frozen-trunk states are cached (default: WORK/states)")
    parser.add_argument("--generations", type=Path, help="where evaluation runs are cached (default: WORK/generations)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/value_targets.json"))
    args = parser.parse_args()

    from value_models.evaluate import EvalConfig, evaluate
    from value_models.prompts import chitchat_prompts, pick
    from value_models.records import read_samples
    from value_models.rewards import describe
    from value_models.train import FitConfig, HeadPlan, fit
    from value_models.training_trunk import TrunkPlan
    from vas_server.core.base_model import ensure_base_model

    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    betas = [float(b) for b in args.betas.split(",")]
    weights = [float(w) for w in args.weights.split(",")]
    base = str(ensure_base_model())
    samples = [s for path in args.samples for s in read_samples(path)]
    prompts = pick(chitchat_prompts("heldout"), NUM_PROMPTS, seed=0)
    trunk = TrunkPlan("base_prefix", base, num_layers=6)

    models: dict[str, dict] = {}
    for beta in betas:
        model_dir = args.work / f"{'_'.join(heads)}_b{beta:g}"
        # The same FitConfig as `vas-train fit` with these settings, so either makes the same model.
        config = FitConfig(heads=[HeadPlan(h, "token", h, describe(h)) for h in heads], trunk=trunk,
                           soft_beta=beta, extra={"samples": [p.name for p in args.samples]}, **FIT_SETTINGS)
        fit_s = None  # a repeated command keeps the models it already made (and has no fit time for them)
        if not _fitted(model_dir, config):
            started = time.perf_counter()
            fit(samples, config, model_dir, progress=False, states_cache=args.states_cache or args.work / "states")
            fit_s = round(time.perf_counter() - started, 1)
        models[f"beta {beta:g}"] = {"dir": model_dir, "beta": beta, "fit_s": fit_s}
    if args.reference:
        models["reference"] = {"dir": args.reference, "beta": None}

    result = {}
    for name, model in models.items():
        # Weight 0 (the base's first sample of each prompt, KL 0) anchors the interpolation.
        config = EvalConfig(value_model=str(model["dir"]), base=base, prompts=prompts, weights=[0.0, *weights],
                            heads=heads, **EVAL_SETTINGS)
        started = time.perf_counter()
        report = evaluate(config, args.work / "eval" / model["dir"].name,
                          generations_dir=args.generations or args.work / "generations", progress=False)
        result[name] = {"model": str(model["dir"]), "beta": model["beta"], "fit_s": model.get("fit_s"),
                        "eval_s": round(time.perf_counter() - started, 1), "bon": list(report["bon"].values()),
                        "heads": {}}
        for h in heads:
            rows = report["per_head"][h]
            result[name]["heads"][h] = {
                "at_budget": reward_at_kl(rows, h, args.kl_budget),
                "runs": [{"weight": r["weights"].get(h, 0.0), "reward": r["reward"][h], "kl": r["kl"]} for r in rows]}
        print(f"{name}: evaluated in {result[name]['eval_s']:.0f} s", flush=True)

    bon = next(iter(result.values()))["bon"]
    print(f"\n{len(samples)} training samples; {NUM_PROMPTS} held-out prompts, K = 256, float32. Reward at KL "
          f"{args.kl_budget:.2f} (interpolated) +- SE; reward (KL) at each weight")
    for h in heads:
        bars = ", ".join(f"BoN-{b['n']} {b['reward'][h][0]:.3f} (KL {b['kl']:.2f}, {b['prompts']} prompts)"
                         for b in bon)
        print(f"\n{h}: {bars}")
        print(f"{'model':>12} {'at budget':>16} " + " ".join(f"{'w=' + format(w, 'g'):>14}" for w in weights))
        for name, row in result.items():
            at = row["heads"][h]["at_budget"]
            cells = {r["weight"]: f"{r['reward'][0]:.3f} ({r['kl'][0]:.2f})" for r in row["heads"][h]["runs"]}
            budget = f"{at['reward']:.3f} +- {at['se']:.3f}" if at else "not reached"
            print(f"{name:>12} {budget:>16} " + " ".join(f"{cells.get(w, '-'):>14}" for w in weights))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python benchmarks/value_targets.py", *sys.argv[1:]]),
        "samples": [p.name for p in args.samples], "num_samples": len(samples), "fit_settings": FIT_SETTINGS,
        "eval_settings": EVAL_SETTINGS, "num_prompts": NUM_PROMPTS, "kl_budget": args.kl_budget,
        "models": result}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
