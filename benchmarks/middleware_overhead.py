"""The HTTP middleware's own cost per request (vas_server.http.middleware), without an engine.

The middleware wraps a stand-in for vLLM's app that answers at once: a completions JSON answer
or a stream of SSE chunks shaped like vLLM's. Each request goes through the whole ASGI path
(body read, guard, steering fields moved into vllm_xargs, the `vas` echo, the model renamed for a
preset). The number is microseconds per request over the stand-in app called directly.

    python benchmarks/middleware_overhead.py [--requests 2000] [--out benchmarks/results/middleware_overhead.json]

Prints a table and writes JSON. The demo value models give the heads and presets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace

from vas_server.cli import demo_presets, demo_value_models
from vas_server.config import VASConfig
from vas_server.http.middleware import VASMiddleware

BASE = "SmolLM2-135M-Instruct"
ANSWER = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": BASE,
          "choices": [{"index": 0, "text": " a reply of some words", "finish_reason": "length", "logprobs": None}],
          "usage": {"prompt_tokens": 5, "completion_tokens": 32, "total_tokens": 37}}
CHUNKS = 32  # streamed answers: one chunk per token


def chunk(i: int) -> bytes:
    data = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": BASE,
            "choices": [{"index": 0, "text": " w", "finish_reason": "length" if i == CHUNKS - 1 else None}]}
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def vllm_stand_in(scope, receive, send) -> None:
    """Reads the body, answers like vLLM's completions route (JSON or SSE)."""
    body = json.loads((await receive())["body"])
    if body.get("stream"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(CHUNKS):
            await send({"type": "http.response.body", "body": chunk(i), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(ANSWER).encode()})


def app_state() -> SimpleNamespace:
    config = VASConfig(value_models=demo_value_models(), presets={n: p.to_json() for n, p in demo_presets()})
    return SimpleNamespace(
        vllm_config=SimpleNamespace(additional_config=config.to_additional_config()),
        args=SimpleNamespace(api_key=None),
        openai_serving_models=SimpleNamespace(base_model_paths=[SimpleNamespace(name=BASE)], lora_requests={}),
        engine_client=None)


async def one(app, state, body: dict) -> None:
    payload = json.dumps(body).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
             "app": SimpleNamespace(state=state)}
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": payload, "more_body": False}

    async def send(message):
        pass

    await app(scope, receive, send)


async def per_request_us(app, state, body: dict, n: int) -> float:
    for _ in range(50):
        await one(app, state, body)  # warm-up
    start = time.perf_counter()
    for _ in range(n):
        await one(app, state, body)
    return (time.perf_counter() - start) / n * 1e6


CASES = {
    "plain": {"model": BASE, "prompt": "Hello", "max_tokens": 32},
    "vas_weights": {"model": BASE, "prompt": "Hello", "max_tokens": 32, "vas_weights": {"positive": 2.0}},
    "preset": {"model": "cheerful", "prompt": "Hello", "max_tokens": 32},
    "plain, streamed": {"model": BASE, "prompt": "Hello", "max_tokens": 32, "stream": True},
    "preset, streamed": {"model": "cheerful", "prompt": "Hello", "max_tokens": 32, "stream": True},
}


async def main_async(args) -> dict:
    state = app_state()
    middleware = VASMiddleware(vllm_stand_in)
    rows = {}
    for name, body in CASES.items():
        bare = await per_request_us(vllm_stand_in, state, body, args.requests)
        wrapped = await per_request_us(middleware, state, body, args.requests)
        rows[name] = {"stand_in_us": bare, "with_middleware_us": wrapped, "overhead_us": wrapped - bare}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--out", default="benchmarks/results/middleware_overhead.json")
    args = ap.parse_args()
    rows = asyncio.run(main_async(args))
    print(f"{'request':<20}{'stand-in us':>14}{'+ middleware us':>18}{'overhead us':>14}")
    for name, r in rows.items():
        print(f"{name:<20}{r['stand_in_us']:>14.1f}{r['with_middleware_us']:>18.1f}{r['overhead_us']:>14.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/middleware_overhead.py --requests "
                                                     f"{args.requests}", "per_request": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
