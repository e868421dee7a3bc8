"""The separate value runtime's decode step, timed alone, against context length.

A SmolLM2-135M-shaped trunk of `--layers` layers (H 576, 9 query and 3 KV heads of 64, random
weights: the cost does not depend on what they learned) with one state head and one token head,
as a LoRA or standalone value model runs (vas_server.core.trunk_scorer.TrunkScorer). B rows
whose prompts hold `context` tokens are prefilled once; then each decoding step commits one token
per row and scores K candidates (the state head runs every candidate through the trunk). Best of
--repeats steps, in milliseconds.

    python benchmarks/separate_step.py [--contexts 64 512 2048] [--batch 8] [--top-k 20]
                                       [--threads 2] [--out benchmarks/results/separate_step.json]

Prints a table and writes JSON. A step whose cost grows with the context faster than the base's
own attention does is what makes the separate runtime fall behind plain vLLM at long prompts
(docs/BENCHMARKS.md, context sweep).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from vas_server.core.format import HeadSpec, TokenizerIdentity, TrunkSpec, ValueModelSpec
from vas_server.core.heads import ValueHeads
from vas_server.core.model import ValueModel
from vas_server.core.trunk import Trunk, TrunkConfig
from vas_server.core.scorer import StepInputs, TokenLists, ValueRow, list_new_tokens
from vas_server.core.trunk_scorer import TrunkScorer

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64,
               rms_norm_eps=1e-5, rope_theta=100000.0, qkv_bias=False, o_bias=False, mlp_bias=False)


def random_value_model(layers: int, dtype: torch.dtype, head_std: float = 0.0) -> ValueModel:
    """A SmolLM2-shaped standalone value model of `layers` layers with random trunk weights, one
    state head and one token head (weights drawn with `head_std`; 0: zeros). Seeded: the same
    model every call (benchmarks/gpu_core_check.py builds its CPU and CUDA copies with it)."""
    torch.manual_seed(0)
    config = TrunkConfig(num_layers=layers, **SMOLLM2)
    heads = [HeadSpec("s", "state", "random"), HeadSpec("t", "token", "random")]
    spec = ValueModelSpec(trunk=TrunkSpec("standalone"), heads=heads, tokenizer=TokenizerIdentity(49152, "random"))
    trunk = Trunk(config).to(dtype).eval()
    value_heads = ValueHeads(heads, config.hidden_size, config.vocab_size).to(dtype)
    if head_std:
        with torch.no_grad():
            for p in value_heads.parameters():
                p.normal_(0, head_std)
    return ValueModel("bench", Path("."), spec, trunk, value_heads)


def scorer(layers: int, batch: int, max_len: int, dtype: torch.dtype) -> TrunkScorer:
    return TrunkScorer(random_value_model(layers, dtype), batch, max_len, "cpu", dtype)


def step_ms(context: int, batch: int, top_k: int, layers: int, repeats: int, dtype: torch.dtype) -> tuple[float, float]:
    """(the prefill's milliseconds: every row's whole prompt and first candidates, best decoding step's)."""
    s = scorer(layers, batch, context + repeats + 8, dtype)
    g = torch.Generator().manual_seed(1)
    rows = [ValueRow(b, frozenset({0, 1}), TokenLists(torch.randint(0, 49152, (context,), generator=g).tolist()))
            for b in range(batch)]
    candidates = torch.randint(0, 49152, (batch, top_k), generator=g)
    start = time.perf_counter()
    s.score(rows, candidates, StepInputs(_new_tokens))  # prefill: the whole prompt enters the cache
    prefill = time.perf_counter() - start
    best = float("inf")
    for i in range(repeats):
        for r in rows:
            r.tokens.outputs.append(int(candidates[0, i % top_k]))
        start = time.perf_counter()
        s.score(rows, candidates, StepInputs(_new_tokens))
        best = min(best, time.perf_counter() - start)
    return prefill * 1e3, best * 1e3


_new_tokens = list_new_tokens(torch.device("cpu"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 2048])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default="benchmarks/results/separate_step.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = {}
    print(f"{'context':>8}{'prefill ms':>12}{'ms/step':>10}{'step / first context':>22}")
    for context in args.contexts:
        with torch.inference_mode():
            prefill, step = step_ms(context, args.batch, args.top_k, args.layers, args.repeats, dtype)
        rows[context] = {"prefill_ms": prefill, "step_ms": step}
        print(f"{context:>8}{prefill:>12.1f}{step:>10.1f}{step / rows[args.contexts[0]]['step_ms']:>22.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": f"python benchmarks/separate_step.py --contexts {' '.join(map(str, args.contexts))} --batch "
                   f"{args.batch} --top-k {args.top_k} --layers {args.layers} --threads {args.threads} --dtype {args.dtype}",
        "machine": platform.processor() or platform.machine(), "by_context": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
