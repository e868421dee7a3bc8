"""The separate value runtime on a CUDA device: the same values as on the CPU, no host sync per
step, and its step time. Needs only torch and safetensors (no vLLM), so it runs on a bare GPU box.

A SmolLM2-shaped trunk of `--layers` layers (random weights) with one state head and one token
head, loaded twice with the same weights: on the CPU and on `cuda`. Rows with different prompt
lengths are prefilled, then decode steps commit one token per row and score K candidates, then a
round of drafts (remote mode's draft-and-verify) is scored and partly committed. Checked:
  * every step's and draft's values agree between the devices (max abs difference, float32);
  * the decode steps and drafts run under `torch.cuda.set_sync_debug_mode("error")` (a
    synchronising call raises), after one warm-up step that grows the cache;
  * the best decode step's milliseconds at --batch rows of --context tokens.

    python benchmarks/gpu_core_check.py [--layers 6] [--batch 64] [--context 512] [--top-k 20]
                                        [--out benchmarks/results/gpu_core_check.json]

Prints a table and writes JSON; exits 1 when a check fails, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

from separate_step import random_value_model  # benchmarks/, this script's directory
from vas_server.core.model import ValueModel
from vas_server.core.scorer import TokenLists, ValueRow
from vas_server.core.value_runtime import ValueRuntime

TOLERANCE = 2e-3  # float32 values of order 1 on two devices (TF32 off)


def runtimes(layers: int, max_requests: int, max_len: int, device: str) -> tuple[ValueRuntime, ValueRuntime]:
    model = random_value_model(layers, torch.float32, head_std=0.05)
    out = []
    for on in ("cpu", device):
        copied = ValueModel("check", Path("."), model.spec, copy.deepcopy(model.trunk).to(on),
                            copy.deepcopy(model.value_heads).to(on))
        out.append(ValueRuntime([copied], max_requests, max_len, on, torch.float32))
    return out[0], out[1]


def steps(cpu: ValueRuntime, gpu: ValueRuntime, prompts: list[list[int]], n_steps: int, top_k: int,
          rng: random.Random, strict_from: int) -> tuple[float, list[float]]:
    """Decode `n_steps` on both runtimes; (max abs difference, the GPU's step milliseconds from
    step `strict_from` on, which run under the sync check)."""
    heads = frozenset(range(len(cpu.head_names)))
    rows = {rt: [ValueRow(rt.allocate(), heads, TokenLists(list(p))) for p in prompts] for rt in (cpu, gpu)}
    worst, times = 0.0, []
    for step in range(n_steps):
        candidates = torch.tensor([[rng.randrange(49152) for _ in range(top_k)] for _ in prompts])
        want = cpu.score(rows[cpu], candidates)
        on_gpu = candidates.to(gpu.device)
        _synchronize()
        start = time.perf_counter()
        with _no_sync(step >= strict_from):
            got = gpu.score(rows[gpu], on_gpu)
        _synchronize()
        if step >= strict_from:
            times.append((time.perf_counter() - start) * 1e3)
        worst = max(worst, (got.cpu() - want).abs().max().item())
        for rt in (cpu, gpu):
            for r, c in zip(rows[rt], candidates[:, 0].tolist()):
                r.tokens.outputs.append(c)
    drafts = [[rng.randrange(49152) for _ in range(rng.randrange(1, 5))] for _ in prompts]
    draft_candidates = [torch.tensor([[rng.randrange(49152) for _ in range(top_k)] for _ in range(len(d) + 1)])
                        for d in drafts]
    want = cpu.score_drafts(rows[cpu], drafts, draft_candidates)
    on_device = [c.to(gpu.device) for c in draft_candidates]  # a blocking copy: the check's own, not timed
    _synchronize()
    with _no_sync(True):
        got = gpu.score_drafts(rows[gpu], drafts, on_device)
        for rt in (cpu, gpu):
            for r, d in zip(rows[rt], drafts):
                rt.commit_draft(r, len(d) // 2)
    worst = max([worst] + [(g.cpu() - w).abs().max().item() for g, w in zip(got, want)])
    for rt, rt_rows in rows.items():
        for r in rt_rows:
            rt.release(r.cache_slot)
    return worst, times


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def _no_sync(strict: bool):
    """A synchronising CUDA call raises inside (where CUDA is there and `strict`)."""
    if not (strict and torch.cuda.is_available()):
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script (no sync check)")
    ap.add_argument("--out", default="benchmarks/results/gpu_core_check.json")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        sys.exit(2)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rng = random.Random(0)
    cpu, gpu = runtimes(args.layers, args.batch, max(args.context, 64) + args.steps + 16, args.device)
    # Uneven prompts (each row's own length), then the timed batch of --context tokens.
    uneven = [[rng.randrange(49152) for _ in range(n)] for n in (3, 17, 40, 9)]
    diff_uneven, _ = steps(cpu, gpu, uneven, 4, args.top_k, rng, strict_from=1)
    full = [[rng.randrange(49152) for _ in range(args.context)] for _ in range(args.batch)]
    diff_full, times = steps(cpu, gpu, full, args.steps, args.top_k, rng, strict_from=1)
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "host": platform.node(),
        "layers": args.layers, "batch": args.batch, "context": args.context, "top_k": args.top_k,
        "max_abs_diff_uneven": diff_uneven, "max_abs_diff_batch": diff_full,
        "step_ms_best": min(times), "step_ms_median": sorted(times)[len(times) // 2],
        "no_sync_checked": args.device == "cuda",  # a synchronising call would have raised above
    }
    ok = max(diff_uneven, diff_full) <= TOLERANCE
    print(f"| check | value |\n|---|---|\n| device | {result['device']} (torch {result['torch']}) |")
    print(f"| max abs diff, 4 uneven rows (steps and drafts) | {diff_uneven:.2e} |")
    print(f"| max abs diff, {args.batch} rows x {args.context} tokens | {diff_full:.2e} |")
    print(f"| host sync in a decode step or a draft | "
          f"{'none (set_sync_debug_mode error)' if result['no_sync_checked'] else 'not checked'} |")
    print(f"| decode step, best / median ms ({args.layers} layers, K {args.top_k}) | "
          f"{result['step_ms_best']:.2f} / {result['step_ms_median']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
