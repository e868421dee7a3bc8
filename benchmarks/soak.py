"""Soak: many mixed requests against `vas-server serve`, watching errors, latency and memory.

Starts `vas-server serve` (by default the embedded SmolLM2-135M-Instruct with the demo heads), then
sends --requests requests (default 5,000) at --concurrency (default 64), cycling through: plain
completions, chat steered with each head, streamed chat (steered and plain), n > 1, and streams the
client drops after the first chunk. Reports errors, p50/p99 latency, the resident memory (RSS) of
the server's whole process tree (API server, engine core, worker) at start, after a fifth of the
requests (1,000 of 5,000) and at the end (and per process every 500 requests), and
vllm:num_requests_running once the load has stopped.

    python benchmarks/soak.py [--requests 5000] [--concurrency 64] [--max-tokens 16] [--port 8013]
                              [--out benchmarks/results/soak.json] [-- extra `vas-server serve` flags]

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["How was your weekend?", "Tell me about your favourite holiday.", "What should I cook tonight?",
           "Write a short note to a friend.", "Why is the sky blue?", "Describe a cat in two sentences."]


def rss_by_process(pid: int) -> dict[str, float]:
    """Resident memory (MiB) of a process and each descendant, keyed by process name (the API
    server, "VLLM::EngineCore", "VLLM::Worker", ...; several of one name are summed)."""
    root = psutil.Process(pid)
    out: dict[str, float] = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            name = "api server" if p.pid == pid else p.name()
            out[name] = out.get(name, 0.0) + p.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return out


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples in a Prometheus text page (0 when absent)."""
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB."""
    return sum(rss_by_process(pid).values())


def kinds(heads: list[str]) -> list[str]:
    """The request mix, one entry per kind; request i is kinds[i % len(kinds)]."""
    return (["plain", "plain_chat"] + [f"steered:{h}" for h in heads] + ["stream", "stream_steered", "n4",
                                                                        "disconnect", "disconnect_steered"])


def body_for(kind: str, i: int, model: str, heads: list[str], max_tokens: int) -> tuple[str, dict, bool]:
    """(path, body, streamed) for request i of `kind`."""
    prompt = PROMPTS[i % len(PROMPTS)]
    chat = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "seed": i}
    steer = {"vas_weights": {heads[i % len(heads)]: 2.0}} if heads else {}
    if kind == "plain":
        return "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens, "seed": i}, False
    if kind == "plain_chat":
        return "/v1/chat/completions", chat, False
    if kind.startswith("steered:"):
        return "/v1/chat/completions", {**chat, "vas_weights": {kind.split(":", 1)[1]: 2.0}}, False
    if kind in ("stream", "disconnect"):
        return "/v1/chat/completions", {**chat, "stream": True}, True
    if kind in ("stream_steered", "disconnect_steered"):
        return "/v1/chat/completions", {**chat, **steer, "stream": True}, True
    if kind == "n4":
        return "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens, "n": 4, **steer}, False
    raise ValueError(kind)


async def one(http: httpx.AsyncClient, kind: str, path: str, body: dict, streamed: bool) -> tuple[bool, str]:
    """(ok, error text). A dropped stream is ok once its first chunk arrived."""
    if not streamed:
        response = await http.post(path, json=body)
        if response.status_code != 200:
            return False, f"{response.status_code} {response.text[:200]}"
        if "vas_weights" in body and response.json().get("vas") is None:
            return False, "steered request answered without vas"
        return True, ""
    async with http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            return False, f"{response.status_code} {(await response.aread())[:200]!r}"
        async for line in response.aiter_lines():
            if kind.startswith("disconnect") and line.startswith("data: "):
                return True, ""  # leaving the block closes the connection mid-stream
            if line.startswith("data: ") and '"error"' in line:
                return False, line[:200]
            if line == "data: [DONE]":
                return True, ""
    return False, "stream ended without [DONE]"


async def soak(url: str, pid: int, model: str, heads: list[str], args) -> dict:
    mix = kinds(heads)
    latencies: list[float] = []
    errors: list[str] = []
    memory = {"start": tree_rss_mib(pid)}
    trace: list[tuple] = []  # (requests done, RSS MiB, RSS MiB by process) every 500 requests
    done = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        async def worker() -> None:
            nonlocal done
            while not queue.empty():
                i = queue.get_nowait()
                kind = mix[i % len(mix)]
                path, body, streamed = body_for(kind, i, model, heads, args.max_tokens)
                start = time.monotonic()
                try:
                    ok, error = await one(http, kind, path, body, streamed)
                except httpx.HTTPError as e:
                    ok, error = False, repr(e)
                latencies.append(time.monotonic() - start)
                if not ok:
                    errors.append(f"{kind}: {error}")
                done += 1
                if done == args.requests // 5:  # after 1,000 of 5,000
                    memory[f"after {done}"] = tree_rss_mib(pid)
                if done % 500 == 0:
                    by_process = {name: round(mib) for name, mib in rss_by_process(pid).items()}
                    trace.append((done, sum(by_process.values()), by_process))
                    print(f"  {done} requests, {len(errors)} errors, RSS {trace[-1][1]} MiB {by_process}", flush=True)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.monotonic() - started
        memory[f"after {done}"] = tree_rss_mib(pid)
        running = None
        for _ in range(60):  # aborted streams must leave the engine too
            text = (await http.get("/metrics")).text
            running = metric(text, "vllm:num_requests_running")
            if running == 0:
                break
            await asyncio.sleep(1)
        heap = {name: metric(text, name) for name in ("vas_worker_heap_trims_total", "vas_worker_heap_trim_seconds_total")}
    latencies.sort()
    return {"requests": done, "errors": len(errors), "first_errors": errors[:10], "seconds": round(elapsed, 1),
            "requests_per_s": round(done / elapsed, 2),
            "latency_p50_s": round(statistics.median(latencies), 3),
            "latency_p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
            "rss_mib": {k: round(v) for k, v in memory.items()}, "rss_mib_every_500": trace, "running_at_end": running,
            "heap_trims": heap, "mix": mix}


def start_server(port: int, extra: list[str], log: Path) -> subprocess.Popen:
    command = [str(REPO / ".venv/bin/vas-server"), "serve", "--port", str(port), *extra]
    env = {**os.environ, "VAS_SERVER_API_KEY": ""}
    process = subprocess.Popen(command, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited; log tail:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://localhost:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise SystemExit("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--port", type=int, default=8013)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/soak.json")
    parser.add_argument("serve_args", nargs="*", help="extra `vas-server serve` flags (after --)")
    args = parser.parse_args()
    log = Path(tempfile.gettempdir()) / "vas-soak-server.log"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    process = start_server(args.port, args.serve_args, log)
    try:
        url = f"http://localhost:{args.port}"
        cards = httpx.get(f"{url}/v1/models").json()["data"]
        model = cards[0]["id"]
        heads = [c["id"] for c in cards if "vas_head" in c]
        result = asyncio.run(soak(url, process.pid, model, heads, args))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    result.update(command=" ".join(["python benchmarks/soak.py", *sys.argv[1:]]), model=model, heads=heads,
                  concurrency=args.concurrency, max_tokens=args.max_tokens, cpu=platform.processor() or platform.machine(),
                  cpus=os.cpu_count())
    rss = result["rss_mib"]
    print(f"\n{'requests':>10} {'errors':>7} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} "
          + " ".join(f"{'RSS ' + k:>16}" for k in rss) + f" {'running at end':>15}")
    print(f"{result['requests']:>10} {result['errors']:>7} {result['requests_per_s']:>7} {result['latency_p50_s']:>7} "
          f"{result['latency_p99_s']:>7} " + " ".join(f"{str(v) + ' MiB':>16}" for v in rss.values())
          + f" {result['running_at_end']:>15}")
    print(f"worker heap trims: {result['heap_trims']}")
    for error in result["first_errors"]:
        print("  error:", error)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
