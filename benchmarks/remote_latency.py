"""Remote mode against an upstream 50 ms away: what remote mode costs, and what drafting gains.

Two upstreams:
  * `--upstream fake` (default): a thread of this script that answers every call after
    --latency-ms with 256 fixed log-probs at each of `max_tokens` positions and no computation,
    so every bit of CPU time here is remote mode's own (HTTP, JSON, the value runtime, sampling,
    vLLM's output path). The remote server runs at `--dtype float32 --max-model-len 1024
    --max-num-seqs 32`.
  * `--upstream vllm`: a real local vLLM on the embedded SmolLM2 (as benchmarks/remote.py starts
    it) behind benchmarks/latency_proxy.py, which holds every call --latency-ms (an asyncio
    sleep: no CPU) before passing it on. Acceptance rates are then the real base's. The remote
    server runs README's remote command (`--remote-base ... --remote-model smol`, every other
    flag its default), so its memory is the one a new user gets. The upstream shares this
    machine's cores: its own compute is in every number.

One remote server per --draft value (its `--remote-draft`; 1 is one token per call, as before
drafting); for each temperature, `positive` weight and concurrency, that many streamed completions
at once (stream i: PROMPTS[i % 8], --tokens tokens, `ignore_eos`, seed i). Measures tokens/s per stream and in
total, upstream calls per generated token (counted by the fake or the proxy), drafted, accepted
and wasted draft tokens (the server's /metrics counters), and the server's RSS (idle, after each
row; one warm-up request between the idle RSS and the first row), and logs the value cache's startup line and the shutdown totals.

    python benchmarks/remote_latency.py [--upstream fake|vllm] [--latency-ms 50] [--concurrency 1 8 32]
                                        [--tokens 32] [--draft 8 1] [--weight 0 1 2 4] [--temperature 0 1]
                                        [--rounds 1]
                                        [--out benchmarks/results/remote_latency.json]

Prints a table and writes JSON. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from remote import PROMPT, measure, start, stream_one  # noqa: E402


# Stream i asks PROMPTS[i % 8] (--upstream vllm; the fake ignores the prompt): at T = 0 every
# stream of one prompt is the same greedy sequence, so the acceptance of 8 and 32 streams is that
# of 8 sequences, not one.
PROMPTS = [PROMPT, "Write a short note to a friend who just moved to a new city.",
           "What do you think about rainy days?", "Describe your ideal weekend.",
           "How was your day at work today?", "Give me some advice about learning to cook.",
           "Tell me about the last book you read.", "What is it like to travel by train?"]


def fake_upstream(latency_s: float) -> ThreadingHTTPServer:
    """/v1/completions after `latency_s`: token 28 drawn (1000, the argmax, at temperature 0),
    tokens 1000..1255 as the top 256, holding 90% of the mass; `max_tokens` such positions; a banned
    drawn token (logit_bias) is replaced by 28, outside the top 256."""
    weights = [math.exp(-0.01 * i) for i in range(256)]
    top = {f"token_id:{1000 + i}": math.log(0.9 * w / sum(weights)) for i, w in enumerate(weights)}
    def body(n: int, greedy: bool, banned: dict) -> bytes:  # n positions (a draft), each the same; greedy: the argmax
        token, logprob = ("token_id:1000", top["token_id:1000"]) if greedy else ("token_id:28", -5.0)
        if token.removeprefix("token_id:") in banned:  # logit_bias honoured: the best token outside the top 256
            token, logprob = "token_id:28", -5.0
        return json.dumps({"choices": [{"logprobs": {"tokens": [token] * n, "token_logprobs": [logprob] * n,
                                                     "top_logprobs": [top] * n}}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real server

        def setup(self):
            super().setup()
            # Headers and body go out in two writes: without this, Nagle's algorithm and the
            # client's delayed ACK add ~40 ms to every call.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
            server.calls += 1
            payload = body(int(request.get("max_tokens", 1)), request.get("temperature") == 0,
                           request.get("logit_bias") or {})
            time.sleep(latency_s)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 256  # listen backlog: the default 5 refuses connections at 32 streams

    server = Server(("127.0.0.1", 0), Handler)
    server.calls = 0
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def rss_mib(pid: int) -> float:
    """Resident memory of `pid` and its descendants (remote mode's engine core and value runtime
    run in the API process; a child, if any, is counted too)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1024


def draft_counters(url: str) -> dict[str, float]:
    """The remote server's drafting counters from GET /metrics (vas_server.http.metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    counters = {}
    for key, name in (("drafted", "vas_remote_drafted_tokens"), ("accepted", "vas_remote_accepted_tokens"),
                      ("wasted", "vas_remote_wasted_draft_tokens"), ("tokens", "vas_remote_tokens")):
        found = re.search(rf"^{name}(?:_total)? ([0-9.e+]+)$", text, re.M)
        counters[key] = float(found.group(1)) if found else 0.0
    return counters


def repeated(rounds: int, concurrency: int, run) -> dict:
    """`measure` `rounds` times, round r's stream i being request r * concurrency + i: tokens and
    wall time summed, the per-stream tok/s and gaps the median of the rounds' (one stream: the
    median request's)."""
    results = [asyncio.run(measure(concurrency, lambda client, i, r=r: run(client, r * concurrency + i)))
               for r in range(rounds)]
    tokens, wall = sum(r["tokens"] for r in results), sum(r["wall_s"] for r in results)
    row = {"tokens": tokens, "wall_s": wall, "total_tok_s": tokens / wall, "rounds": rounds}
    for key in ("per_stream_tok_s", "gap_p50_ms", "gap_p99_ms"):
        row[key] = statistics.median(r[key] for r in results)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", choices=("fake", "vllm"), default="fake",
                    help="fake: this script's fake; vllm: a real local vLLM on the embedded base, behind the proxy")
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--draft", type=int, nargs="+", default=[8],
                    help="the server's --remote-draft, one server each (1: one token per call)")
    ap.add_argument("--weight", type=float, nargs="+", default=[2.0], help="`positive`'s weights (0: unsteered)")
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    ap.add_argument("--rounds", type=int, default=1,
                    help="send each row's streams this many times, one after the other (round r's stream i is "
                         "request r * concurrency + i: its prompt and seed), for more than one request per stream")
    ap.add_argument("--out", default="benchmarks/results/remote_latency.json")
    args = ap.parse_args()
    from vas_server.core.base_model import ensure_base_model
    from vas_server.engine_args import prepare_environment

    prepare_environment()  # the servers inherit it: on a CPU, a 1 GiB KV cache each
    logs = Path(tempfile.mkdtemp(prefix="vas_remote_latency_"))
    helpers, calls = [], None
    if args.upstream == "fake":
        fake = fake_upstream(args.latency_ms / 1e3)
        base_url, calls = f"http://127.0.0.1:{fake.server_port}/v1", lambda: fake.calls
        # The fake has no /tokenize and serves no model config: float32, a short context.
        flags = ["--remote-model", "fake", "--remote-skip-tokenizer-check", "--dtype", "float32",
                 "--max-model-len", "1024", "--max-num-seqs", "32"]
    else:
        # The upstream as benchmarks/remote.py starts it; the proxy adds the network's latency.
        helpers.append(start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                              str(ensure_base_model()), "--served-model-name", "smol", "--port", "8301",
                              "--max-logprobs", "256", "--enforce-eager", "--no-enable-chunked-prefill", "--dtype",
                              "float32", "--max-model-len", "1024", "--max-num-seqs", "32"], 8301,
                             logs / "upstream.log", health="/health"))
        helpers.append(start([sys.executable, str(Path(__file__).with_name("latency_proxy.py")), "--target",
                              "http://127.0.0.1:8301", "--port", "8305", "--latency-ms", f"{args.latency_ms:g}"],
                             8305, logs / "proxy.log", health="/proxy/calls"))
        base_url = "http://127.0.0.1:8305/v1"
        calls = lambda: httpx.get("http://127.0.0.1:8305/proxy/calls", timeout=30).json()["calls"]  # noqa: E731
        flags = ["--remote-model", "smol"]  # README's remote command: every other flag its default
    rows = {}
    try:
        for draft in args.draft:
            log = logs / f"remote_draft{draft}.log"
            server = start([sys.executable, "-m", "vas_server", "serve", "--port", "8304", "--remote-base", base_url,
                            *flags, "--remote-draft", str(draft)], 8304, log)
            try:
                cache = re.search(r"remote-base value cache: .*", log.read_text(errors="replace"))
                rows[f"draft {draft}, idle"] = {"rss_mib": rss_mib(server.pid),
                                                "value_cache_log": cache.group(0) if cache else None}
                # One short steered request first (vLLM's and the value runtime's first-call costs).
                asyncio.run(measure(1, lambda client, i: stream_one(client, "http://127.0.0.1:8304/v1/completions", {
                    "model": "SmolLM2-135M-Instruct", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0,
                    "stream": True, "ignore_eos": True, "vas_weights": {"positive": 1.0}})))
                print(f"draft {draft}  idle RSS {rows[f'draft {draft}, idle']['rss_mib']:.0f} MiB; "
                      f"{rows[f'draft {draft}, idle']['value_cache_log']}", flush=True)
                for temperature in args.temperature:
                    for weight in args.weight:
                        steering = {"vas_weights": {"positive": weight}} if weight else {}
                        for c in args.concurrency:
                            before_calls, before = calls(), draft_counters("http://127.0.0.1:8304")
                            row = repeated(args.rounds, c, lambda client, i: stream_one(
                                client, "http://127.0.0.1:8304/v1/completions", {
                                    "model": "SmolLM2-135M-Instruct", "prompt": PROMPTS[i % len(PROMPTS)],
                                    "max_tokens": args.tokens,
                                    "temperature": temperature, "seed": i, "stream": True, "ignore_eos": True,
                                    **steering}))
                            after = draft_counters("http://127.0.0.1:8304")
                            row["upstream_calls"] = calls() - before_calls
                            row["calls_per_token"] = row["upstream_calls"] / row["tokens"]
                            delta = {k: after[k] - before[k] for k in after}
                            row["drafted_tokens"], row["accepted_tokens"] = delta["drafted"], delta["accepted"]
                            row["wasted_draft_tokens"] = delta["wasted"]
                            row["acceptance_rate"] = delta["accepted"] / delta["drafted"] if delta["drafted"] else None
                            row["rss_mib"] = rss_mib(server.pid)
                            rows[f"draft {draft}, T {temperature:g}, positive {weight:g}, {c} streams"] = row
                            acceptance = "" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.3f}"
                            print(f"draft {draft}  T {temperature:g}  positive {weight:g}  {c:>3} streams  "
                                  f"{row['per_stream_tok_s']:7.2f} tok/s per stream  {row['total_tok_s']:7.2f} total  "
                                  f"{row['calls_per_token']:.3f} calls/token  acceptance {acceptance:>5}  "
                                  f"wasted {row['wasted_draft_tokens']:.0f}  RSS {row['rss_mib']:.0f} MiB", flush=True)
            finally:
                server.terminate()
                server.wait(timeout=90)
            totals = re.search(r"remote-base totals: .*", log.read_text(errors="replace"))
            rows[f"draft {draft}, shutdown totals"] = totals.group(0) if totals else None
    finally:
        for process in helpers:
            process.terminate()
        for process in helpers:
            process.wait(timeout=90)
        if args.upstream == "fake":
            fake.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    command = (f"python benchmarks/remote_latency.py --upstream {args.upstream} --latency-ms {args.latency_ms:g} "
               f"--concurrency {' '.join(map(str, args.concurrency))} --tokens {args.tokens} --rounds {args.rounds} "
               f"--draft {' '.join(map(str, args.draft))} --weight {' '.join(f'{w:g}' for w in args.weight)} "
               f"--temperature {' '.join(f'{t:g}' for t in args.temperature)}")
    Path(args.out).write_text(json.dumps({"command": command, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
