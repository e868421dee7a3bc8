"""VAS over a remote base against in-process VAS and against the upstream serving plainly.

Starts the servers on this machine, all on the embedded SmolLM2-135M-Instruct in float32: the
upstream (vLLM's own server, `--max-logprobs 256`), one `vas-server serve --remote-base` steering it
per --draft value (its `--remote-draft`: 1 is one token per call, 8 drafts up to 8 tokens per call
and VAS verifies them), and `vas-server serve` (in-process VAS). Then, for each temperature,
`positive` weight and concurrency, sends that many streamed completions at once (32 tokens, the
demo `positive` head at that weight for the VAS servers, none for the upstream) and measures
tokens/s per stream and in total, the time between tokens (p50/p99), and, for remote mode,
upstream calls per generated token (from the upstream's own `vllm:request_success_total`). A row
"upstream, 1-token calls" makes the upstream calls remote mode makes without drafting (one-token
completions with 256 log-probs, token-id prompts) without any VAS work: the ceiling of one
token per call on this machine.

    python benchmarks/remote.py [--concurrency 1 8 32] [--tokens 32] [--temperature 1] [--weight 2]
                                [--draft 8 1] [--out benchmarks/results/remote.json]

Prints a table and writes JSON. Run it alone on the machine: the servers share its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Tell me about your favourite place to relax."


def start(command: list[str], port: int, log: Path, health: str = "/health") -> subprocess.Popen:
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{health}", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            break
        time.sleep(1)
    process.kill()
    raise SystemExit(f"{command[:4]} did not start; see {log}")


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> list[float]:
    """Arrival times of one streamed completion's tokens: a chunk may carry several (a drafted
    round), counted from the usage every chunk reports (continuous_usage_stats)."""
    times = []
    body = dict(body, stream_options={"include_usage": True, "continuous_usage_stats": True})
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                usage = json.loads(line[6:]).get("usage") or {}
                arrived = usage.get("completion_tokens", len(times)) - len(times)
                times += [time.perf_counter()] * max(0, arrived)
    return times


async def one_token_calls(client: httpx.AsyncClient, url: str, model: str, prompt_ids: list[int], tokens: int,
                          temperature: float, seed: int) -> list[float]:
    """The upstream calls remote mode makes for one request, without any VAS work: per token, a
    one-token completion with 256 log-probs on the context as token ids. Their arrival times."""
    times, context = [], list(prompt_ids)
    for step in range(tokens):
        response = await client.post(url, json={"model": model, "prompt": context, "max_tokens": 1, "logprobs": 256,
                                                "temperature": temperature, "seed": seed * 1000 + step,
                                                "return_tokens_as_token_ids": True})
        response.raise_for_status()
        context.append(int(response.json()["choices"][0]["logprobs"]["tokens"][0].removeprefix("token_id:")))
        times.append(time.perf_counter())
    return times


async def measure(concurrency: int, run) -> dict:
    """run(client, i) -> the arrival times of request i's tokens; `concurrency` requests at once."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)) as client:
        start_time = time.perf_counter()
        runs = await asyncio.gather(*(run(client, i) for i in range(concurrency)))
        wall = time.perf_counter() - start_time
    gaps = [b - a for times in runs for a, b in zip(times, times[1:])]
    per_stream = [len(times) / (times[-1] - start_time) for times in runs if times]
    generated = sum(len(times) for times in runs)
    gaps.sort()
    return {"tokens": generated, "wall_s": wall, "total_tok_s": generated / wall,
            "per_stream_tok_s": statistics.median(per_stream),
            "gap_p50_ms": 1e3 * gaps[len(gaps) // 2], "gap_p99_ms": 1e3 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))]}


def upstream_requests(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$", text, re.M))


def remote_totals(log: Path) -> dict | None:
    """A remote server's own totals, logged at shutdown: value batches and their rows show the
    batching, drafts their acceptance."""
    found = re.search(r"remote-base totals: (\d+) tokens, (\d+) upstream calls \([0-9.]+ per token\), (\d+) value "
                      r"batches of (\d+) rows, (\d+) capped steps; (\d+) drafts of (\d+) tokens, (\d+) accepted",
                      log.read_text(errors="replace"))
    keys = ("tokens", "upstream_calls", "value_batches", "value_rows", "capped_steps", "drafts", "drafted_tokens",
            "accepted_tokens")
    return dict(zip(keys, map(int, found.groups()))) if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    ap.add_argument("--weight", type=float, nargs="+", default=[2.0], help="`positive`'s weights (0: unsteered)")
    ap.add_argument("--draft", type=int, nargs="+", default=[8, 1],
                    help="one remote server per value, its --remote-draft (1: one token per call)")
    ap.add_argument("--out", default="benchmarks/results/remote.json")
    args = ap.parse_args()
    from vas_server.core.base_model import ensure_base_model
    from vas_server.engine_args import prepare_environment

    prepare_environment()  # the servers inherit it: on a CPU, a 1 GiB KV cache each (vLLM's default takes most RAM)
    base = str(ensure_base_model())
    logs = Path(tempfile.mkdtemp(prefix="vas_remote_bench_"))
    common = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "32"]
    upstream = start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base,
                      "--served-model-name", "smol", "--port", "8301", "--max-logprobs", "256", "--enforce-eager",
                      "--no-enable-chunked-prefill", *common], 8301, logs / "upstream.log")
    servers = [upstream]
    remote_ports = {draft: 8310 + i for i, draft in enumerate(args.draft)}
    try:
        for draft, port in remote_ports.items():
            servers.append(start([sys.executable, "-m", "vas_server", "serve", "--port", str(port), "--remote-base",
                                  "http://127.0.0.1:8301/v1", "--remote-model", "smol", "--remote-draft", str(draft),
                                  *common], port, logs / f"remote_draft{draft}.log"))
        servers.append(start([sys.executable, "-m", "vas_server", "serve", "--port", "8303", *common], 8303,
                             logs / "in_process.log"))
        from transformers import AutoTokenizer

        prompt_ids = AutoTokenizer.from_pretrained(base)(PROMPT)["input_ids"]

        def streamed(url: str, model: str, steering: dict, temperature: float):
            def run(client, i):
                return stream_one(client, f"{url}/v1/completions", {
                    "model": model, "prompt": PROMPT, "max_tokens": args.tokens, "temperature": temperature,
                    "seed": i, "stream": True, "ignore_eos": True, **steering})
            return run

        rows = {}
        for temperature in args.temperature:
            targets = {"upstream, plain": streamed("http://127.0.0.1:8301", "smol", {}, temperature),
                       "upstream, 1-token calls": lambda client, i, t=temperature: one_token_calls(
                           client, "http://127.0.0.1:8301/v1/completions", "smol", prompt_ids, args.tokens, t, i)}
            for weight in args.weight:
                steering = {"vas_weights": {"positive": weight}} if weight else {}
                for draft, port in remote_ports.items():
                    targets[f"remote VAS, draft {draft}, positive {weight:g}"] = streamed(
                        f"http://127.0.0.1:{port}", "SmolLM2-135M-Instruct", steering, temperature)
                targets[f"in-process VAS, positive {weight:g}"] = streamed(
                    "http://127.0.0.1:8303", "SmolLM2-135M-Instruct", steering, temperature)
            for name, run in targets.items():
                for c in args.concurrency:
                    before = upstream_requests("http://127.0.0.1:8301")
                    row = asyncio.run(measure(c, run))
                    if name.startswith("remote VAS"):
                        row["upstream_calls_per_token"] = (upstream_requests("http://127.0.0.1:8301") - before) / row["tokens"]
                    rows[f"T {temperature:g}, {name}, {c} streams"] = row
                    print(f"T {temperature:g}  {name:<36}{c:>4} streams  {row['per_stream_tok_s']:7.2f} tok/s per stream  "
                          f"{row['total_tok_s']:7.2f} total  gap p50 {row['gap_p50_ms']:7.1f} ms  p99 {row['gap_p99_ms']:7.1f} ms"
                          + (f"  {row['upstream_calls_per_token']:.3f} upstream calls/token"
                             if "upstream_calls_per_token" in row else ""), flush=True)
    finally:
        for process in servers:
            process.terminate()
        for process in servers:
            process.wait(timeout=90)
    totals = {f"draft {draft}": remote_totals(logs / f"remote_draft{draft}.log") for draft in remote_ports}
    print(f"remote server totals: {totals}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    command = (f"python benchmarks/remote.py --concurrency {' '.join(map(str, args.concurrency))} --tokens {args.tokens} "
               f"--temperature {' '.join(f'{t:g}' for t in args.temperature)} "
               f"--weight {' '.join(f'{w:g}' for w in args.weight)} --draft {' '.join(map(str, args.draft))}")
    Path(args.out).write_text(json.dumps({"command": command, "results": rows, "remote_totals": totals},
                                         indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
