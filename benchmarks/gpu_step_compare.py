"""A separate trunk's decode step on CUDA, for this tree or another checkout of vas-server (to
compare two versions of the value runtime on the same GPU, run in turns).

    python benchmarks/gpu_step_compare.py [--src DIR]     # DIR: a checkout, e.g. `git worktree add DIR REV`

A SmolLM2-shaped 6-layer trunk (random weights) with one state and one token head, float32; B rows
of a given context are prefilled, then 30 decode steps commit one token per row and score K = 20
candidates. Prints one JSON line: {"B.. ctx.. K..": [best ms, median ms]}. Handles the value
runtime's API before the split of issue 42 (ValueRow(slot, prompt, outputs, head_ids) in
vas_server.core.value_runtime) and after it (vas_server.core.scorer). It builds its model itself,
not with separate_step.random_value_model: that module imports the new API, which --src's old
tree lacks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64,
               rms_norm_eps=1e-5, rope_theta=100000.0, qkv_bias=False, o_bias=False, mlp_bias=False)
SHAPES = ((8, 512), (64, 512), (64, 2048), (128, 512))  # (rows, context)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(Path(__file__).resolve().parent.parent))
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    sys.path.insert(0, args.src)
    from vas_server.core.format import HeadSpec, TokenizerIdentity, TrunkSpec, ValueModelSpec
    from vas_server.core.heads import ValueHeads
    from vas_server.core.model import ValueModel
    from vas_server.core.trunk import Trunk, TrunkConfig

    try:  # after issue 42's split
        from vas_server.core.scorer import StepInputs, TokenLists, ValueRow, list_new_tokens
        from vas_server.core.trunk_scorer import TrunkScorer

        def row(slot, prompt, heads):
            return ValueRow(slot, heads, TokenLists(prompt))

        def outputs(r):
            return r.tokens.outputs
    except ImportError:  # before it
        from vas_server.core.value_runtime import StepInputs, TrunkScorer, ValueRow, list_new_tokens

        def row(slot, prompt, heads):
            return ValueRow(slot, prompt, [], heads)

        def outputs(r):
            return r.outputs

    result = {}
    for B, context in SHAPES:
        torch.manual_seed(0)
        config = TrunkConfig(num_layers=6, **SMOLLM2)
        heads = [HeadSpec("s", "state", "random"), HeadSpec("t", "token", "random")]
        spec = ValueModelSpec(trunk=TrunkSpec("standalone"), heads=heads, tokenizer=TokenizerIdentity(49152, "random"))
        model = ValueModel("bench", Path("."), spec, Trunk(config).cuda().eval(), ValueHeads(heads, 576, 49152).cuda())
        scorer = TrunkScorer(model, B, context + args.steps + 8, "cuda", torch.float32)
        g = torch.Generator().manual_seed(1)
        rows = [row(b, torch.randint(0, 49152, (context,), generator=g).tolist(), frozenset({0, 1})) for b in range(B)]
        step = StepInputs(list_new_tokens(torch.device("cuda")))
        candidates = torch.randint(0, 49152, (B, 20), generator=g).cuda()
        scorer.score(rows, candidates, step)  # prefill
        torch.cuda.synchronize()
        times = []
        for i in range(args.steps):
            for r in rows:
                outputs(r).append(i + 5)
            start = time.perf_counter()
            scorer.score(rows, candidates, step)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        result[f"B{B} ctx{context} K20"] = [round(times[0], 2), round(times[len(times) // 2], 2)]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
