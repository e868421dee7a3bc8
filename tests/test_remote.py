"""VAS over a remote base (`vas-server serve --remote-base`), against a real local vLLM server.

The upstream is vLLM's own OpenAI server on the embedded SmolLM2-135M-Instruct, in float32, with
`--max-logprobs 256`; the remote-mode server steers it with the demo value model, which runs on
its own trunk here (the base's first layers, loaded locally). Its greedy tokens must equal
in-process VAS's on the same requests (the in-process engine takes the shared path, in float32).
The official `openai` client is the client.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from http_server import REPO, free_port

STARTUP_TIMEOUT_S = 240
UPSTREAM_NAME = "smol"
MAX_MODEL_LEN = 1024
PROMPTS = ["How was your day?", "Tell me about your favourite food."]
CASES = [  # (vas_weights, vas_top_k, vas_restrict_to_top_k)
    (None, None, False),
    ({"positive": 2.0}, None, False),
    ({"positive": 4.0}, None, False),
    ({"concise": 3.0, "simple": 1.0}, None, False),
    ({"positive": -2.0}, None, False),
    ({"positive": 2.0}, 5, True),
]
TOKENS = 16


def _start(command: list[str], log_path, url: str) -> subprocess.Popen:
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{command[2]} did not start; log tail:\n{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=90)


@pytest.fixture(scope="module")
def base_dir() -> str:
    from vas_server.core.base_model import ensure_base_model

    return str(ensure_base_model())


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, base_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base_dir,
                      "--served-model-name", UPSTREAM_NAME, "--port", str(port), "--dtype", "float32",
                      "--max-logprobs", "256", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
                      "--no-enable-chunked-prefill", "--seed", "0"],
                     tmp_path_factory.mktemp("upstream") / "server.log", url)
    yield process, url
    _stop(process)


@pytest.fixture(scope="module")
def remote(tmp_path_factory, upstream):
    _, upstream_url = upstream
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start([sys.executable, "-m", "vas_server", "serve", "--remote-base", f"{upstream_url}/v1",
                      "--remote-model", UPSTREAM_NAME, "--port", str(port), "--dtype", "float32",
                      "--max-model-len", str(MAX_MODEL_LEN), "--remote-timeout", "20"],
                     tmp_path_factory.mktemp("remote") / "server.log", url)
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    _stop(process)


@pytest.fixture(scope="module")
def prompt_ids(base_dir):
    from transformers import AutoTokenizer

    from value_models.sample import chat_prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return [chat_prompt_ids(tokenizer, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def in_process_greedy(base_dir, prompt_ids):
    """In-process VAS's greedy tokens for every (case, prompt)."""
    from vllm import LLM, SamplingParams

    from vas_server.cli import demo_value_models
    from vas_server.config import VASConfig
    from vas_server.engine import engine_kwargs
    from vas_server.params import make_extra_args

    llm = LLM(**engine_kwargs(base_dir, VASConfig(value_models=demo_value_models()), dtype="float32",
                              max_model_len=MAX_MODEL_LEN, seed=0))
    try:
        params = [SamplingParams(temperature=0, max_tokens=TOKENS,
                                 extra_args=make_extra_args(w, top_k=k, restrict_to_top_k=r) if w else None)
                  for w, k, r in CASES for _ in prompt_ids]
        outputs = llm.generate([{"prompt_token_ids": ids} for _ in CASES for ids in prompt_ids], params,
                               use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


def _steering(weights, top_k, restrict) -> dict:
    if weights is None:
        return {}
    body = {"vas_weights": weights}
    if top_k is not None:
        body["vas_top_k"] = top_k
    if restrict:
        body["vas_restrict_to_top_k"] = True
    return body


def test_remote_greedy_tokens_equal_in_process_vas(remote, prompt_ids, in_process_greedy):
    got = []
    for weights, top_k, restrict in CASES:
        for ids in prompt_ids:
            answer = remote.completions.create(model="SmolLM2-135M-Instruct", prompt=ids, max_tokens=TOKENS,
                                               temperature=0, extra_body={"return_token_ids": True,
                                                                          **_steering(weights, top_k, restrict)})
            got.append(answer.choices[0].token_ids)
    mismatches = [(CASES[i // len(prompt_ids)], g, w) for i, (g, w) in enumerate(zip(got, in_process_greedy)) if g != w]
    assert not mismatches, mismatches
    assert got[0] != got[2 * len(prompt_ids)], "positive 4 changed nothing"


def test_remote_chat_streaming_and_presets_through_the_openai_client(remote):
    chat = remote.chat.completions.create(model="cheerful", messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=8, temperature=0)
    assert chat.model == "cheerful" and chat.choices[0].message.content
    assert chat.model_extra["vas"] == {"weights": {"positive": 3.0}, "top_k": 256, "restrict_to_top_k": False}
    assert chat.usage.completion_tokens == 8
    chunks = list(remote.completions.create(model="SmolLM2-135M-Instruct", prompt="Hello, my name is",
                                            max_tokens=6, temperature=1.0, seed=3, stream=True,
                                            extra_body={"vas_weights": {"concise": 2.0}}))
    assert "".join(c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["vas"]["weights"] == {"concise": 2.0}


def test_an_unknown_head_is_refused_before_the_upstream_is_called(remote):
    with pytest.raises(openai.BadRequestError) as e:
        remote.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2,
                                  extra_body={"vas_weights": {"nope": 1.0}})
    assert "unknown head 'nope'" in str(e.value)


def test_sampling_the_remote_loop_cannot_do_exactly_is_refused(remote):
    with pytest.raises(openai.BadRequestError) as e:
        remote.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2, temperature=0.7,
                                  extra_body={"vas_weights": {"positive": 1.0}})
    assert "temperature must be 0 or 1" in str(e.value)


def test_an_upstream_that_is_down_is_an_error_answer_not_a_hang(remote, upstream):
    """Last in this module: it stops the upstream."""
    _stop(upstream[0])
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        remote.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2, temperature=0)
    assert time.monotonic() - started < 60
    assert e.value.status_code >= 500 and json.loads(e.value.response.text)["error"]["message"]
