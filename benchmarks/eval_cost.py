"""Wall time of one response per prompt: plain base vs VAS (top-K 20, 128, 256; with and without top-20 logprobs).

    .venv/bin/python benchmarks/eval_cost.py docs/quality/cost.json

200 held-out chitchat prompts, 32 new tokens, the demo value model; one engine, runs back to
back, so the ratios compare like with like (docs/QUALITY.md, "Cost").
"""
import json
import sys
from value_models.evaluate import generate
from value_models.prompts import chitchat_prompts, pick
from value_models.sample import chat_prompt_ids

if __name__ == "__main__":
    from transformers import AutoTokenizer
    from vllm import LLM
    from vas_server.core.base_model import ensure_base_model
    from vas_server.config import VASConfig
    from vas_server.engine_args import engine_kwargs
    base = str(ensure_base_model())
    prompts = pick(chitchat_prompts("heldout"), 200, seed=0)
    tok = AutoTokenizer.from_pretrained(base)
    ids = [chat_prompt_ids(tok, p) for p in prompts]
    llm = LLM(**engine_kwargs(base, VASConfig(value_models={"demo": "vas_server/demo/smollm2"}), dtype="bfloat16",
                              max_model_len=512, max_num_seqs=200, seed=0, disable_log_stats=True))
    out = {}
    generate(llm, ids[:20], n=1, seed=0, max_tokens=8, weights=None, top_k=20, keep_topk=False)  # warm-up
    for name, w, k, lp in [("base", None, 20, False), ("vas_positive4", {"positive": 4.0}, 20, False),
                           ("vas_positive4_logprobs20", {"positive": 4.0}, 20, True), ("base_again", None, 20, False),
                           ("vas_3heads", {"positive": 2.0, "concise": 2.0, "simple": 2.0}, 20, False),
                           ("vas_positive4_k128", {"positive": 4.0}, 128, False),
                           ("vas_positive4_k256", {"positive": 4.0}, 256, False)]:
        g = generate(llm, ids, n=1, seed=0, max_tokens=32, weights=w, top_k=k, keep_topk=lp)
        out[name] = {"tokens": g.tokens, "seconds": g.seconds, "tok_per_s": g.tokens / g.seconds}
        print(name, out[name], flush=True)
    json.dump(out, open(sys.argv[1], "w"), indent=1)
