"""First-order steering efficiency of value models, without generating with VAS (docs/TRAINING.md).

    .venv/bin/python benchmarks/steering_proxy.py data build/proxy_data.json      # vLLM, ~2 min idle
    .venv/bin/python benchmarks/steering_proxy.py score build/proxy_data.json MODEL_DIR... \
        --out benchmarks/results/steering_proxy.json                                  # ~2 min per model

`data`: 200 held-out chitchat prompts x 4 responses of 32 tokens from the plain base (the seeds of
`vas-train eval`'s base run), each step's top-K raw base log-probs (`--top-k`, default 20: the
largest VAS candidate set C it can score), and each response's built-in rewards. `score --top-k K`
scores with the first K of them as C (default: all the data has).

`score`: per head, corr(S, r) of the steering proxy (value_models/proxy.py: S sums each step's
sampled token's centred value minus its base expectation; corr ranks value models by how much reward
they buy per unit of KL), and `gain@KL`, its first-order reward gain at a given KL (BoN-4's 0.64
nats by default). An exact value function gives a correlation near 1.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

REWARDS = ("positive", "concise", "simple")


def make_data(out: Path, top_k: int = 20, responses_per_prompt: int = 4, dtype: str = "bfloat16") -> None:
    from transformers import AutoTokenizer
    from vllm import LLM

    from value_models.evaluate import generate, max_logprobs_for
    from value_models.prompts import chitchat_prompts, pick
    from value_models.rewards import load_reward
    from value_models.sample import chat_prompt_ids
    from vas_server.core.base_model import ensure_base_model
    from vas_server.engine_args import engine_kwargs

    base = str(ensure_base_model())
    prompts = pick(chitchat_prompts("heldout"), 200, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    llm = LLM(**engine_kwargs(base, None, dtype=dtype, max_model_len=512, max_num_seqs=256, seed=0,
                              enable_chunked_prefill=False, disable_log_stats=True,
                              max_logprobs=max_logprobs_for(top_k)))
    gen = generate(llm, ids, n=responses_per_prompt, seed=0, max_tokens=32, weights=None, top_k=top_k, keep_topk=True)
    repeated = [p for p in prompts for _ in range(responses_per_prompt)]
    rewards = {name: load_reward(name).score(repeated, gen.texts) for name in REWARDS}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompt_ids": [i for i in ids for _ in range(responses_per_prompt)],
                               "token_ids": gen.token_ids, "texts": gen.texts, "topk": gen.topk, "rewards": rewards}))
    print(f"wrote {out}: {len(gen.token_ids)} responses, {gen.tokens} tokens")


@torch.no_grad()
def score(model_dir: str, data: dict, kl: float, batch_size: int = 200, dtype: str = "bfloat16") -> dict[str, dict]:
    from value_models.evaluate import replay_steps
    from value_models.proxy import ProxySums
    from vas_server.core.model import load_value_model
    from vas_server.core.base_model import ensure_base_model
    from vas_server.core.value_runtime import ValueRuntime

    dtype = getattr(torch, dtype)  # bfloat16: what the server runs the demo models in
    runtime = ValueRuntime([load_value_model(model_dir, str(ensure_base_model()), dtype=dtype)], batch_size, 512,
                           "cpu", dtype)
    sums = ProxySums(len(data["token_ids"]), len(runtime.head_names))
    for live, candidates, logp0, values, chosen in replay_steps(
            runtime, data["prompt_ids"], data["token_ids"], data["topk"], frozenset(range(len(runtime.head_names))),
            batch_size):
        sums.add(live, values, candidates, logp0, chosen)
    return {name: sums.summary(h, torch.tensor(data["rewards"][name], dtype=torch.float64), kl)
            for h, name in enumerate(runtime.head_names) if name in data["rewards"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data")
    p.add_argument("out", type=Path)
    p.add_argument("--top-k", type=int, default=20, help="base log-probs kept per step")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="base-model dtype (float32 where bfloat16 is emulated: x86 without AVX512-BF16 or AMX)")
    p = sub.add_parser("score")
    p.add_argument("data", type=Path)
    p.add_argument("models", nargs="+")
    p.add_argument("--kl", type=float, default=math.log(4) - 3 / 4, help="KL (nats) for gain_at_kl; default BoN-4's")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="value-model dtype (the server runs the demo models in bfloat16)")
    p.add_argument("--top-k", type=int, help="VAS candidates per step (default: all the data has)")
    p.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.command == "data":
        make_data(args.out, args.top_k, dtype=args.dtype)
        return
    data = json.loads(args.data.read_text())
    have = min(len(ids) for steps in data["topk"] for ids, _ in steps)
    top_k = args.top_k or have
    if not 1 <= top_k <= have:
        parser.error(f"--top-k must be in 1..{have}: the data keeps {have} candidates per step")
    data["topk"] = [[(ids[:top_k], lps[:top_k]) for ids, lps in steps] for steps in data["topk"]]
    results = {m: score(m, data, args.kl, dtype=args.dtype) for m in args.models}
    print(f"{'value model':40} {'head':10} {'corr(S,r)':>10} {'gain@KL':>8} {'w@KL':>6}   (KL {args.kl:.2f}, K {top_k})")
    for model, heads in results.items():
        for head, r in heads.items():
            print(f"{model:40} {head:10} {r['corr']:10.3f} {r['gain_at_kl']:8.3f} {r['weight_at_kl']:6.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"kl": args.kl, "dtype": args.dtype, "top_k": top_k, "responses": len(data["token_ids"]),
                  "models": results}
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
