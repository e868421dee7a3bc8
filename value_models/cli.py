"""`vas-train` / `python -m value_models`: sample, score, fit and convert value models.

    vas-train sample --chitchat train --num-prompts 1000 --out data/samples.jsonl
    vas-train score data/samples.jsonl --reward positive --reward concise
    vas-train fit data/samples.jsonl --head positive:token --num-layers 4 --out vas_server/demo/positive
    vas-train convert-trl path/to/trl_checkpoint --out my_value_model
    vas-train eval vas_server/demo/smollm2 --num-prompts 200 --max-tokens 40 --out eval_out

The base defaults to the embedded SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _base_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from vas_server.core.base_model import ensure_base_model

    return ensure_base_model()


def _cmd_sample(args) -> None:
    from value_models.prompts import chitchat_prompts, pick, read_prompts
    from value_models.records import write_samples
    from value_models.sample import sample

    if bool(args.prompts) == bool(args.chitchat):
        sys.exit("give exactly one of --prompts FILE or --chitchat {train,heldout}")
    prompts = read_prompts(args.prompts) if args.prompts else chitchat_prompts(args.chitchat)
    prompts = pick(prompts, args.num_prompts, seed=args.seed)
    if bool(args.value_model) != bool(args.weight):
        sys.exit("steered sampling needs both --value-model DIR and --weight NAME=W")
    samples = sample(_base_dir(args.base), prompts, samples_per_prompt=args.samples_per_prompt,
                     max_tokens=args.max_tokens, seed=args.seed, dtype=args.dtype, max_model_len=args.max_model_len,
                     first_sample=args.first_sample, value_model=args.value_model,
                     weights=dict(args.weight or []), top_k=args.top_k, record_top_k=args.record_top_k,
                     **({"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else {}))
    write_samples(args.out, samples)
    print(f"wrote {len(samples)} samples to {args.out}")


def _cmd_score(args) -> None:
    from value_models.records import read_samples, write_samples
    from value_models.score import score

    samples = read_samples(args.samples)
    score(samples, args.reward)
    write_samples(args.out or args.samples, samples)
    for spec in args.reward:
        values = [s.rewards[spec] for s in samples]
        mean = sum(values) / len(values)
        print(f"{spec}: mean {mean:.4f} over {len(values)} samples")


def _parse_head(text: str):
    """NAME:KIND[:REWARD] -- the reward defaults to NAME."""
    from value_models.rewards import describe
    from value_models.train import HeadPlan

    parts = text.split(":", 2)  # the reward spec may hold colons itself (module:function, hf:C:/dir)
    if len(parts) < 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"--head {text!r}: expected NAME:KIND[:REWARD], e.g. positive:token or "
                                         "food:token:mymodule:food_words")
    reward = parts[2] if len(parts) == 3 else parts[0]
    try:
        return HeadPlan(parts[0], parts[1], reward, describe(reward))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cmd_fit(args) -> None:
    from value_models.records import read_samples
    from value_models.train import FitConfig, fit
    from value_models.training_trunk import TrunkPlan

    samples = [s for path in args.samples for s in read_samples(path)]
    if args.standalone:
        trunk = TrunkPlan("standalone", args.standalone, num_layers=args.num_layers, train_trunk=args.train_trunk)
    else:
        trunk = TrunkPlan("base_prefix", str(_base_dir(args.base)), num_layers=args.num_layers, lora_r=args.lora_r,
                          lora_alpha=args.lora_alpha)
    config = FitConfig(heads=args.head, trunk=trunk, lam=args.lam, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, token_proj_lr=args.token_proj_lr, trunk_lr=args.trunk_lr,
                       lr_decay=args.lr_decay, soft_beta=args.soft_beta, passes_per_batch=args.passes, seed=args.seed,
                       checkpoint_every=args.checkpoint_every, extra={"samples": [Path(p).name for p in args.samples]},
                       default_top_k=args.default_top_k, validation_fraction=args.validation_fraction)
    result = fit(samples, config, args.out, states_cache=args.states_cache)
    last = next((c["loss"] for c in reversed(result.curve) if "loss" in c), {})
    check = next((c for c in reversed(result.curve) if "validation" in c), {})
    print(f"saved {result.path} after {result.steps} steps; last losses {last}"
          + (f"; held-out Monte-Carlo return error {check['validation']}" if check else "")
          + (f"; steering proxy corr(S, r) {check['proxy_corr']}" if "proxy_corr" in check else ""))


def _cmd_convert_trl(args) -> None:
    from value_models.trl import convert_trl

    base_identity = None
    if args.base:
        from transformers import AutoTokenizer

        from vas_server.core.format import tokenizer_identity

        base_identity = tokenizer_identity(AutoTokenizer.from_pretrained(args.base))
    path = convert_trl(args.trl_dir, args.out, head_name=args.head_name, reward_mean=args.reward_mean,
                       reward_std=args.reward_std, base_tokenizer=base_identity)
    print(f"wrote {path}")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _head_weight(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if sep and name:
            return name, float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT, e.g. positive=2.2, got {text!r}")


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _cmd_eval(args) -> None:
    from value_models.evaluate import EvalConfig, evaluate
    from value_models.prompts import chitchat_prompts, pick, read_prompts

    prompts = read_prompts(args.prompts) if args.prompts else chitchat_prompts(args.chitchat)
    prompts = pick(prompts, args.num_prompts, seed=args.seed)
    rewards = {}
    for item in args.reward or []:
        head, sep, spec = item.partition("=")
        if not sep:
            sys.exit(f"--reward {item!r}: expected HEAD=SPEC, e.g. positive=positive")
        rewards[head] = spec
    config = EvalConfig(value_model=args.value_model, base=str(_base_dir(args.base)), prompts=prompts,
                        weights=args.weights, grid_heads=args.grid_heads, grid_weights=args.grid_weights,
                        bon=args.bon, bon_prompts=args.bon_prompts, rewards=rewards or None, heads=args.heads,
                        max_tokens=args.max_tokens,
                        top_k=args.top_k, seed=args.seed, dtype=args.dtype, max_model_len=args.max_model_len,
                        max_num_seqs=args.max_num_seqs)
    report = evaluate(config, args.out, generations_dir=args.generations)
    for head, check in report["checks"].items():
        print(f"{head}: monotonic={check['monotonic']} negative_lowers={check['negative_lowers']} "
              + " ".join(f"{k}={v}" for k, v in check.items() if k.startswith("beats_")))
    print(f"wrote {args.out}/eval.json, eval.md and plots")


def _add_sample(sub) -> None:
    from value_models.sample import DEFAULT_RECORD_TOP_K

    p = sub.add_parser("sample", help="sample responses from the frozen base model")
    p.add_argument("--base", help="base model HF directory (default: the embedded SmolLM2)")
    p.add_argument("--prompts", help="prompts file: .jsonl with a 'prompt' field, or text, one per line")
    p.add_argument("--chitchat", choices=["train", "heldout"], help="use a split of the chitchat-dataset prompts")
    p.add_argument("--num-prompts", type=int, help="how many prompts (a seeded random choice); default all")
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--first-sample", type=int, default=0,
                   help="index of each prompt's first sample (its seed); e.g. 2 adds samples 2, 3, ... to a set of 0, 1")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--dtype", help="engine dtype (default: the one `vas-server serve` picks on this machine: the checkpoint's, or float32 on an x86 CPU that emulates bfloat16); printed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--value-model", help="sample with VAS steered by this value model (iterated values) "
                                         "instead of from the base; needs --weight")
    p.add_argument("--weight", action="append", type=_head_weight, help="NAME=W: a head's VAS weight (repeatable)")
    p.add_argument("--top-k", type=int, help="VAS candidates per step (default: the value model's default_top_k)")
    p.add_argument("--max-num-seqs", type=int, help="requests decoded at once (default: vLLM's; with --value-model "
                                                    "the server's 32)")
    p.add_argument("--record-top-k", type=int, default=DEFAULT_RECORD_TOP_K,
                   help="keep each step's top-K base candidates and raw log-probs in the records (`topk`), the data "
                        "of the steering proxy `fit` reports on its held-out split (default %(default)s; 0: none)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_sample)


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="add rewards to sampled responses")
    p.add_argument("samples")
    p.add_argument("--reward", action="append", required=True,
                   help="positive | concise | simple | clean | module:function | hf:DIR[#label] (repeatable)")
    p.add_argument("--out", help="output JSONL (default: rewrite the input)")
    p.set_defaults(func=_cmd_score)


def _add_fit(sub) -> None:
    from value_models.train import LR_DECAYS, FitConfig

    p = sub.add_parser("fit", help="TD(lambda) training of a value model")
    p.add_argument("samples", nargs="+", help="scored samples (JSONL); several files are used in the given order")
    p.add_argument("--head", action="append", required=True, type=_parse_head,
                   help="NAME:KIND[:REWARD], kind state or token; REWARD is any reward spec, colons included "
                        "(positive, mymodule:my_function, hf:DIR); default NAME (repeatable: heads share the trunk)")
    p.add_argument("--base", help="base model HF directory for a base_prefix trunk (default: the embedded SmolLM2)")
    p.add_argument("--num-layers", type=int, help="base layers kept by a base_prefix trunk (or standalone layers)")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank on a base_prefix trunk (0: frozen trunk)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--standalone", help="HF directory of a standalone trunk (instead of a base prefix)")
    p.add_argument("--train-trunk", action="store_true", help="fine-tune every weight of the standalone trunk")
    p.add_argument("--lam", type=float, default=0.95)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--token-proj-lr", type=float, default=FitConfig.token_proj_lr,
                   help="learning rate of token heads' projection (default %(default)g, the demo heads'); values "
                        "move ~ lr * |h|_1 * |E|_1 per step, so it is far below --lr")
    p.add_argument("--trunk-lr", type=float, default=1e-4)
    p.add_argument("--lr-decay", choices=LR_DECAYS, default="constant",
                   help="learning-rate schedule: constant, or linear decay to 0 at the last step")
    p.add_argument("--soft-beta", type=float, default=0.0,
                   help="0 (default): the spec's squared error, the base policy's values. B != 0: soft values "
                        "(1/B) log E[exp(B G)], the KL-regularised optimum's values for steering at weight B")
    p.add_argument("--passes", type=int, default=2, help="passes per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--states-cache", help="directory that keeps a frozen trunk's hidden states between fits on the same "
                                          "data (refitting heads then skips the trunk)")
    p.add_argument("--default-top-k", type=int, help="record the top-K the model steers best with (chosen by "
                                                     "evaluation) in vas.json; the server uses it for requests "
                                                     "without vas_top_k (default: none, so the spec's 20)")
    p.add_argument("--validation-fraction", type=float, default=0.05,
                   help="responses held out of training to report the Monte-Carlo return error before training "
                        "and after each epoch, with a warning when it rises (0: none; fewer than 8: none)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_fit)


def _add_convert_trl(sub) -> None:
    p = sub.add_parser("convert-trl", help="import a TRL AutoModelForCausalLMWithValueHead checkpoint")
    p.add_argument("trl_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--head-name", default="value")
    p.add_argument("--reward-mean", type=float, default=0.0)
    p.add_argument("--reward-std", type=float, default=1.0)
    p.add_argument("--base", help="refuse the checkpoint unless it shares this base model's tokenizer")
    p.set_defaults(func=_cmd_convert_trl)


def _add_eval(sub) -> None:
    from value_models.evaluate import DEFAULT_BON, DEFAULT_GRID_WEIGHTS, DEFAULT_WEIGHTS

    p = sub.add_parser("eval", help="VAS at several weights vs Best-of-N on held-out prompts (JSON, Markdown, PNG)")
    p.add_argument("value_model", help="value-model checkpoint directory")
    p.add_argument("--base", help="base model HF directory (default: the embedded SmolLM2)")
    p.add_argument("--prompts", help="prompts file (.jsonl with a 'prompt' field, or text); default: chitchat heldout")
    p.add_argument("--chitchat", choices=["train", "heldout"], default="heldout")
    p.add_argument("--num-prompts", type=int, default=200, help="a seeded random choice of prompts")
    p.add_argument("--heads", type=_names, help="comma-separated heads to evaluate (default: all)")
    p.add_argument("--weights", type=_floats, default=list(DEFAULT_WEIGHTS), help="comma-separated weights per head")
    p.add_argument("--grid-heads", type=_names, help="two comma-separated heads for the grid (default: first two)")
    p.add_argument("--grid-weights", type=_floats, default=list(DEFAULT_GRID_WEIGHTS))
    p.add_argument("--bon", type=_ints, default=list(DEFAULT_BON), help="Best-of-N sizes")
    p.add_argument("--bon-prompts", type=_ints, help="comma-separated, one per --bon size: Best-of-N on the first "
                                                     "M prompts only (default: all), e.g. 200,200,50")
    p.add_argument("--reward", action="append", help="HEAD=SPEC: score a head with this reward (default: the "
                                                      "reward the head was trained on)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--top-k", type=int, help="VAS candidates per step (default: the value model's default_top_k "
                                              "from its vas.json, else 20)")
    p.add_argument("--dtype", help="engine dtype (default: the one `vas-server serve` picks on this machine: the checkpoint's, or float32 on an x86 CPU that emulates bfloat16); printed")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--generations", help="where each run's responses are kept (default: OUT/generations); "
                                         "evaluations sharing it reuse the base run, e.g. at another --top-k")
    p.set_defaults(func=_cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vas-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_sample, _add_score, _add_fit, _add_convert_trl, _add_eval):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:  # bad input (a reward spec, scores, samples): the message, no traceback
        sys.exit(f"vas-train {args.command}: {e}")


if __name__ == "__main__":
    main()
