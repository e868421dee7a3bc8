"""The VAS processor's per-step tensor work, timed alone: what steering costs without the engine.

For B rows of SmolLM2-sized logits (V = 49,152, H = 576) and K candidates: the top-K, the token
heads' values of the candidates (1 and 3 heads; the candidates' embedding rows gathered into a
preallocated buffer, as the server does), the centred weighted bonus, and the in-place logits
update. Random tensors: the work does not depend on what the heads learned. Best of --repeats.

    python benchmarks/steering_step.py [--batches 1 8 64 128] [--top-k 20 256] [--threads 1]
                                       [--out benchmarks/results/steering_step.json]

Prints a table (milliseconds per step) and writes JSON. Compare with the engine's step time
(batch / tokens per second in docs/BENCHMARKS.md) for the share of a step.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from vas_server.core.format import HeadSpec
from vas_server.core.heads import DenseEmbedding, ValueHeads
from vas_server.core import rule

VOCAB, HIDDEN = 49152, 576


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def time_step(batch: int, top_k: int, n_heads: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    heads = ValueHeads([HeadSpec(f"h{i}", "token") for i in range(n_heads)], HIDDEN, VOCAB)
    embed = torch.randn(VOCAB, HIDDEN, generator=g)
    logits = torch.randn(batch, VOCAB, generator=g)
    hidden = torch.randn(batch, HIDDEN, generator=g)
    weights = torch.ones(batch, n_heads)
    valid = torch.ones(batch, top_k, dtype=torch.bool)
    embedding = DenseEmbedding(embed, reuse_rows=True)  # the server's: rows gathered into one buffer
    with torch.inference_mode():
        candidates = logits.topk(top_k, dim=1).indices
        values = heads.token(hidden, embed, candidates).permute(1, 0, 2)
        bonus = rule.bonus(values, weights, valid)
        parts = {
            "top-K": lambda: logits.topk(top_k, dim=1).indices,
            "values": lambda: heads.token(hidden, embedding, candidates),
            "bonus": lambda: rule.bonus(values, weights, valid),
            "update": lambda: rule.add_bonus_(logits, candidates, bonus, valid, None),
        }
        out = {name: best_ms(fn, repeats) for name, fn in parts.items()}
    out["total"] = sum(out.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 128])
    ap.add_argument("--top-k", type=int, nargs="+", default=[20, 256])
    ap.add_argument("--heads", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/steering_step.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    print(f"{'B':>5} {'K':>4} {'heads':>5} {'top-K':>8} {'values':>8} {'bonus':>8} {'update':>8} {'total':>8}  (ms)")
    for b in args.batches:
        for k in args.top_k:
            for n in args.heads:
                r = time_step(b, k, n, args.repeats)
                results.append({"batch": b, "top_k": k, "heads": n, "ms": r})
                print(f"{b:>5} {k:>4} {n:>5} " + " ".join(f"{r[p]:>8.3f}" for p in
                                                       ("top-K", "values", "bonus", "update", "total")), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": "python benchmarks/steering_step.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k != "out"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads},
        "vocab": VOCAB, "hidden": HIDDEN, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
