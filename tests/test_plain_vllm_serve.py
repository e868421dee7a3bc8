"""vLLM's own OpenAI server with VAS's flags only: no `vas-server` CLI, no middleware.

    python -m vllm.entrypoints.openai.api_server --model BASE \\
        --logits-processors vas_server.processor:VASLogitsProcessor \\
        --additional-config '{"vas": {"value_models": {...}}}'

(`vllm serve`, the same server; its console script is broken in the CPU wheel.) vas_server's
`vllm.general_plugins` entry point gives that server the hidden-state tap and the value models'
check at start, so a request carrying `vllm_xargs: {"vas": ...}` is steered, and invalid settings
are a 400 (vLLM's admission calls the processor's validate_params). vLLM calls validate_params
with the request alone, so without vas-server's middleware a head this engine lacks is not a 400:
the request runs unsteered and the server log names the head. The official `openai` client is
the client.
"""

from __future__ import annotations

import json
import sys

import openai
import pytest

from engine_settings import MAX_MODEL_LEN
from http_server import free_port, start_healthy, stop


@pytest.fixture(scope="module")
def plain_server_and_log(tmp_path_factory, tiny_base, value_models):
    log = tmp_path_factory.mktemp("plain_vllm") / "server.log"
    port = free_port()
    vas = {"vas": {"value_models": {"liker": value_models["liker"], "prefix": value_models["prefix"]}}}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_base),
               "--served-model-name", "tiny", "--port", str(port), "--dtype", "float32", "--seed", "0",
               "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8", "--enforce-eager",
               "--no-enable-chunked-prefill",
               "--logits-processors", "vas_server.processor:VASLogitsProcessor",
               "--additional-config", json.dumps(vas)]
    url = f"http://127.0.0.1:{port}"
    process = start_healthy(command, log, url)
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120), log
    stop(process)


@pytest.fixture(scope="module")
def plain_server(plain_server_and_log):
    return plain_server_and_log[0]


@pytest.fixture(scope="module")
def server_log(plain_server_and_log):
    return plain_server_and_log[1]


def _complete(client, weights: dict | None, prompt="Hello, how are you", **kw):
    # top_k 256: every candidate of the tiny vocabulary, so the liked token is always one
    extra = {"vllm_xargs": {"vas": json.dumps({"weights": weights, "top_k": 256})}} if weights is not None else {}
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, seed=0,
                                     extra_body=extra, **kw)


def test_plain_vllm_serve_steers_with_vas_flags(plain_server, tokenizer, liked_token):
    liked = tokenizer.decode([liked_token])
    plain = _complete(plain_server, None).choices[0].text
    steered = _complete(plain_server, {"likes": 50.0}).choices[0].text  # the liker's one token, strongly
    separate = _complete(plain_server, {"t1": 3.0, "s1": -3.0}).choices[0].text  # own-trunk heads
    assert plain.count(liked) < steered.count(liked) and steered.count(liked) >= 6, (plain, steered)
    assert separate != plain


def test_plain_vllm_serve_refuses_invalid_settings(plain_server):
    with pytest.raises(openai.BadRequestError) as e:
        _complete(plain_server, {"likes": "lots"})
    assert e.value.status_code == 400 and "vas_weights.likes must be a number" in str(e.value)


def test_plain_vllm_serve_runs_an_unknown_head_unsteered_and_logs_it(plain_server, server_log):
    assert _complete(plain_server, {"nope": 1.0, "likes": 50.0}).choices[0].text == \
        _complete(plain_server, None).choices[0].text
    assert "this engine serves no head 'nope'" in server_log.read_text()
