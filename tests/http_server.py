"""The HTTP server under test: `python -m vas_server serve` (vLLM's own OpenAI server with VAS) on
localhost with the real vLLM engine and the tiny models of conftest.py, shared by every test
module that talks HTTP (conftest's session fixture `server`). Its startup (~40 s on 2 cores)
dominates. Also the response-shape checks, with the `openai` package's own types, so the tests
need nothing outside the repository.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pydantic
import pytest
from openai.types import Completion

from engine_settings import MAX_MODEL_LEN

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key-123"
STARTUP_TIMEOUT_S = 240
SERVED_NAME = "tiny"  # --served-model-name
VALUE_MODELS = ("prefix", "liker")  # conftest's value_models: heads s1, s2 (state), t1, t2 (token), likes (token)
HEADS = ["likes", "s1", "s2", "t1", "t2"]
# --preset flags of the test server: the liker's one token strongly, over every candidate; two
# separate-runtime heads with a small restricted top-K (tests/test_presets.py)
PRESETS = {"cheerful": "likes:8@K=256", "mixed": "t1:2,s1:-1@K=5@restrict"}
PROMPT = "Hello, how are you"


class _ErrorInfo(pydantic.BaseModel, extra="forbid"):
    message: str
    type: str
    param: str | None
    code: int | str | None


class ErrorResponse(pydantic.BaseModel, extra="forbid"):
    """OpenAI's error body, as vLLM writes it."""

    error: _ErrorInfo


def check_shape(kind: type[pydantic.BaseModel], payload: dict) -> Any:
    """`payload` parses as `kind` (an `openai` response type, or ErrorResponse)."""
    try:
        return kind.model_validate(payload)
    except pydantic.ValidationError as e:
        pytest.fail(f"not a {kind.__name__}: {e}\n{json.dumps(payload)[:2000]}")


def check_completion_chunk(chunk: dict) -> None:
    """A streamed completions chunk is a Completion whose open choices have finish_reason null,
    as OpenAI sends them (the client's type, written for whole answers, lacks the null)."""
    closed = [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]
    check_shape(Completion, {**chunk, "choices": closed})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QuietHandler(BaseHTTPRequestHandler):
    """The tests' stand-in HTTP servers (fake upstreams, proxies): no access log, and one way to
    answer."""

    def reply(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` served on a free loopback port, in a thread, for the span of the block: its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def start_healthy(command: list[str], log: Path, url: str) -> subprocess.Popen:
    """Start `command` (a server), its output in `log`, once `url`/health answers 200; the test
    fails with the log's tail if it exits or does not answer within STARTUP_TIMEOUT_S."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{' '.join(command[:4])} did not start; log tail:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=90)


# -- the server ------------------------------------------------------------------------------------


class Server:
    def __init__(self, process: subprocess.Popen, log: Path, url: str, ready_lines: list[str]):
        self.process, self.log, self.url, self.ready_lines = process, log, url, ready_lines
        self.http = httpx.Client(base_url=url, timeout=120)

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)

    def post(self, path: str, body: dict | str | bytes, api_key: str | None = API_KEY, **kw) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key}"
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return self.http.post(path, content=content, headers=headers, **kw)

    def sse(self, path: str, body: dict) -> list[dict]:
        """The JSON payloads of a streamed response, in order, up to (not including) [DONE]."""
        response = self.post(path, {**body, "stream": True})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return [json.loads(e) for e in events[:-1]]

    def metrics(self) -> dict[str, float]:
        """Sample name (with labels, as exposed) -> value."""
        text = self.http.get("/metrics").text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


def start_server(tmp: Path, base: Path, value_models: dict[str, str], *extra: str,
                 presets: dict[str, str] | None = None) -> Server:
    """`python -m vas_server serve BASE --value-model NAME=PATH ... --preset ...` on a free port,
    once it printed its ready line."""
    log = tmp / "server.log"
    command = [sys.executable, "-m", "vas_server", "serve", str(base), "--served-model-name", SERVED_NAME,
               "--port", str(free_port()), "--api-key", API_KEY, "--max-model-len", str(MAX_MODEL_LEN),
               "--dtype", "float32", "--seed", "0", *extra,
               # JSON-schema answers without free whitespace: a random tiny model could pad them forever.
               "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
    for name, path in value_models.items():
        command += ["--value-model", f"{name}={path}"]
    for name, spec in (presets or {}).items():
        command += ["--preset", f"{name}={spec}"]
    env = {**os.environ, "VAS_SERVER_API_KEY": ""}  # the key must come from --api-key here
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        lines = log.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if line.startswith("vas-server ready at ") and i + 1 < len(lines):
                url = line.split()[3].removesuffix("/v1")
                return Server(process, log, url, lines[i:i + 2])
        if process.poll() is not None:
            break
        time.sleep(0.5)
    process.kill()
    pytest.fail(f"server did not start; log tail:\n{log.read_text(errors='replace')[-4000:]}")


def serve_for_tests(tmp: Path, tiny_base: Path, value_models: dict[str, str]):
    """Start the server, yield it, stop it with SIGTERM and check it shut down cleanly."""
    srv = start_server(tmp, tiny_base, {name: value_models[name] for name in VALUE_MODELS}, presets=PRESETS)
    yield from stopped_at_the_end(srv)


def stopped_at_the_end(srv: Server):
    """Yield the server, then stop it with SIGTERM and check it shut down cleanly."""
    yield srv
    srv.http.close()
    srv.process.send_signal(signal.SIGTERM)  # graceful shutdown: uvicorn drains, the engine stops
    try:
        code = srv.process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        srv.process.kill()
        pytest.fail("server did not shut down within 90 s of SIGTERM")
    # Uvicorn re-raises the signal it handled once it has shut down, hence -SIGTERM.
    log = srv.log.read_text(errors="replace")
    assert code in (0, -signal.SIGTERM), f"server exited with {code}; log tail:\n{log[-3000:]}"
    # vLLM aborts its engine at shutdown and logs the dead engine's traceback; before that, none.
    serving = log.partition("shutdown triggered")[0]
    assert "Application shutdown complete" in log and "Traceback" not in serving, serving[-3000:]
