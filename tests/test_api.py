"""The HTTP server end to end: `python -m vas_server serve` on localhost with the real vLLM engine
and tiny models, driven by the official `openai` client (and raw httpx where the test needs the
exact bytes). One server for the whole module; its startup (~40 s on 2 cores) dominates.

Every response body is checked against the public OpenAI spec (shared/specs/openai-openapi.yaml)
with shared/tools/openai_schema_check.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import MAX_MODEL_LEN

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key-123"
STARTUP_TIMEOUT_S = 240
VALUE_MODELS = ("prefix", "liker")  # from conftest: heads s1, s2 (state), t1, t2 (token), likes (token)
HEADS = ["likes", "s1", "s2", "t1", "t2"]
PROMPT = "Hello, how are you"


def _schema_checker():
    """shared/tools/openai_schema_check.py: beside the repository (CI clones it there) or inside it."""
    for shared in (REPO.parent / "shared", REPO / "shared"):
        tool = shared / "tools" / "openai_schema_check.py"
        if tool.is_file():
            sys.path.insert(0, str(tool.parent))
            import openai_schema_check

            return openai_schema_check.errors_for
    return None


_errors_for = _schema_checker()


# An open chunk's finish_reason is null, as OpenAI sends it. The checker rejects that: the spec
# marks it with OpenAPI 3.0's `nullable`, which JSON Schema does not know (chat chunks), or reuses
# the final response shape for chunks (completions). It is the one tolerated difference.
OPEN_FINISH = tuple(f"choices/{i}/finish_reason: {m}" for i in range(2) for m in (
    "None is not of type 'string'",
    "None is not one of ['stop', 'length', 'content_filter']",
    "None is not one of ['stop', 'length', 'tool_calls', 'content_filter', 'function_call']"))


def check_schema(name: str, payload: dict, allow: tuple[str, ...] = ()) -> None:
    """Assert `payload` is a valid `name` of the OpenAI spec; `allow` lists tolerated errors."""
    if _errors_for is None:
        pytest.skip("shared/tools/openai_schema_check.py not found beside or inside the repository")
    errors = [e for e in _errors_for(name, payload) if e not in allow]
    assert not errors, f"{name} schema errors: {errors}\n{json.dumps(payload)[:2000]}"


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


def _start_server(tmp: Path, base: Path, value_models: dict[str, str]) -> Server:
    log = tmp / "server.log"
    command = [sys.executable, "-m", "vas_server", "serve", "--model", str(base), "--port", "0",
               "--api-key", API_KEY, "--max-model-len", str(MAX_MODEL_LEN),
               "--engine-arg", "dtype=float32", "--engine-arg", "seed=0"]
    for name in VALUE_MODELS:
        command += ["--value-model", f"{name}={value_models[name]}"]
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


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_base, value_models):
    srv = _start_server(tmp_path_factory.mktemp("server"), tiny_base, value_models)
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
    assert "Application shutdown complete" in log and "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_base))


@pytest.fixture(scope="module")
def model(tiny_base) -> str:
    return str(tiny_base)  # served under the --model argument


def _greedy(**kw) -> dict:
    return {"temperature": 0, **kw}


# -- completions -----------------------------------------------------------------------------------


def test_completion_non_streaming(server, client, model, tokenizer):
    raw = server.post("/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert raw.status_code == 200, raw.text
    check_schema("CreateCompletionResponse", raw.json())
    response = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, user="u1")
    choice = response.choices[0]
    assert choice.text == raw.json()["choices"][0]["text"]  # greedy: the same text twice
    assert choice.text and choice.index == 0
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert 1 <= response.usage.completion_tokens <= 12
    if choice.finish_reason == "length":
        assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.model == model and response.object == "text_completion"
    assert response.model_extra["vas"] is None  # no steering asked, none applied


def test_completion_streaming_equals_non_streaming(server, client, model):
    want = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    chunks = server.sse("/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 16, "temperature": 0,
                                            "stream_options": {"include_usage": True}})
    for chunk in chunks[:-2]:
        check_schema("CreateCompletionResponse", chunk, allow=OPEN_FINISH)
    for chunk in chunks[-2:]:
        check_schema("CreateCompletionResponse", chunk)
    assert all("usage" not in c for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == want.usage.model_dump(exclude_none=True)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == want.choices[0].text
    assert chunks[-2]["choices"][0]["finish_reason"] == want.choices[0].finish_reason
    assert len({c["id"] for c in chunks}) == 1

    # The official client's stream gives the same text; without include_usage no usage key at all.
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stream=True)
    parts = list(stream)
    assert "".join(p.choices[0].text for p in parts) == want.choices[0].text
    assert all(p.usage is None and "usage" not in p.model_fields_set for p in parts)


def test_completion_batch_prompts_and_token_ids(client, model, tokenizer):
    ids = tokenizer.encode(PROMPT)
    single = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    batch = client.completions.create(model=model, prompt=[PROMPT, "Good morning"], max_tokens=8, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == single
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == single
    assert by_ids.usage.prompt_tokens == len(ids)


def test_n2_non_streaming_and_streaming(server, client, model):
    raw = client.completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=10, n=2, seed=7,
                                                      temperature=1.0)
    check_schema("CreateCompletionResponse", raw.http_response.json())
    response = raw.parse()
    assert [c.index for c in response.choices] == [0, 1]
    assert response.choices[0].text != response.choices[1].text  # seeds 7 and 8: different samples
    # Choice i with seed s samples like a single request with seed s + i (vLLM's rule for n).
    alone = [client.completions.create(model=model, prompt=PROMPT, max_tokens=10, seed=7 + i, temperature=1.0)
             for i in range(2)]
    assert [a.choices[0].text for a in alone] == [c.text for c in response.choices]
    assert response.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert response.usage.prompt_tokens == alone[0].usage.prompt_tokens  # the prompt counts once

    chat = server.sse("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "Hi"}],
                                               "max_tokens": 6, "n": 2, "seed": 3})
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in chat:
        check_schema("CreateChatCompletionStreamResponse", chunk, allow=OPEN_FINISH)
        for c in chunk["choices"]:
            texts[c["index"]] += c["delta"].get("content") or ""
            if c["finish_reason"]:
                finished.add(c["index"])
    assert finished == {0, 1}
    first_roles = [c["choices"][0]["delta"].get("role") for c in chat[:2]]
    assert first_roles == ["assistant", "assistant"]
    ref = [server.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=6, seed=3 + i).choices[0].message.content
           for i in range(2)]
    assert [texts[0], texts[1]] == ref


def test_completion_logprobs(client, model):
    raw = client.completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                                      logprobs=2)
    check_schema("CreateCompletionResponse", raw.http_response.json())
    response = raw.parse()
    lp = response.choices[0].logprobs
    n = response.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for chosen, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 2
        assert max(top.values()) == pytest.approx(value)  # greedy: the chosen token is the most likely
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_stop_strings(server, client, model):
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    stop = next(full[i:i + 2] for i in range(4, len(full) - 2) if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2])
    want = full[:full.index(stop)]
    stopped = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "@@@"])
    assert stopped.choices[0].text == want and stopped.choices[0].finish_reason == "stop"
    chunks = server.sse("/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                                            "stop": stop})
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# -- chat ------------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


def test_chat_non_streaming_and_streaming(server, client, model, tokenizer):
    raw = server.post("/v1/chat/completions", {"model": model, "messages": MESSAGES, "max_completion_tokens": 12,
                                                "temperature": 0})
    assert raw.status_code == 200, raw.text
    check_schema("CreateChatCompletionResponse", raw.json())
    response = client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=12,
                                              temperature=0)
    message = response.choices[0].message
    assert message.role == "assistant" and message.content == raw.json()["choices"][0]["message"]["content"]
    prompt_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt_ids, add_special_tokens=False))
    assert response.usage.completion_tokens <= 12

    chunks = server.sse("/v1/chat/completions", {"model": model, "messages": MESSAGES, "max_tokens": 12,
                                                 "temperature": 0, "stream_options": {"include_usage": True}})
    for chunk in chunks:
        check_schema("CreateChatCompletionStreamResponse", chunk, allow=OPEN_FINISH)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == message.content
    assert chunks[-1]["usage"] == response.usage.model_dump(exclude_none=True)

    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0,
                                            stream=True)
    assert "".join(p.choices[0].delta.content or "" for p in stream) == message.content


def test_chat_content_parts_and_developer_role(client, model):
    plain = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0)
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             MESSAGES[1]]
    same = client.chat.completions.create(model=model, messages=parts, max_tokens=6, temperature=0)
    assert same.choices[0].message.content == plain.choices[0].message.content
    assert same.usage.prompt_tokens == plain.usage.prompt_tokens


def test_chat_logprobs(client, model):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=6,
                                                           temperature=0, logprobs=True, top_logprobs=3)
    check_schema("CreateChatCompletionResponse", raw.http_response.json())
    response = raw.parse()
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert 1 <= len(entry.top_logprobs) <= 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy picks the top token
        assert entry.bytes == list(entry.token.encode())
    without = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0)
    assert without.choices[0].logprobs is None


# -- VAS through HTTP ------------------------------------------------------------------------------


def test_vas_fields_are_reported(server, client, model):
    response = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0,
                                         extra_body={"vas_weights": {"s1": 1.5, "t1": 0, "likes": -1}})
    assert response.model_extra["vas"] == {"weights": {"s1": 1.5, "likes": -1.0}, "top_k": 20,
                                           "restrict_to_top_k": False}
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6,
                                          extra_body={"vas_weights": {"t2": 2}, "vas_top_k": 5,
                                                      "vas_restrict_to_top_k": True})
    assert chat.model_extra["vas"] == {"weights": {"t2": 2.0}, "top_k": 5, "restrict_to_top_k": True}
    chunks = server.sse("/v1/chat/completions", {"model": model, "messages": MESSAGES, "max_tokens": 4,
                                                 "vas_weights": {"s2": 1}})
    assert all(c["vas"] == {"weights": {"s2": 1.0}, "top_k": 20, "restrict_to_top_k": False} for c in chunks)
    zero = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0,
                                     extra_body={"vas_weights": {"s1": 0}})
    assert zero.model_extra["vas"] is None  # all-zero weights: plain vLLM, nothing applied


def test_zero_weights_equal_plain_and_weights_change_text(client, model):
    def text(**extra):
        return client.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0.8, seed=11,
                                         extra_body=extra or None).choices[0].text

    plain = text()
    assert text(vas_weights={"s1": 0, "t1": 0}) == plain
    assert text(vas_weights={"s1": 3, "t1": -3}) != plain


def test_steering_raises_liked_token_frequency(client, model, liked_token, tokenizer):
    """The `likes` head values one token (" good"); a positive weight makes it far more frequent."""
    liked = tokenizer.decode([liked_token])

    def count(weight: float) -> int:
        response = client.completions.create(
            model=model, prompt=[PROMPT, "The quick brown fox", "Paris is the"], max_tokens=24, temperature=1.0,
            seed=5, n=2, extra_body={"vas_weights": {"likes": weight}, "vas_top_k": 256})
        return sum(c.text.count(liked) for c in response.choices)

    unsteered, steered = count(0.0), count(6.0)
    assert steered >= unsteered + 10, (unsteered, steered)
    assert count(-6.0) <= unsteered


# -- errors ----------------------------------------------------------------------------------------


def _error(response: httpx.Response, status: int, param: str | None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    check_schema("ErrorResponse", body)
    error = body["error"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def test_unknown_head_lists_known_heads(server, client, model):
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": MESSAGES})):
        for stream in (False, True):  # a streaming request is refused before the stream starts
            r = server.post(path, {"model": model, **body, "stream": stream, "vas_weights": {"nice": 1.0}})
            error = _error(r, 400, "vas_weights", "unknown_head")
            assert "'nice'" in error["message"] and ", ".join(HEADS) in error["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt=PROMPT, extra_body={"vas_weights": {"nice": 1}})
    assert info.value.status_code == 400 and info.value.body["param"] == "vas_weights"


@pytest.mark.parametrize("raw_weights", ['NaN', 'Infinity', '-Infinity', '1e999', '"2.0"', 'true', 'null'])
def test_non_finite_or_non_numeric_weight(server, model, raw_weights):
    body = '{"model": %s, "prompt": "hi", "vas_weights": {"likes": %s}}' % (json.dumps(model), raw_weights)
    error = _error(server.post("/v1/completions", body), 400, "vas_weights", "invalid_value")
    assert "finite number" in error["message"]


def test_non_numeric_weight_through_the_client(client, model):
    # (The client itself refuses to send inf or nan: its JSON encoder is strict.)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=MESSAGES, extra_body={"vas_weights": {"s1": "1.5"}})
    assert info.value.body["param"] == "vas_weights"


@pytest.mark.parametrize("field, value", [("vas_weights", [1, 2]), ("vas_top_k", 0), ("vas_top_k", 257),
                                          ("vas_top_k", 2.5), ("vas_restrict_to_top_k", "yes")])
def test_invalid_vas_settings(server, model, field, value):
    body = {"model": model, "prompt": "hi", "vas_weights": {"likes": 1}, field: value}
    _error(server.post("/v1/completions", body), 400, field, "invalid_value")


def test_unknown_model(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4o", prompt=PROMPT)
    assert info.value.body["code"] == "model_not_found"
    _error(server.post("/v1/chat/completions", {"model": "likes", "messages": MESSAGES}), 404, "model",
           "model_not_found")


def test_prompt_longer_than_context(server, client, model, tokenizer):
    long_text = "The quick brown fox jumps over the lazy dog. " * 100
    assert len(tokenizer.encode(long_text)) > MAX_MODEL_LEN
    _error(server.post("/v1/completions", {"model": model, "prompt": long_text}), 400, "prompt",
           "context_length_exceeded")
    _error(server.post("/v1/completions", {"model": model, "prompt": long_text, "stream": True}), 400, "prompt",
           "context_length_exceeded")
    _error(server.post("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": long_text}]}),
           400, "messages", "context_length_exceeded")
    _error(server.post("/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": MAX_MODEL_LEN}), 400,
           "max_tokens", "context_length_exceeded")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=MAX_MODEL_LEN)
    # Without an explicit limit, chat fills the rest of the context (or stops) instead of failing.
    near_full = "The quick brown fox jumps over the lazy dog. " * 30
    n_prompt = len(tokenizer.encode(near_full))
    assert MAX_MODEL_LEN - 100 < n_prompt < MAX_MODEL_LEN - 10
    r = server.post("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": near_full}]})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["total_tokens"] <= MAX_MODEL_LEN
    if r.json()["choices"][0]["finish_reason"] == "length":
        assert usage["total_tokens"] == MAX_MODEL_LEN


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("temperature", 3), ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5), ("n", 0),
    ("max_tokens", 0), ("presence_penalty", 2.5), ("frequency_penalty", -3), ("logprobs", 6), ("seed", "x"),
    ("stop", 5), ("logit_bias", {"abc": 1}), ("logit_bias", {"1": 500}), ("echo", True), ("prompt", []),
    ("prompt", [10**9]), ("stream_options", {"include_usage": True}),
])
def test_invalid_sampling_parameter(server, model, field, value):
    body = {"model": model, "prompt": PROMPT, field: value}
    _error(server.post("/v1/completions", body), 400, field)


@pytest.mark.parametrize("field, value, param", [
    ("top_logprobs", 3, "top_logprobs"), ("top_logprobs", 25, "top_logprobs"),
    ("messages", [], "messages"), ("messages", [{"role": "wizard", "content": "x"}], "messages[0].role"),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content"),
])
def test_invalid_chat_parameter(server, model, field, value, param):
    body = {"model": model, "messages": MESSAGES, field: value}
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    check_schema("ErrorResponse", r.json())
    assert r.json()["error"]["param"].startswith(param.split("[")[0])


def test_unknown_field_is_rejected(server, model):
    """A typo in a VAS field must not silently give an unsteered answer."""
    error = _error(server.post("/v1/completions", {"model": model, "prompt": "hi", "vas_weight": {"likes": 1}}),
                   400, "vas_weight", "unknown_parameter")
    assert "vas_weight" in error["message"]


@pytest.mark.parametrize("body", ['{"model": "m", "prompt": ', "not json", "", "[1, 2]", '{"model": 1}'])
def test_malformed_json(server, body):
    r = server.post("/v1/completions", body)
    assert r.status_code == 400, r.text
    check_schema("ErrorResponse", r.json())


def test_api_key_required(server, model):
    for path, method in (("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/models", "get")):
        for key in (None, "wrong-key"):
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            r = server.http.request(method, path, headers=headers, json={"model": model, "prompt": "hi"})
            _error(r, 401, None, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong-key").completions.create(model=model, prompt=PROMPT, max_tokens=2)
    # Probes and scrapers need no key.
    assert server.http.get("/health").status_code == 200
    assert server.http.get("/metrics").status_code == 200


def test_errors_are_4xx_and_leave_the_server_healthy(server, client, model):
    def responses(first_digit: str) -> float:
        return sum(v for k, v in server.metrics().items()
                   if k.startswith("vas_server_responses_total") and f'status="{first_digit}' in k)

    before_4xx, before_5xx = responses("4"), responses("5")
    bad = [{"model": model, "prompt": "hi", "vas_weights": {"nope": 1}}, {"model": "nope", "prompt": "hi"},
           {"model": model, "prompt": "hi", "temperature": "x"}, "{", {"model": model, "prompt": "hi", "n": -1}]
    for body in bad:
        assert 400 <= server.post("/v1/completions", body).status_code < 500
    assert responses("4") == before_4xx + len(bad)
    assert responses("5") == before_5xx == 0
    assert server.metrics()["vas_server_requests_in_flight"] == 0
    assert server.http.get("/health").json()["status"] == "ok"
    assert client.completions.create(model=model, prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1


# -- models, health, metrics -----------------------------------------------------------------------


def test_models_lists_base_and_heads(client, server, model):
    raw = server.http.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    check_schema("ListModelsResponse", raw)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {model, *HEADS}
    assert models[model].model_extra["max_model_len"] == MAX_MODEL_LEN
    likes = models["likes"].model_extra["vas_head"]
    assert likes["kind"] == "token" and likes["value_model"] == "liker" and likes["description"]
    assert likes["trunk"] == {"type": "base_prefix", "num_layers": 1, "lora": False}
    assert models["s1"].model_extra["vas_head"]["kind"] == "state"


def test_metrics(server, client, model):
    before = server.metrics()
    client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0,
                              extra_body={"vas_weights": {"t1": 1.0}})
    after = server.metrics()
    key = 'vas_server_vas_requests_total{endpoint="completions"}'
    assert after[key] == before.get(key, 0) + 1
    assert after["vas_server_completion_tokens_total"] >= before["vas_server_completion_tokens_total"] + 1
    assert after["vas_server_prompt_tokens_total"] > before["vas_server_prompt_tokens_total"]
    assert after["vas_value_runtime_steps_total"] >= before.get("vas_value_runtime_steps_total", 0) + 1
    assert after["vas_value_runtime_seconds_per_step"] > 0
    assert after['vas_server_generation_requests_total{endpoint="completions"}'] > 0
    assert any(k.startswith("vllm:num_requests_running") for k in after)


def test_ready_line_curl_works(server):
    """The curl line printed at startup is a working request (with a VAS weight)."""
    assert server.ready_lines[1].strip().startswith("curl ")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    out = subprocess.run(["bash", "-c", server.ready_lines[1].strip() + " -s"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "VAS_SERVER_API_KEY": API_KEY})
    body = json.loads(out.stdout)
    check_schema("CreateCompletionResponse", body)
    assert body["vas"]["weights"] == {"likes": 2.0}


# -- concurrency and disconnects -------------------------------------------------------------------


def test_32_concurrent_streams_equal_sequential(server, model, tokenizer):
    words = "The quick brown fox jumps over the lazy dog and I love sunny days".split()
    requests = []
    for i in range(32):
        body = {"model": model, "prompt": " ".join(words[: 2 + i % 12]) + ("?" if i % 3 else "."), "max_tokens": 16,
                "temperature": 0}
        if i % 2:
            body["extra_body"] = {"vas_weights": {"s1": 1.0 + i / 10, "t2": -1.0}}
        requests.append(body)

    async def run(body, client):
        stream = await client.completions.create(stream=True, **body)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def main():
        client = server.async_client()
        sequential = [await run(b, client) for b in requests]
        concurrent = await asyncio.gather(*(run(b, client) for b in requests))
        await client.close()
        return sequential, concurrent

    sequential, concurrent = asyncio.run(main())
    assert all(sequential)
    assert concurrent == sequential


def _wait_idle(server, timeout: float = 15.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        running = sum(v for k, v in m.items() if k.startswith("vllm:num_requests_running"))
        busy = (running, m["vas_server_engine_requests_unfinished"], m["vas_server_requests_in_flight"],
                m.get("vas_engine_active_vas_requests", 0), m.get("vas_value_cache_slots_used", 0))
        if not any(busy) or time.monotonic() > deadline:
            return dict(zip(("running", "unfinished", "in_flight", "vas_active", "vas_slots"), busy))
        time.sleep(0.2)


def _generated_tokens(server) -> float:
    return sum(v for k, v in server.metrics().items() if k.startswith("vllm:generation_tokens_total"))


LONG = 450  # tokens; far longer than the few hundred milliseconds a test waits before disconnecting


def test_disconnect_mid_stream_aborts_engine_request(server, model, tokenizer):
    eos = str(tokenizer.eos_token_id)
    body = {"model": model, "prompt": PROMPT, "max_tokens": LONG, "stream": True,
            "logit_bias": {eos: -100}, "vas_weights": {"s1": 1.0}}  # no early stop: it runs until aborted
    assert all(v == 0 for v in _wait_idle(server).values())
    tokens_before = _generated_tokens(server)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        mid = server.metrics()
        assert mid["vas_server_engine_requests_unfinished"] == 1 and mid["vas_server_requests_in_flight"] == 1
    # The connection is closed now; the engine must drop the request, and VAS its value cache slot.
    state = _wait_idle(server)
    assert all(v == 0 for v in state.values()), state
    assert _generated_tokens(server) - tokens_before < LONG - 50, "the request ran to the end"


def test_disconnect_while_waiting_for_non_streaming_answer(server, model, tokenizer):
    body = {"model": model, "prompt": PROMPT, "max_tokens": LONG, "logit_bias": {str(tokenizer.eos_token_id): -100}}
    tokens_before = _generated_tokens(server)
    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", body, timeout=1.0)
    state = _wait_idle(server)
    assert all(v == 0 for v in state.values()), state
    assert _generated_tokens(server) - tokens_before < LONG - 50, "the request ran to the end"
