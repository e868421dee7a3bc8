"""Depth for free: token heads on the base's layer N, trained on the same samples with the
shipped model's settings, ranked by the steering proxy (benchmarks/steering_proxy.py).

On the shared path (docs/ARCHITECTURE.md) a value model on a frozen base prefix of any depth costs
the same at serving time: its states are the base's own residual stream. Training is what depth
costs: the trunk states of every sample. This script computes them for every depth in one pass of
the deepest trunk (HF's hidden_states after layer N, through the final norm: what a TrainingTrunk
of N layers gives, checked on the first batch), writes each depth's states where `fit
--states-cache` looks for them, fits one model per depth and scores each with the proxy.

    .venv/bin/python benchmarks/depth_sweep.py SAMPLES.jsonl... --proxy-data build/proxy.json \\
        [--depths 6,12,18,24,30] [--work build/depth] [--out benchmarks/results/depth_sweep.json]

SAMPLES: scored `vas-train sample` files (rewards positive, concise, simple). Prints a table and
writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steering_proxy import REWARDS, score  # noqa: E402

# The shipped demo model's settings (Makefile, demo-models), except the trunk depth.
FIT_SETTINGS = dict(lam=1.0, epochs=3, batch_size=32, lr=1e-3, token_proj_lr=2e-6, lr_decay="linear", seed=0,
                    checkpoint_every=0, passes_per_batch=2, validation_fraction=0.0)


@torch.no_grad()
def states_by_depth(base: str, samples, depths: list[int], batch_size: int = 16) -> dict[int, list[torch.Tensor]]:
    """Per depth N, the frozen N-layer trunk's states of every sample ([T, H] each), from one pass of
    the deepest trunk."""
    from tqdm.auto import tqdm

    from value_models.states import gather_states, make_batch
    from value_models.training_trunk import TrainingTrunk, TrunkPlan

    deepest = TrainingTrunk(TrunkPlan("base_prefix", base, num_layers=max(depths)))
    check = TrainingTrunk(TrunkPlan("base_prefix", base, num_layers=min(depths)))
    out: dict[int, list[torch.Tensor]] = {n: [] for n in depths}
    for start in tqdm(range(0, len(samples), batch_size), desc="trunk states, all depths"):
        chunk = samples[start:start + batch_size]
        batch = make_batch([s.prompt_token_ids for s in chunk], [s.response_token_ids for s in chunk])
        hidden = deepest.decoder(input_ids=batch.tokens, use_cache=False, output_hidden_states=True).hidden_states
        # hidden[N] is the residual stream after layer N; the last entry already went through the norm.
        normed = {n: hidden[n] if n == max(depths) else deepest.decoder.norm(hidden[n]) for n in depths}
        if start == 0:
            expected = check.hidden_states(batch.tokens)
            error = (normed[min(depths)] - expected).abs().max().item()
            if error > 1e-4:
                raise RuntimeError(f"layer-{min(depths)} states differ from a {min(depths)}-layer trunk by {error}")
        for n in depths:
            states = gather_states(normed[n], batch.positions)
            out[n].extend(states[b, :int(batch.lengths[b])].clone() for b in range(len(chunk)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("samples", nargs="+", type=Path)
    parser.add_argument("--proxy-data", type=Path, required=True, help="made by `steering_proxy.py data`")
    parser.add_argument("--depths", default="6,12,18,24,30")
    parser.add_argument("--work", type=Path, default=Path("build/depth"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/depth_sweep.json"))
    args = parser.parse_args()

    from value_models.records import read_samples
    from value_models.rewards import describe
    from value_models.train import FitConfig, HeadPlan, fit, save_trunk_states, states_cache_path
    from value_models.training_trunk import TrunkPlan
    from vas_server.core.base_model import ensure_base_model

    depths = sorted(int(x) for x in args.depths.split(","))
    base = str(ensure_base_model())
    samples = [s for path in args.samples for s in read_samples(path) if s.response_token_ids]
    cache = args.work / "states"
    plans = {n: TrunkPlan("base_prefix", base, num_layers=n) for n in depths}
    missing = [n for n in depths if not states_cache_path(cache, plans[n], samples).is_file()]
    timings: dict[str, float] = {}
    if missing:
        started = time.perf_counter()
        for n, states in states_by_depth(base, samples, missing).items():
            save_trunk_states(states_cache_path(cache, plans[n], samples), states)
        timings["states_s"] = round(time.perf_counter() - started, 1)

    heads = [HeadPlan(name, "token", name, describe(name)) for name in REWARDS]
    data = json.loads(args.proxy_data.read_text())
    kl = math.log(4) - 3 / 4
    rows = {}
    for n in depths:
        model_dir = args.work / f"layers{n}"
        started = time.perf_counter()
        fit(samples, FitConfig(heads=heads, trunk=plans[n], **FIT_SETTINGS), model_dir, progress=False,
            states_cache=cache)
        fit_s = time.perf_counter() - started
        rows[n] = {"fit_s": round(fit_s, 1), "proxy": score(str(model_dir), data, kl, dtype="float32")}
        print(f"layers {n}: " + ", ".join(f"{h} {v['corr']:.3f}" for h, v in rows[n]["proxy"].items()), flush=True)

    print(f"\n{len(samples)} samples; steering proxy on {len(data['token_ids'])} held-out base responses, "
          f"K = {len(data['topk'][0][0][0])}: corr(S, r) / first-order gain at KL {kl:.2f}")
    print(f"{'layers':>7} " + " ".join(f"{h:>16}" for h in REWARDS))
    for n, row in rows.items():
        print(f"{n:>7} " + " ".join(f"{row['proxy'][h]['corr']:>8.3f} / {row['proxy'][h]['gain_at_kl']:.3f}"
                                    for h in REWARDS))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python benchmarks/depth_sweep.py", *sys.argv[1:]]),
        "samples": [p.name for p in args.samples], "num_samples": len(samples), "fit_settings": FIT_SETTINGS,
        "proxy_responses": len(data["token_ids"]), "kl": kl, "timings": timings,
        "by_depth": {str(n): row for n, row in rows.items()}}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
