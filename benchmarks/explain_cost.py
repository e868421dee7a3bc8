"""What `vas_explain` costs: per decoding step in the worker (`--step`, no server), and end to
end against a running vas-server.

`--step`: one steered step's work as Steering.apply does it (top-K of the logits, the bonus from
[B, H, K] values, the in-place update; random logits and values: the value heads' own cost is the
same either way and left out), without and with Explanations.record for every row, at the
embedded SmolLM2's vocabulary (49152) and the demo model's K (256), 3 heads. Median of --repeats.

End to end:
Interleaves three kinds of chat requests at the same prompt, seed and length: unsteered, steered
(`vas_weights`) and steered with `vas_explain` (N candidates per token). Each round sends one of
each, in a rotating order, so that load from elsewhere on the machine hits all three alike. Prints
the median and quartiles of the wall time per request and per generated token, and the answer
size; writes JSON.

    python benchmarks/explain_cost.py --url http://localhost:8000 [--rounds 15] [--max-tokens 48]
        [--head positive] [--weight 4] [--candidates 5] [--out benchmarks/results/explain_cost.json]
    python benchmarks/explain_cost.py --step [--out benchmarks/results/explain_step.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx
import torch

from vas_server.core import rule
from vas_server.engine.explain import Explanations
from vas_server.params import Explain

PROMPT = "How was your weekend?"


def body(args, kind: str, seed: int) -> dict:
    out = {"model": args.model, "max_tokens": args.max_tokens, "seed": seed, "temperature": 1.0,
           "messages": [{"role": "user", "content": PROMPT}], "ignore_eos": True}
    if kind != "plain":
        out["vas_weights"] = {args.head: args.weight}
    if kind == "explain":
        out["vas_explain"] = args.candidates
    return out


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def step_benchmark(args) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    vocab, k, heads = 49152, 256, 3
    rows = []
    print(f"one steered step, V {vocab}, K {k}, {heads} heads, 1 thread, median of {args.repeats}")
    print(f"{'batch':>5} {'off us':>9} {'on us':>9} {'on/off':>7}")
    for batch in (1, 8, 32):
        logits = torch.randn(batch, vocab)
        values = torch.randn(batch, heads, k)
        weights = torch.tensor([[2.0, 0.0, 1.0]]).repeat(batch, 1)
        valid = torch.ones(batch, k, dtype=torch.bool)
        explanations = Explanations(["a", "b", "c"])
        records = [explanations.start(Explain(top=5, id=str(i)), weights[i], k, None) for i in range(batch)]
        positions = torch.arange(batch)

        def step(explain: bool) -> float:
            row_logits = logits.clone()
            start = time.perf_counter()
            candidates = row_logits.topk(k, dim=1).indices
            bonus = rule.bonus(values, weights, valid)
            base = row_logits.index_select(0, positions) if explain else None
            rule.add_bonus_(row_logits, candidates, bonus, valid, None)
            if explain:
                explanations.record(records, positions, base, row_logits.index_select(0, positions), candidates,
                                    values, weights, valid)
            return time.perf_counter() - start

        times = {}
        for explain in (False, True):
            for _ in range(5):
                step(explain)
            times[explain] = statistics.median(step(explain) for _ in range(args.repeats)) * 1e6
            for r in records:
                r.steps.clear()
        rows.append({"batch": batch, "off_us": times[False], "on_us": times[True]})
        print(f"{batch:>5} {times[False]:>9.0f} {times[True]:>9.0f} {times[True] / times[False]:>7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {"vocab": vocab, "k": k, "heads": heads, "repeats": args.repeats},
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", action="store_true", help="the worker's per-step cost, no server")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--head", default="positive")
    parser.add_argument("--weight", type=float, default=4.0)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/explain_cost.json"))
    args = parser.parse_args()
    if args.step:
        return step_benchmark(args)
    kinds = ["plain", "steered", "explain"]
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    sizes: dict[str, int] = {}
    with httpx.Client(base_url=args.url, timeout=300) as http:
        http.post("/v1/chat/completions", json=body(args, "explain", 0)).raise_for_status()  # warm-up
        for r in range(args.rounds):
            for kind in kinds[r % 3:] + kinds[:r % 3]:
                start = time.perf_counter()
                response = http.post("/v1/chat/completions", json=body(args, kind, r))
                seconds[kind].append(time.perf_counter() - start)
                response.raise_for_status()
                answer = response.json()
                assert answer["usage"]["completion_tokens"] == args.max_tokens
                assert (kind == "explain") == ("vas_explain" in answer)
                sizes[kind] = len(response.content)
    rows = []
    print(f"{args.rounds} rounds, {args.max_tokens} tokens, {args.head} {args.weight}, vas_explain {args.candidates}")
    print(f"{'request':<10} {'ms/request (q1 median q3)':>30} {'ms/token':>9} {'answer bytes':>13}")
    for kind in kinds:
        q1, med, q3 = (1000 * x for x in quartiles(seconds[kind]))
        rows.append({"kind": kind, "ms_q1": q1, "ms_median": med, "ms_q3": q3,
                     "ms_per_token": med / args.max_tokens, "answer_bytes": sizes[kind]})
        print(f"{kind:<10} {q1:>10.1f} {med:>9.1f} {q3:>9.1f} {med / args.max_tokens:>9.2f} {sizes[kind]:>13}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                    "seconds": seconds}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
