"""Decode throughput of plain vLLM against VAS.

Setup: the embedded SmolLM2-135M-Instruct base; value models with a `base_prefix` trunk of the
base's first 6 layers and random heads (throughput does not depend on what heads learned);
1 and 3 heads; token heads; state heads with K = 5 and 20; batch 1, 8 and 32; 64 new tokens.
Also times a one-forward-per-candidate loop like the paper's public code (HF transformers, no
value cache, every candidate recomputed), for contrast.

    python benchmarks/throughput.py [--batches 1 8 32] [--tokens 64] [--out benchmarks/results/throughput.json]

Prints a table and writes JSON. Ratios are to plain vLLM measured in the same run.

`--shared` runs the shared-trunk benchmark instead: token-head models that read the
base's own layer-N hidden states (N = 6 and N = all 30 layers), 1 and 3 heads, against plain vLLM
at every batch size; value-model memory per request on both paths; and a context-length sweep
(prompt lengths `--contexts`, batch `--context-batch`) for plain vLLM, the shared path and the
separate runtime (same heads on the same 6-layer trunk, plus a state head so that it cannot take
the shared path). `--compiled` runs every engine on vLLM's compiled forward (torch.compile with
inductor, vLLM's default) instead of eager mode; `--contexts` with no lengths skips the sweep:

    python benchmarks/throughput.py --shared --batches 1 8 32 128 --tokens 32 --contexts \
        [--compiled] --out benchmarks/results/default_path_{eager,compiled}.json

Under tensor parallelism (a random base of SmolLM2's size whose heads TP divides, TP = 1 for contrast):

    python benchmarks/throughput.py --shared --random-base --tensor-parallel-size {2,1} --batches 1 8 32 \
        --tokens 32 --contexts --out benchmarks/results/shared_tp{2,1}_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "Tell me about your favourite holiday.", "What do you think of rainy days?",
    "Write a short note to a friend.", "How was your weekend?", "Describe a cat in two sentences.",
    "What should I cook tonight?", "Give me advice for a job interview.", "Why is the sky blue?",
]

# name -> (heads [(name, kind)], top_k)
CONFIGS = {
    "token x1": ([("tok1", "token")], 20),
    "token x3": ([("tok1", "token"), ("tok2", "token"), ("tok3", "token")], 20),
    "state x1 K=5": ([("st1", "state")], 5),
    "state x3 K=5": ([("st1", "state"), ("st2", "state"), ("st3", "state")], 5),
    "state x1 K=20": ([("st1", "state")], 20),
    "state x3 K=20": ([("st1", "state"), ("st2", "state"), ("st3", "state")], 20),
}


# name -> (value model, heads); both value models have token heads only on a LoRA-free prefix.
SHARED_CONFIGS = {
    "token x1 shared": ("shared6", ["a1"]),
    "token x3 shared": ("shared6", ["a1", "a2", "a3"]),
    "token x1 shared, N=all": ("shared30", ["b1"]),
    "token x3 shared, N=all": ("shared30", ["b1", "b2", "b3"]),
}


# Unsteered requests in the shared-path engine: the reference that runs interleaved with the VAS rows.
SAME_ENGINE_PLAIN = "unsteered, VAS engine"


def shared_engine_configs() -> dict:
    """What runs in the shared-path engine: unsteered requests, then each SHARED_CONFIGS entry
    (weight 1 on each of its heads), as name -> extra_args."""
    from vas_server.params import make_extra_args

    return {SAME_ENGINE_PLAIN: None,
            **{name: make_extra_args({h: 1.0 for h in heads}) for name, (_, heads) in SHARED_CONFIGS.items()}}


def build_shared_value_models(base: Path, root: Path) -> dict[str, str]:
    import json

    from vas_server.core.format import TrunkSpec
    from value_models.synthetic import random_value_model

    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    return {
        "shared6": str(random_value_model(root / "shared6", base, [(f"a{i}", "token") for i in (1, 2, 3)], seed=3,
                                          trunk=TrunkSpec("base_prefix", num_layers=6))),
        "shared30": str(random_value_model(root / "shared30", base, [(f"b{i}", "token") for i in (1, 2, 3)], seed=4,
                                           trunk=TrunkSpec("base_prefix", num_layers=layers))),
        # Separate runtime: the same kind of token head on the same 6-layer trunk, plus a state head.
        "separate6": str(random_value_model(root / "separate6", base, [("c1", "token"), ("cs", "state")], seed=5,
                                            trunk=TrunkSpec("base_prefix", num_layers=6))),
    }


def dtype_arg(args) -> dict:
    """`--dtype` if given; else none, so that the engine takes the dtype `vas-server serve` would
    (float32 on an x86 CPU without native bfloat16, the checkpoint's bfloat16 elsewhere)."""
    return {"dtype": args.dtype} if args.dtype else {}


def long_prompts(llm, n: int, length: int) -> list[dict]:
    """n prompts of exactly `length` tokens: chat prompts repeated and cut (contents do not matter)."""
    ids = [chat_ids(llm.get_tokenizer(), p) for p in PROMPTS]
    return [{"prompt_token_ids": (ids[i % len(ids)] * (length // len(ids[i % len(ids)]) + 1))[:length]}
            for i in range(n)]


def generate_seconds(llm, prompts: list[dict], new_tokens: int, extra_args) -> float:
    """Wall time of one `generate` call (prefill included), every prompt getting exactly `new_tokens`."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.8, seed=0, max_tokens=new_tokens, ignore_eos=True, extra_args=extra_args)
    start = time.perf_counter()
    out = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in out)
    return seconds


def timed_generate(llm, prompts: list[dict], new_tokens: int, extra_args, repeats: int) -> float:
    """Tokens/s (new tokens / wall time, prefill included), best of `repeats` after a warm-up."""
    generate_seconds(llm, prompts[:1], new_tokens, extra_args)  # warm-up
    best = min(generate_seconds(llm, prompts, new_tokens, extra_args) for _ in range(repeats))
    return len(prompts) * new_tokens / best


def steering_seconds(llm) -> float:
    """The VAS processor's own time so far (candidates, value heads, logits update), from the worker."""
    return llm.collective_rpc("vas_stats")[0]["runtime_seconds_total"]


def interleaved_tokens_per_second(llm, configs: dict, batches: list[int], new_tokens: int, repeats: int
                                  ) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """Tokens/s of each config (name -> extra_args) at each batch size, best of `repeats` rounds,
    the configs taking turns within each round: every config then runs under the same machine
    speed, so a drift of that speed (large on a shared 2-core VM) does not enter the ratios.

    Also returns each config's steering share: the processor's own time over the wall time of its
    timed runs. It is measured inside the step, so machine noise scales both alike; it is the
    precise form of "what VAS costs" when the throughput ratios are within noise of 1."""
    best: dict[str, dict[int, float]] = {name: {} for name in configs}
    share: dict[str, dict[int, float]] = {name: {} for name in configs}
    for b in batches:
        prompts = chat_prompts(llm, b)
        for extra in configs.values():
            generate_seconds(llm, prompts[:1], new_tokens, extra)  # warm-up
        wall = {name: 0.0 for name in configs}
        steer = {name: 0.0 for name in configs}
        for _ in range(repeats):
            for name, extra in configs.items():
                before = steering_seconds(llm)
                seconds = generate_seconds(llm, prompts, new_tokens, extra)
                steer[name] += steering_seconds(llm) - before
                wall[name] += seconds
                best[name][b] = max(best[name].get(b, 0.0), b * new_tokens / seconds)
        for name in configs:
            share[name][b] = steer[name] / wall[name]
        print(f"  b={b}: " + ", ".join(f"{name} {row[b]:.1f} ({share[name][b]:.2%} steering)"
                                       for name, row in best.items()), flush=True)
    return best, share


def random_smollm2_shape(smollm2: Path, out: Path) -> Path:
    """A random Llama of SmolLM2-135M's shape (30 layers, MLP 1536, its tokenizer and vocabulary)
    with 8 query and 4 KV heads of 64 (hidden 512) instead of 9 and 3, so that tensor parallelism
    at 2 and 4 divides them. Decode speed does not depend on the weights."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(smollm2)
    config.update(dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64))
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)  # as SmolLM2 ships
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(out)
    return out


def shared_main(args) -> None:
    """The shared-trunk benchmark: the shared-trunk path against plain vLLM, memory, context sweep."""
    from vllm import LLM

    from vas_server.core.base_model import ensure_base_model
    from vas_server.config import VASConfig
    from vas_server.engine_args import engine_dtype, engine_kwargs
    from vas_server.params import make_extra_args

    root = Path(tempfile.mkdtemp(prefix="vas-bench-"))
    base = random_smollm2_shape(ensure_base_model(), root / "base") if args.random_base else ensure_base_model()
    models = build_shared_value_models(base, root)
    max_len = max(args.contexts or [448]) + args.tokens
    # --compiled: vLLM's own default forward (torch.compile with inductor; CUDA graphs on GPUs).
    common = dict(max_model_len=max_len, seed=0, disable_log_stats=True, enforce_eager=not args.compiled,
                  tensor_parallel_size=args.tensor_parallel_size, **dtype_arg(args))
    shared_only = {k: models[k] for k in ("shared6", "shared30")}
    results: dict[str, dict[int, float]] = {}
    sweep: dict[str, dict[int, float]] = {}

    # One engine at a time: on CPU an idle vLLM engine keeps polling, which would slow the others.
    # Neither the plain nor the shared engine is given max_num_seqs: vLLM's default (256 on CPU).
    def measure(name, llm, extra, batches=True, context=True):
        if batches:
            results[name] = {b: timed_generate(llm, chat_prompts(llm, b), args.tokens, extra, args.repeats)
                             for b in args.batches}
            print(f"  {name}: " + ", ".join(f"b={b} {v:.1f}" for b, v in results[name].items()), flush=True)
        if context and args.contexts:
            sweep[name] = {n: timed_generate(llm, long_prompts(llm, args.context_batch, n), args.tokens, extra,
                                             args.repeats) for n in args.contexts}
            print(f"  {name}: " + ", ".join(f"prompt {n} {v:.1f}" for n, v in sweep[name].items()), flush=True)

    # Plain vLLM is measured before and after the VAS engines; the ratios use the faster of the
    # two runs (the conservative choice) and the table shows both, so that a drift of the
    # machine's speed during the run is visible instead of hidden in the ratios.
    max_num_seqs = {}

    def measure_plain(name):
        llm = LLM(**engine_kwargs(str(base), None, **common))
        max_num_seqs["plain"] = llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        dtype = engine_dtype(llm)
        measure(name, llm, None)
        llm.llm_engine.engine_core.shutdown()
        del llm
        return dtype

    dtype = measure_plain("plain vLLM (before)")

    llm = LLM(**engine_kwargs(str(base), VASConfig(value_models=shared_only), **common))
    max_num_seqs["shared"] = llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
    # Within this engine, unsteered requests and each shared config take turns at every batch size.
    configs = shared_engine_configs()
    rates, steering_share = interleaved_tokens_per_second(llm, configs, args.batches, args.tokens, args.repeats)
    results.update(rates)
    measure("token x1 shared", llm, configs["token x1 shared"], batches=False)
    shared_stats = llm.collective_rpc("vas_stats")[0]
    llm.llm_engine.engine_core.shutdown()
    del llm

    # Separate runtime: context sweep only (engine_kwargs caps it at its 32-slot value cache).
    separate_stats = None
    if args.contexts:
        llm = LLM(**engine_kwargs(str(base), VASConfig(value_models={"separate6": models["separate6"]}), **common))
        max_num_seqs["separate"] = llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        measure("token x1 separate", llm, make_extra_args({"c1": 1.0}), batches=False)
        separate_stats = llm.collective_rpc("vas_stats")[0]
        llm.llm_engine.engine_core.shutdown()
        del llm

    measure_plain("plain vLLM (after)")
    runs = [k for k in results if k.startswith("plain vLLM")]
    plain = {b: max(results[k][b] for k in runs) for b in args.batches}
    plain_sweep = {n: max(sweep[k][n] for k in runs) for n in args.contexts or []}
    header = f"{'config':<24}" + "".join(f"{'b=' + str(b):>10}{'ratio':>7}" for b in args.batches)
    lines = [f"dtype {dtype}; ratios to the faster plain run at each size", header, "-" * len(header)]
    for name, row in results.items():
        lines.append(f"{name:<24}" + "".join(f"{row[b]:>10.1f}{row[b] / plain[b]:>7.3f}" for b in args.batches))
    same = results[SAME_ENGINE_PLAIN]
    lines += ["", "interleaved in the VAS engine: ratio to its unsteered requests (same rounds)"]
    for name in SHARED_CONFIGS:
        lines.append(f"{name:<24}" + "".join(f"{'':>10}{results[name][b] / same[b]:>7.3f}" for b in args.batches))
    lines += ["", "steering share: the VAS processor's own time / wall time of the timed runs"]
    for name in SHARED_CONFIGS:
        lines.append(f"{name:<24}" + "".join(f"{'':>10}{steering_share[name][b]:>7.2%}" for b in args.batches))
    if args.contexts:
        lines += ["", f"context sweep, batch {args.context_batch}: tokens/s (ratio to plain)"]
        for name, row in sweep.items():
            lines.append(f"{name:<24}" + "".join(f"{n:>7} tok {row[n]:>8.1f} ({row[n] / plain_sweep[n]:.3f})"
                                                  for n in args.contexts))
        per_request = separate_stats["cache_bytes"] / separate_stats["cache_slots_total"]
        lines += ["", f"value-model memory per request: shared {shared_stats['cache_bytes']} B; separate "
                      f"{per_request:.0f} B ({max_len} tokens x 6 layers of K/V), max_num_seqs {max_num_seqs}"]
    print("\n".join(lines))

    out = {
        "command": "python benchmarks/throughput.py --shared " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k in ("batches", "tokens", "repeats", "contexts", "context_batch", "dtype")
            and v is not None) + (" --compiled" if args.compiled else ""),
        "forward": "compiled (torch.compile, inductor)" if args.compiled else "eager",
        "dtype": dtype,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": __import__("os").cpu_count()},
        "new_tokens": args.tokens,
        "tokens_per_second": {n: {str(b): v for b, v in row.items()} for n, row in results.items()},
        "ratio_to_plain": {n: {str(b): v / plain[b] for b, v in row.items()} for n, row in results.items()},
        "ratio_to_unsteered_same_engine_interleaved": {n: {str(b): results[n][b] / same[b] for b in args.batches}
                                                       for n in SHARED_CONFIGS},
        "steering_share": {n: {str(b): steering_share[n][b] for b in args.batches} for n in SHARED_CONFIGS},
        "context_sweep": {"batch": args.context_batch,
                          "tokens_per_second": {n: {str(c): v for c, v in row.items()} for n, row in sweep.items()},
                          "ratio_to_plain": {n: {str(c): v / plain_sweep[c] for c, v in row.items()}
                                             for n, row in sweep.items()}},
        "value_memory_bytes_per_request": {"shared": shared_stats["cache_bytes"],
                                           "separate": per_request if args.contexts else None,
                                           "separate_max_model_len": max_len},
        "max_num_seqs": max_num_seqs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


def build_value_models(base: Path, root: Path) -> dict[str, str]:
    from vas_server.core.format import TrunkSpec
    from value_models.synthetic import random_value_model

    trunk = TrunkSpec("base_prefix", num_layers=6)
    return {
        "tokens": str(random_value_model(root / "tokens", base, [(f"tok{i}", "token") for i in (1, 2, 3)],
                                         seed=1, trunk=trunk)),
        "states": str(random_value_model(root / "states", base, [(f"st{i}", "state") for i in (1, 2, 3)],
                                         seed=2, trunk=trunk)),
    }


def chat_ids(tok, text: str) -> list[int]:
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return tok.encode(prompt, add_special_tokens=False)


def chat_prompts(llm, n: int) -> list[dict]:
    ids = [chat_ids(llm.get_tokenizer(), p) for p in PROMPTS]
    return [{"prompt_token_ids": ids[i % len(ids)]} for i in range(n)]


def tokens_per_second(llm, batch: int, new_tokens: int, extra_args, repeats: int) -> float:
    return timed_generate(llm, chat_prompts(llm, batch), new_tokens, extra_args, repeats)


def paper_loop_tokens_per_second(base: Path, value_model: str, head: str, top_k: int, new_tokens: int) -> float:
    """Batch 1, HF transformers: a base forward, then one value forward per candidate, no caches."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vas_server.core.model import load_value_model

    tok = AutoTokenizer.from_pretrained(str(base))
    lm = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    vm = load_value_model(value_model, base)
    g = vm.value_heads.state.names.index(head)
    s = chat_ids(tok, PROMPTS[0])
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = lm(torch.tensor([s])).logits[0, -1]
            top = torch.topk(logits, top_k)
            q = torch.stack([vm.value_heads.state(vm.trunk.forward_causal(torch.tensor([s + [a]]))[0, -1])[g]
                             for a in top.indices.tolist()])
            s.append(int(top.indices[torch.argmax(top.values + (q - q.mean()))]))
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--paper-tokens", type=int, default=16)
    ap.add_argument("--out", help="default: benchmarks/results/throughput.json (shared_trunk.json with --shared)")
    ap.add_argument("--shared", action="store_true", help="the shared-trunk benchmark instead")
    ap.add_argument("--contexts", type=int, nargs="*", default=[64, 512, 2048],
                    help="--shared: prompt lengths of the context sweep (none: no sweep, no separate runtime)")
    ap.add_argument("--compiled", action="store_true",
                    help="--shared: vLLM's compiled forward (enforce_eager=False) instead of eager mode")
    ap.add_argument("--context-batch", type=int, default=8, help="--shared: batch of the context sweep")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="--shared: every engine at this TP size")
    ap.add_argument("--random-base", action="store_true",
                    help="--shared: a random Llama of SmolLM2's size with 8 query / 4 KV heads (TP 2 and 4 divide them; "
                         "SmolLM2's 9 / 3 heads do not)")
    ap.add_argument("--dtype", help="engine dtype (default: the one `vas-server serve` picks on this machine)")
    args = ap.parse_args()
    if args.shared:
        args.out = args.out or "benchmarks/results/shared_trunk.json"
        return shared_main(args)
    args.out = args.out or "benchmarks/results/throughput.json"

    from vllm import LLM

    from vas_server.core.base_model import ensure_base_model
    from vas_server.config import VASConfig
    from vas_server.engine_args import engine_kwargs
    from vas_server.params import make_extra_args

    base = ensure_base_model()
    common = dict(max_model_len=1024, max_num_seqs=max(args.batches), seed=0, disable_log_stats=True,
                  **dtype_arg(args))
    results: dict[str, dict[int, float]] = {}

    llm = LLM(**engine_kwargs(str(base), None, **common))
    results["plain vLLM"] = {b: tokens_per_second(llm, b, args.tokens, None, args.repeats) for b in args.batches}
    llm.llm_engine.engine_core.shutdown()
    del llm

    root = Path(tempfile.mkdtemp(prefix="vas-bench-"))
    value_models = build_value_models(base, root)
    llm = LLM(**engine_kwargs(str(base), VASConfig(value_models=value_models), **common))
    for name, (heads, top_k) in CONFIGS.items():
        extra = make_extra_args({h: 1.0 for h, _ in heads}, top_k=top_k)
        results[name] = {b: tokens_per_second(llm, b, args.tokens, extra, args.repeats) for b in args.batches}
        print(f"  {name}: " + ", ".join(f"b{b} {v:.1f}" for b, v in results[name].items()), flush=True)
    stats = llm.collective_rpc("vas_stats")[0]
    llm.llm_engine.engine_core.shutdown()
    del llm

    paper = {k: paper_loop_tokens_per_second(base, value_models["states"], "st1", k, args.paper_tokens) for k in (5, 20)}

    plain = results["plain vLLM"]
    header = f"{'config':<16}" + "".join(f"{'b=' + str(b) + ' tok/s':>14}{'ratio':>8}" for b in args.batches)
    lines = [header, "-" * len(header)]
    for name, row in results.items():
        lines.append(f"{name:<16}" + "".join(f"{row[b]:>14.1f}{row[b] / plain[b]:>8.2f}" for b in args.batches))
    for k, v in paper.items():
        lines.append(f"{'paper loop K=' + str(k):<16}{v:>14.1f}{v / plain[args.batches[0]] if args.batches[0] == 1 else float('nan'):>8.2f}"
                     "   (batch 1, HF, one value forward per candidate)")
    print("\n".join(lines))

    out = {
        "command": "python benchmarks/throughput.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": __import__("os").cpu_count()},
        "new_tokens": args.tokens,
        "tokens_per_second": {n: {str(b): v for b, v in row.items()} for n, row in results.items()},
        "ratio_to_plain": {n: {str(b): v / plain[b] for b, v in row.items()} for n, row in results.items()},
        "paper_loop_batch1_tokens_per_second": {str(k): v for k, v in paper.items()},
        "value_runtime": {"steps": stats["steps"], "seconds": stats["runtime_seconds_total"]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
