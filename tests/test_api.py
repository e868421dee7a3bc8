"""The HTTP server end to end: `python -m vas_server serve` (vLLM's own OpenAI server with VAS
wired in; tests/http_server.py, one per session) driven by the official `openai` client, and raw
httpx where the test needs the exact bytes. Shapes are checked with the `openai` package's own
response types, so the tests need nothing outside the repository.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time

import httpx
import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from engine_settings import MAX_MODEL_LEN
from http_server import API_KEY, HEADS, PRESETS, PROMPT, ErrorResponse, check_completion_chunk, check_shape


def _greedy(**kw) -> dict:
    return {"temperature": 0, **kw}


# -- completions -----------------------------------------------------------------------------------


def test_completion_non_streaming(server, client, model, tokenizer):
    raw = server.post("/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert raw.status_code == 200, raw.text
    check_shape(Completion, raw.json())
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
    for chunk in chunks:
        check_completion_chunk(chunk)
    assert all(c.get("usage") is None for c in chunks[:-1])
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
    check_shape(Completion, raw.http_response.json())
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
        check_shape(ChatCompletionChunk, chunk)
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
    check_shape(Completion, raw.http_response.json())
    response = raw.parse()
    lp = response.choices[0].logprobs
    n = response.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for chosen, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 3  # the top 2 and the chosen token, by text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_prompt_logprobs_beside_shared_path_steering(client, model, tokenizer):
    """vLLM computes prompt log-probs with the model's compute_logits after sampling, where the
    shared path's hidden-state tap also reads its rows: a steered request asking for them gets
    them, and the same steered tokens as without."""
    steer = {"vas_weights": {"likes": 3.0}, "vas_top_k": 256}
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, extra_body=steer)
    both = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body={**steer, "prompt_logprobs": 1})
    assert both.choices[0].text == plain.choices[0].text and both.model_extra["vas"] == plain.model_extra["vas"]
    prompt_logprobs = both.choices[0].model_extra["prompt_logprobs"]
    assert len(prompt_logprobs) == len(tokenizer.encode(PROMPT)) and prompt_logprobs[0] is None


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
    check_shape(ChatCompletion, raw.json())
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
        check_shape(ChatCompletionChunk, chunk)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == message.content
    assert chunks[-1]["usage"] == response.usage.model_dump(exclude_none=True)

    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0,
                                            stream=True)
    assert "".join(p.choices[0].delta.content or "" for p in stream) == message.content


def test_chat_content_parts(client, model):
    plain = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0)
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, MESSAGES[1]]
    same = client.chat.completions.create(model=model, messages=parts, max_tokens=6, temperature=0)
    assert same.choices[0].message.content == plain.choices[0].message.content
    assert same.usage.prompt_tokens == plain.usage.prompt_tokens


def test_chat_logprobs(client, model):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=6,
                                                           temperature=0, logprobs=True, top_logprobs=3)
    check_shape(ChatCompletion, raw.http_response.json())
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

APPLIED_S2 = {"weights": {"s2": 1.0}, "top_k": 20, "restrict_to_top_k": False}


def test_vas_fields_are_reported(server, client, model):
    response = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0,
                                         extra_body={"vas_weights": {"s1": 1.5, "t1": 0, "likes": -1}})
    assert response.model_extra["vas"] == {"weights": {"s1": 1.5, "likes": -1.0}, "top_k": 20,
                                           "restrict_to_top_k": False}
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6,
                                          extra_body={"vas_weights": {"t2": 2}, "vas_top_k": 5,
                                                      "vas_restrict_to_top_k": True})
    assert chat.model_extra["vas"] == {"weights": {"t2": 2.0}, "top_k": 5, "restrict_to_top_k": True}
    # Streaming: the chunk that finishes each choice says what was applied.
    chunks = server.sse("/v1/chat/completions", {"model": model, "messages": MESSAGES, "max_tokens": 4, "n": 2,
                                                 "vas_weights": {"s2": 1}})
    finishing = [c for c in chunks if any(choice["finish_reason"] for choice in c["choices"])]
    assert len(finishing) == 2 and all(c["vas"] == APPLIED_S2 for c in finishing)
    zero = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0,
                                     extra_body={"vas_weights": {"s1": 0}})
    assert zero.model_extra["vas"] is None  # all-zero weights: plain vLLM, nothing applied


def test_zero_weights_equal_plain_and_weights_change_text(client, model):
    def text(**extra):
        return client.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0.8, seed=11,
                                         extra_body=extra or None).choices[0].text

    plain = text()
    assert text(vas_weights={"s1": 0, "t1": 0}) == plain
    steered = text(vas_weights={"s1": 3, "t1": -3})
    assert steered != plain
    # vLLM's own `vllm_xargs`, written by hand, is the same request.
    assert text(vllm_xargs={"vas": json.dumps({"weights": {"s1": 3, "t1": -3}})}) == steered


def test_steering_raises_liked_token_frequency(client, model, liked_token, tokenizer):
    """The `likes` head values one token (" good"); a positive weight makes it far more frequent,
    also together with vLLM's own top_k / min_p (applied after VAS)."""
    liked = tokenizer.decode([liked_token])

    def count(weight: float, **sampling) -> int:
        response = client.completions.create(
            model=model, prompt=[PROMPT, "The quick brown fox", "Paris is the"], max_tokens=24, temperature=1.0,
            seed=5, n=2, extra_body={"vas_weights": {"likes": weight}, "vas_top_k": 256, **sampling})
        return sum(c.text.count(liked) for c in response.choices)

    unsteered, steered = count(0.0), count(6.0)
    assert steered >= unsteered + 10, (unsteered, steered)
    assert count(-6.0) <= unsteered
    assert count(6.0, top_k=50, min_p=0.01) >= count(0.0, top_k=50, min_p=0.01) + 10


def test_structured_output_with_steering(client, model):
    """vLLM's structured outputs (a JSON schema) hold under steering: the answer parses and
    matches the schema whatever the value heads push for."""
    schema = {"type": "object", "properties": {"mood": {"type": "string", "enum": ["good", "bad"]},
                                               "score": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["mood", "score"], "additionalProperties": False}
    for weights in ({"likes": 6.0}, {"s1": -3.0, "t2": 3.0}):
        response = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=40, temperature=1.0, seed=3,
            response_format={"type": "json_schema", "json_schema": {"name": "mood", "schema": schema}},
            extra_body={"vas_weights": weights})
        answer = json.loads(response.choices[0].message.content)
        assert set(answer) == {"mood", "score"} and answer["mood"] in ("good", "bad") and 0 <= answer["score"] <= 9
        assert response.model_extra["vas"]["weights"] == weights


def test_tokenize_and_model_retrieve(server, client, model, tokenizer):
    r = server.post("/tokenize", {"model": model, "prompt": PROMPT})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == tokenizer.encode(PROMPT)
    assert client.models.retrieve(model).id == model
    head = client.models.retrieve("likes")
    assert head.model_extra["vas_head"]["value_model"] == "liker"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# -- errors ----------------------------------------------------------------------------------------


def _error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = check_shape(ErrorResponse, response.json()).error
    if param is not None:
        assert error.param == param, error
    return error.model_dump()


def test_unknown_head_lists_known_heads(server, client, model):
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": MESSAGES})):
        for stream in (False, True):  # a streaming request is refused before the stream starts
            r = server.post(path, {"model": model, **body, "stream": stream, "vas_weights": {"nice": 1.0}})
            error = _error(r, 400, "vas_weights.nice")
            assert "'nice'" in error["message"] and ", ".join(HEADS) in error["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt=PROMPT, extra_body={"vas_weights": {"nice": 1}})
    assert info.value.status_code == 400 and info.value.body["param"] == "vas_weights.nice"


@pytest.mark.parametrize("raw_weights", ['NaN', 'Infinity', '-Infinity', '1e999', '1e39', '"2.0"', 'true', 'null',
                                         '101', '-1e3', '1' + '0' * 400])
def test_non_finite_or_non_numeric_or_too_large_weight(server, model, raw_weights):
    body = '{"model": %s, "prompt": "hi", "vas_weights": {"likes": %s}}' % (json.dumps(model), raw_weights)
    error = _error(server.post("/v1/completions", body), 400)
    assert error["param"] == "vas_weights.likes"  # by request_guard (non-finite, past int64) or VASRequest
    assert any(reason in error["message"] for reason in ("must be a number in -100..100", "must be a finite number",
                                                          "outside the 64-bit integer range"))


def test_non_numeric_weight_through_the_client(client, model):
    # (The client itself refuses to send inf or nan: its JSON encoder is strict.)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=MESSAGES, extra_body={"vas_weights": {"s1": "1.5"}})
    assert info.value.body["param"] == "vas_weights.s1"


@pytest.mark.parametrize("field, value", [("vas_weights", [1, 2]), ("vas_top_k", 0), ("vas_top_k", 257),
                                          ("vas_top_k", 2.5), ("vas_top_k", "5"), ("vas_restrict_to_top_k", "yes")])
def test_invalid_vas_settings(server, model, field, value):
    body = {"model": model, "prompt": "hi", "vas_weights": {"likes": 1}, field: value}
    _error(server.post("/v1/completions", body), 400, field)


@pytest.mark.parametrize("xargs", [{"vas": "not json"}, {"vas": "[1]"}, {"vas": json.dumps({"weight": {}})}])
def test_invalid_vllm_xargs(server, model, xargs):
    _error(server.post("/v1/completions", {"model": model, "prompt": "hi", "vllm_xargs": xargs}), 400, "vllm_xargs")


def test_misspelt_vas_field_is_refused(server, model):
    """A typo in a VAS field must not silently give an unsteered answer."""
    error = _error(server.post("/v1/completions", {"model": model, "prompt": "hi", "vas_weight": {"likes": 1}}),
                   400, "vas_weight")
    assert "vas_weights" in error["message"]


def test_unknown_model(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt=PROMPT)
    _error(server.post("/v1/chat/completions", {"model": "no-such-model", "messages": MESSAGES}), 404)


def test_request_without_model_is_served(server):
    r = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "vas_weights": {"likes": 1}})
    assert r.status_code == 200, r.text
    assert r.json()["vas"]["weights"] == {"likes": 1.0}


def test_prompt_longer_than_context(server, client, model, tokenizer):
    long_text = "The quick brown fox jumps over the lazy dog. " * 100
    assert len(tokenizer.encode(long_text)) > MAX_MODEL_LEN
    _error(server.post("/v1/completions", {"model": model, "prompt": long_text}), 400)
    _error(server.post("/v1/completions", {"model": model, "prompt": long_text, "stream": True}), 400)
    _error(server.post("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": long_text}]}),
           400)
    # vLLM's rule: a max_tokens past the context is cut to what is left of it.
    r = server.post("/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": MAX_MODEL_LEN,
                                        "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == MAX_MODEL_LEN, r.text


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5), ("n", 0),
    ("max_tokens", 0), ("logprobs", 50), ("seed", "x"), ("stop", 5), ("prompt", []), ("prompt", [10**9]),
])
def test_invalid_sampling_parameter(server, model, field, value):
    body = {"model": model, "prompt": PROMPT, field: value}
    _error(server.post("/v1/completions", body), 400)


@pytest.mark.parametrize("body, param, message", [
    ('{"model": "m", "prompt": ', "body", "the request body must be a JSON object"),
    ("not json", "body", "the request body must be a JSON object"),
    ("", "body", "the request body must be a JSON object"),
    ("[1, 2]", "body", "the request body must be a JSON object"),
    ('{"model": 1}', "model", "model must be a string, got an integer 1"),
])
def test_malformed_json(server, body, param, message):
    """Each is a 400 in OpenAI's error shape (vLLM's) naming what is wrong, not a 422 or a bare string."""
    error = _error(server.post("/v1/completions", body), 400, param)
    assert message in error["message"] and error["type"] == "BadRequestError", error


def test_body_size_limit(server, model):
    body = {"model": model, "prompt": "x" * (9 * 2**20)}
    _error(server.post("/v1/completions", body), 413)


def test_api_key_required(server, model):
    for path, method in (("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/models", "get")):
        for key in (None, "wrong-key"):
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            body = {"model": model, "prompt": "hi", "vas_weight": {"typo": 1}}  # 401 comes before the 400
            r = server.http.request(method, path, headers=headers, json=body)
            _error(r, 401)
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong-key").completions.create(model=model, prompt=PROMPT, max_tokens=2)
    # Probes and scrapers need no key.
    assert server.http.get("/health").status_code == 200
    assert server.http.get("/metrics").status_code == 200


def test_errors_leave_the_server_healthy(server, client, model):
    bad = [{"model": model, "prompt": "hi", "vas_weights": {"nope": 1}}, {"model": "nope", "prompt": "hi"},
           {"model": model, "prompt": "hi", "temperature": "x"}, "{", {"model": model, "prompt": "hi", "n": -1},
           {"model": model, "prompt": "hi", "vas_weights": {"likes": 1e39}}]
    for body in bad:
        assert 400 <= server.post("/v1/completions", body).status_code < 500
    assert server.http.get("/health").status_code == 200
    assert client.completions.create(model=model, prompt=PROMPT, max_tokens=2,
                                      extra_body={"vas_weights": {"likes": 2}}).usage.completion_tokens >= 1


# -- models, health, metrics -----------------------------------------------------------------------


def test_models_lists_base_and_heads(client, server, model, tiny_base):
    raw = server.http.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    for card in raw.json()["data"]:
        check_shape(Model, card)
    assert str(tiny_base) not in raw.text  # no machine paths: a model's name instead
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {model, *HEADS, *PRESETS}
    assert models[model].model_extra["max_model_len"] == MAX_MODEL_LEN
    likes = models["likes"].model_extra["vas_head"]
    assert likes["kind"] == "token" and likes["value_model"] == "liker" and likes["description"]
    assert likes["trunk"] == {"type": "base_prefix", "num_layers": 1, "lora": False,
                              "base_architecture": "LlamaForCausalLM", "base_num_layers": 2, "base_hidden_size": 128}
    assert likes["runtime"] == "shared"
    assert models["s1"].model_extra["vas_head"]["kind"] == "state"
    assert models["s1"].model_extra["vas_head"]["runtime"] == "separate"


def test_metrics(server, client, model):
    before = server.metrics()
    client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0,
                              extra_body={"vas_weights": {"t1": 1.0}})
    after = server.metrics()
    assert after["vas_engine_vas_requests_total"] == before.get("vas_engine_vas_requests_total", 0) + 1
    assert after["vas_value_runtime_steps_total"] >= before.get("vas_value_runtime_steps_total", 0) + 1
    assert after["vas_value_runtime_seconds_per_step"] > 0
    assert any(k.startswith("vllm:num_requests_running") for k in after)
    assert any(k.startswith("vllm:generation_tokens_total") for k in after)


def test_ready_line_curl_works(server):
    """The curl line printed at startup is a working request (with a VAS weight)."""
    assert server.ready_lines[1].strip().startswith("curl ")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    out = subprocess.run(["bash", "-c", server.ready_lines[1].strip() + " -s"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "VAS_SERVER_API_KEY": API_KEY})
    body = json.loads(out.stdout)
    check_shape(Completion, body)
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
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

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
        busy = (sum(v for k, v in m.items() if k.startswith("vllm:num_requests_running")),
                sum(v for k, v in m.items() if k.startswith("vllm:num_requests_waiting")),
                m.get("vas_engine_active_vas_requests", 0), m.get("vas_value_cache_slots_used", 0))
        if not any(busy) or time.monotonic() > deadline:
            return dict(zip(("running", "waiting", "vas_active", "vas_slots"), busy))
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
        assert _wait_idle(server, timeout=0)["vas_active"] == 1
    # The connection is closed now; the engine must drop the request, and VAS its row.
    state = _wait_idle(server)
    assert all(v == 0 for v in state.values()), state
    assert _generated_tokens(server) - tokens_before < LONG - 50, "the request ran to the end"


def test_disconnect_while_waiting_for_non_streaming_answer(server, model, tokenizer):
    body = {"model": model, "prompt": PROMPT, "max_tokens": LONG, "logit_bias": {str(tokenizer.eos_token_id): -100},
            "vas_weights": {"s1": 1.0}}
    tokens_before = _generated_tokens(server)
    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", body, timeout=1.0)
    state = _wait_idle(server)
    assert all(v == 0 for v in state.values()), state
    assert _generated_tokens(server) - tokens_before < LONG - 50, "the request ran to the end"
