"""Remote mode against an upstream that only waits: what remote mode costs here when the base runs
on another machine.

A fake upstream (a thread of this script) answers every one-token call after --latency-ms, with
256 fixed log-probs and no computation, as a remote GPU server seen over a network would. The
remote-mode server on the embedded SmolLM2 steers it with the demo value model, so every bit of
CPU time here is remote mode's own: HTTP, JSON, the value runtime, sampling, vLLM's output path.
Measures tokens/s per stream and in total at each concurrency (streamed completions, 32 tokens,
temperature 1, `positive` at weight 2).

    python benchmarks/remote_latency.py [--latency-ms 50] [--concurrency 1 8 32] [--tokens 32]
                                        [--out benchmarks/results/remote_latency.json]

Prints a table and writes JSON. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from remote import measure, start, stream_one  # noqa: E402


def fake_upstream(latency_s: float) -> ThreadingHTTPServer:
    """/v1/completions after `latency_s`: token 28 drawn (1000, the argmax, at temperature 0),
    tokens 1000..1255 as the top 256, holding 90% of the mass; `max_tokens` such positions."""
    weights = [math.exp(-0.01 * i) for i in range(256)]
    top = {f"token_id:{1000 + i}": math.log(0.9 * w / sum(weights)) for i, w in enumerate(weights)}
    def body(n: int, greedy: bool) -> bytes:  # n positions (a draft), each the same; greedy: the argmax
        token, logprob = ("token_id:1000", top["token_id:1000"]) if greedy else ("token_id:28", -5.0)
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
            payload = body(int(request.get("max_tokens", 1)), request.get("temperature") == 0)
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
    """The server process's resident memory (its API process: remote mode's engine core runs there)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--draft", type=int, default=8, help="the server's --remote-draft (1: one token per call)")
    ap.add_argument("--weight", type=float, default=2.0, help="`positive`'s weight (0: unsteered)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--out", default="benchmarks/results/remote_latency.json")
    args = ap.parse_args()
    from vas_server.engine_args import prepare_environment

    prepare_environment()
    upstream = fake_upstream(args.latency_ms / 1e3)
    logs = Path(tempfile.mkdtemp(prefix="vas_remote_latency_"))
    server = start([sys.executable, "-m", "vas_server", "serve", "--port", "8304", "--remote-base",
                    f"http://127.0.0.1:{upstream.server_port}/v1", "--remote-model", "fake",
                    "--remote-skip-tokenizer-check", "--dtype", "float32", "--max-model-len", "1024",
                    "--max-num-seqs", "32", "--remote-draft", str(args.draft)], 8304, logs / "remote.log")
    rows = {"idle": {"rss_mib": rss_mib(server.pid)}}
    print(f"idle RSS {rows['idle']['rss_mib']:.0f} MiB", flush=True)
    try:
        for c in args.concurrency:
            calls = upstream.calls
            steering = {"vas_weights": {"positive": args.weight}} if args.weight else {}
            row = asyncio.run(measure(c, lambda client, i: stream_one(client, "http://127.0.0.1:8304/v1/completions", {
                "model": "SmolLM2-135M-Instruct", "prompt": "Tell me about your favourite place to relax.",
                "max_tokens": args.tokens, "temperature": args.temperature, "seed": i, "stream": True,
                "ignore_eos": True, **steering})))
            row["calls_per_token"] = (upstream.calls - calls) / row["tokens"]
            row["rss_mib"] = rss_mib(server.pid)
            rows[f"{c} streams"] = row
            print(f"upstream {args.latency_ms:g} ms  {c:>3} streams  {row['per_stream_tok_s']:7.2f} tok/s per stream  "
                  f"{row['total_tok_s']:7.2f} total  gap p50 {row['gap_p50_ms']:7.1f} ms  p99 {row['gap_p99_ms']:7.1f} ms"
                  f"  {row['calls_per_token']:.3f} calls/token  RSS {row['rss_mib']:.0f} MiB", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=90)
        upstream.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": f"python benchmarks/remote_latency.py --latency-ms "
                                          f"{args.latency_ms:g} --concurrency {' '.join(map(str, args.concurrency))} "
                                          f"--tokens {args.tokens} --draft {args.draft} --weight {args.weight:g} --temperature {args.temperature:g}",
                                          "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
