"""A reduced shared-trunk throughput check: one engine per process, a few batch sizes, best of 2 timed runs.

    python benchmarks/shared_quick.py plain  MAX_LEN NEW_TOKENS BATCH [BATCH ...] [--dtype D]
    python benchmarks/shared_quick.py shared MAX_LEN NEW_TOKENS BATCH [BATCH ...] [--dtype D]

`plain` times plain vLLM; `shared` times, in one engine, unsteered requests and token heads on the
base's own layer 6 and layer 30 (all layers) hidden states, 1 and 3 heads, taking turns at each
batch size, with each config's steering share (the VAS processor's own time over wall time).
Prints a RESULT line (JSON) and writes /tmp/tp_<mode>_<max_len>.json. `benchmarks/throughput.py
--shared` is the full benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from throughput import (  # noqa: E402
    build_shared_value_models, chat_prompts, dtype_arg, interleaved_tokens_per_second, shared_engine_configs,
    timed_generate,
)


def main() -> None:
    from vllm import LLM

    from vas_server.core.base_model import ensure_base_model
    from vas_server.config import VASConfig
    from vas_server.engine_args import engine_kwargs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("plain", "shared"))
    ap.add_argument("max_len", type=int)
    ap.add_argument("new_tokens", type=int)
    ap.add_argument("batches", type=int, nargs="+")
    ap.add_argument("--dtype", help="engine dtype (default: the one `vas-server serve` picks on this machine)")
    args = ap.parse_args()
    mode, max_len, new_tokens, batches = args.mode, args.max_len, args.new_tokens, args.batches
    base = ensure_base_model()
    common = dict(max_model_len=max_len, seed=0, disable_log_stats=True, **dtype_arg(args))
    if mode == "plain":
        llm = LLM(**engine_kwargs(str(base), None, **common))
        out = {"plain": {b: timed_generate(llm, chat_prompts(llm, b), new_tokens, None, 2) for b in batches}}
    else:
        models = build_shared_value_models(base, Path(tempfile.mkdtemp(prefix="vas-bench-")))
        vas = VASConfig(value_models={k: models[k] for k in ("shared6", "shared30")})
        llm = LLM(**engine_kwargs(str(base), vas, **common))
        rates, share = interleaved_tokens_per_second(llm, shared_engine_configs(), batches, new_tokens, 2)
        out = {"tokens_per_second": rates, "steering_share": share}
    print("RESULT", json.dumps(out), flush=True)
    Path(f"/tmp/tp_{mode}_{max_len}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
