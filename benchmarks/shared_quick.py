"""A reduced shared-trunk throughput check: one engine per process, a few batch sizes, best of 2 timed runs.

    python benchmarks/shared_quick.py plain  MAX_LEN NEW_TOKENS BATCH [BATCH ...]
    python benchmarks/shared_quick.py shared MAX_LEN NEW_TOKENS BATCH [BATCH ...]

`plain` times plain vLLM; `shared` times token heads on the base's own layer 6 and layer 30 (all
layers) hidden states, 1 and 3 heads, on one engine (benchmarks/throughput.py builds the models).
Prints a RESULT line per configuration (tokens/s by batch) and writes /tmp/tp_<mode>_<max_len>.json;
run both modes back to back and divide. `benchmarks/throughput.py --shared` is the full benchmark.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from throughput import build_shared_value_models, chat_prompts, timed_generate  # noqa: E402


def main() -> None:
    from vllm import LLM

    from vas_server.base_model import ensure_base_model
    from vas_server.config import VASConfig
    from vas_server.engine import engine_kwargs
    from vas_server.params import make_extra_args

    mode, max_len, new_tokens, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), list(map(int, sys.argv[4:]))
    base = ensure_base_model()
    common = dict(dtype="bfloat16", max_model_len=max_len, seed=0, disable_log_stats=True)
    if mode == "plain":
        llm = LLM(**engine_kwargs(str(base), None, **common))
        configs = {"plain": None}
    else:
        models = build_shared_value_models(base, Path(tempfile.mkdtemp(prefix="vas-bench-")))
        vas = VASConfig(value_models={k: models[k] for k in ("shared6", "shared30")})
        llm = LLM(**engine_kwargs(str(base), vas, **common))
        heads = vas.heads()
        configs = {}
        for n in ("6", "30"):
            names = sorted(h for h, info in heads.items() if info.value_model == f"shared{n}")
            configs[f"shared N={n} x1"] = make_extra_args({names[0]: 1.0})
            configs[f"shared N={n} x3"] = make_extra_args({h: 1.0 for h in names})
    out = {}
    for name, extra in configs.items():
        out[name] = {b: timed_generate(llm, chat_prompts(llm, b), new_tokens, extra, 2) for b in batches}
        print("RESULT", name, out[name], flush=True)
    Path(f"/tmp/tp_{mode}_{max_len}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
