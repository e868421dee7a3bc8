"""Hostile clients: several hundred malformed or extreme requests over every route and field of the
session's HTTP server (tests/http_server.py), sent concurrently. None may get a 5xx, every 4xx is
in OpenAI's error shape, each is answered within seconds, and afterwards the server still answers
a normal steered request as it did before (docs/SERVER.md, "Hostile input").

`python tests/test_fuzz.py URL` runs the same requests against a running server and prints the
counts by status code (the survey of docs/SERVER.md).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass

import httpx

from http_server import API_KEY, PROMPT, ErrorResponse

MODEL = "tiny"  # http_server.SERVED_NAME
HEAD = "likes"  # a head of the session server
CONCURRENCY = 16
ANSWER_WITHIN_S = 20.0  # a 2-core machine shared with other work; answers take well under 1 s alone
MAX_TOKENS = 2

BIG_INT = 10 ** 400  # json.dumps writes it; Python's json.loads reads it as an int
NAN, INF = float("nan"), float("inf")


@dataclass
class Case:
    name: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict | None = None


def _json(body) -> bytes:
    return json.dumps(body).encode()  # NaN/Infinity as JavaScript literals, "\ud800" as an escape


def _post(name: str, path: str, body) -> Case:
    return Case(name, "POST", path, body if isinstance(body, bytes) else _json(body))


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, **fields}


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS, **fields}


def responses(**fields) -> dict:
    return {"model": MODEL, "input": PROMPT, "max_output_tokens": MAX_TOKENS, **fields}


# Values of the wrong type or out of range for a field expecting `kind`.
WRONG = {
    "int": ["5", "", True, 1.5, [], {}, -1, 0, 2**31, 2**63, 2**64, -2**64, BIG_INT, NAN, INF, 1e308],
    "number": ["1", "", True, [], {}, -1, 1e308, -1e308, BIG_INT, NAN, INF, -INF, 2**64],
    "bool": ["yes", "true", 1, 0, [], {}, "\ud800"],
    "string": [5, True, [], {}, "\ud800", "x" * 100_000],
}
FIELDS = {  # the standard sampling fields shared by completions and chat
    "max_tokens": "int", "n": "int", "seed": "int", "top_k": "int", "min_tokens": "int",
    "temperature": "number", "top_p": "number", "min_p": "number", "presence_penalty": "number",
    "frequency_penalty": "number", "repetition_penalty": "number",
    "stream": "bool", "ignore_eos": "bool", "skip_special_tokens": "bool", "user": "string",
}
STOPS = ["", [""], ["a", ""], [5], 5, True, {}, ["x"] * 1000, "\ud800", [None]]
BAD_WEIGHTS = [[], "positive", {HEAD: "1"}, {HEAD: True}, {HEAD: None}, {HEAD: NAN}, {HEAD: INF}, {HEAD: -INF},
               {HEAD: 1e39}, {HEAD: -1e39}, {HEAD: 1e308}, {HEAD: 10**39}, {HEAD: BIG_INT}, {HEAD: 3.4e38},
               {HEAD: 100.5}, {"nope": 1.0}, {"": 1.0}, {"\ud800": 1.0}, {HEAD: [1]}, {HEAD: {}}, 5, True]
GOOD_WEIGHTS = [{}, {HEAD: 0}, {HEAD: 100}, {HEAD: -100}, {HEAD: 1e-300}, {"s1": 5, "t1": -5, HEAD: 100},
                {"s1": 100, "s2": 100, "t1": 100, "t2": 100, HEAD: 100}]
BAD_TOP_K = [0, -1, 257, 2**64, BIG_INT, 1.5, 20.0, "20", True, [], NAN]
PROMPTS = [
    "", [], [[]], [""], [-1], [384], [2**31], [2**63], [2**64], [1.5], ["a", 5], [[1, 2], "a"], [None], None, 5,
    {"a": 1}, "\ud800", ["ok", "\ud800"], "\udfff\ud800", "\x00" * 64, "word " * 2000, ["word " * 2000],
    list(range(384)) * 3, ["a"] * 300, [[1]] * 300, "x" * 1_000_000,
]


def cases() -> list[Case]:
    out: list[Case] = []
    for field, kind in FIELDS.items():
        for i, value in enumerate(WRONG[kind]):
            out.append(_post(f"completions {field}[{i}]", "/v1/completions", completion(**{field: value})))
            if i % 2 == 0:
                out.append(_post(f"chat {field}[{i}]", "/v1/chat/completions", chat(**{field: value})))
    for i, value in enumerate(WRONG["int"]):
        out.append(_post(f"chat max_completion_tokens[{i}]", "/v1/chat/completions", chat(max_completion_tokens=value)))
        out.append(_post(f"completions logprobs[{i}]", "/v1/completions", completion(logprobs=value)))
        out.append(_post(f"chat top_logprobs[{i}]", "/v1/chat/completions", chat(logprobs=True, top_logprobs=value)))
        out.append(_post(f"completions prompt_logprobs[{i}]", "/v1/completions", completion(prompt_logprobs=value)))
        out.append(_post(f"responses max_output_tokens[{i}]", "/v1/responses", responses(max_output_tokens=value)))
    for i, value in enumerate(WRONG["bool"]):
        out.append(_post(f"completions echo[{i}]", "/v1/completions", completion(echo=value)))
        out.append(_post(f"chat logprobs[{i}]", "/v1/chat/completions", chat(logprobs=value)))
        out.append(_post(f"chat add_generation_prompt[{i}]", "/v1/chat/completions", chat(add_generation_prompt=value)))
    for i, value in enumerate(WRONG["number"]):
        out.append(_post(f"responses temperature[{i}]", "/v1/responses", responses(temperature=value)))
        out.append(_post(f"completions logit_bias[{i}]", "/v1/completions", completion(logit_bias={"5": value})))
    for i, stop in enumerate(STOPS):
        out.append(_post(f"completions stop[{i}]", "/v1/completions", completion(stop=stop)))
        out.append(_post(f"chat stop[{i}]", "/v1/chat/completions", chat(stop=stop, stream=True)))
    for i, weights in enumerate(BAD_WEIGHTS + GOOD_WEIGHTS):
        out.append(_post(f"completions vas_weights[{i}]", "/v1/completions", completion(vas_weights=weights)))
        out.append(_post(f"chat stream vas_weights[{i}]", "/v1/chat/completions", chat(vas_weights=weights, stream=True)))
        out.append(_post(f"responses vas_weights[{i}]", "/v1/responses", responses(vas_weights=weights)))
    for i, top_k in enumerate(BAD_TOP_K):
        out.append(_post(f"completions vas_top_k[{i}]", "/v1/completions", completion(vas_weights={HEAD: 1}, vas_top_k=top_k)))
    for i, restrict in enumerate(["yes", 1, 0, None, [], "\ud800"]):
        out.append(_post(f"chat vas_restrict_to_top_k[{i}]", "/v1/chat/completions",
                         chat(vas_weights={HEAD: 1}, vas_restrict_to_top_k=restrict)))
    for i, xargs in enumerate([{"vas": "{"}, {"vas": "[]"}, {"vas": '{"weights": {"likes": 1e39}}'},
                               {"vas": '{"weights": {"likes": NaN}}'}, {"vas": '{"top_k": 0}'}, {"vas": 5},
                               {"vas": '{"bogus": 1}'}, "vas", [1], {"other": [1, {"a": 2}]}]):
        out.append(_post(f"completions vllm_xargs[{i}]", "/v1/completions", completion(vllm_xargs=xargs)))
    out += [_post("completions vas_typo", "/v1/completions", completion(vas_weight={HEAD: 1})),
            _post("chat vas_unknown", "/v1/chat/completions", chat(vas_bogus=1))]
    for i, prompt in enumerate(PROMPTS):
        out.append(_post(f"completions prompt[{i}]", "/v1/completions", completion(prompt=prompt)))
    for i, messages in enumerate([[], None, "hi", [{}], [{"role": "user"}], [{"role": "nobody", "content": "x"}],
                                  [{"role": "user", "content": 5}], [{"role": "user", "content": "\ud800"}],
                                  [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}],
                                  [{"role": "user", "content": [{"type": "nope"}]}],
                                  [{"role": "user", "content": "word " * 2000}],
                                  [{"role": "user", "content": "hi"}] * 2000]):
        out.append(_post(f"chat messages[{i}]", "/v1/chat/completions", chat(messages=messages)))
    for i, value in enumerate([None, 5, "", "\ud800", ["a"], [{"role": "user", "content": 5}], "word " * 2000]):
        out.append(_post(f"responses input[{i}]", "/v1/responses", responses(input=value)))
    # n and max_tokens at their extremes; prompt batch x n
    for i, (prompt, n) in enumerate([(PROMPT, 10_000), (PROMPT, 2**31), ([PROMPT] * 64, 128), ([PROMPT] * 512, 1),
                                     ([[1]] * 2048, 4), (PROMPT, 0), (PROMPT, -1)]):
        out.append(_post(f"completions batch x n[{i}]", "/v1/completions", completion(prompt=prompt, n=n, max_tokens=1)))
    for i, n in enumerate([10_000, 2**31, 0]):
        out.append(_post(f"chat n extreme[{i}]", "/v1/chat/completions", chat(n=n, max_tokens=1)))
    for i, max_tokens in enumerate([10**9, 2**63 - 1, 0, -5, 513, 1.0]):
        out.append(_post(f"completions max_tokens extreme[{i}]", "/v1/completions", completion(max_tokens=max_tokens)))
    # token ids out of the vocabulary (384 tokens), and other id lists
    for field in ("stop_token_ids", "allowed_token_ids", "logprob_token_ids"):
        for i, ids in enumerate([[384], [-1], [2**63], [1.5], ["1"], 5, [], list(range(5000))]):
            out.append(_post(f"completions {field}[{i}]", "/v1/completions", completion(**{field: ids, "logprobs": 1})))
    for i, bias in enumerate([{"384": 1}, {"-1": 1}, {"abc": 1}, {"1": 1e308}, [], "x", {str(k): 1 for k in range(384)}]):
        out.append(_post(f"chat logit_bias[{i}]", "/v1/chat/completions", chat(logit_bias=bias)))
    for i, (field, value) in enumerate([("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
                                        ("response_format", {"type": "bogus"}), ("response_format", "json"),
                                        ("structured_outputs", {"regex": "("}), ("structured_outputs", {"choice": []}),
                                        ("structured_outputs", {"grammar": "???"}), ("stream_options", {"include_usage": "yes"}),
                                        ("stream_options", "x"), ("truncate_prompt_tokens", 10**9), ("truncate_prompt_tokens", -2),
                                        ("priority", 5), ("priority", 2**64), ("best_of", 10_000), ("use_beam_search", True),
                                        ("prompt_embeds", "AAAA"), ("bad_words", [""]), ("bad_words", 5), ("suffix", "x"),
                                        ("request_id", 5), ("request_id", "x" * 100_000), ("unknown_field", [1] * 1000),
                                        ("model", "nope"), ("model", 5), ("model", "\ud800"), ("echo", True)]):
        out.append(_post(f"completions misc {field}[{i}]", "/v1/completions", completion(**{field: value})))
    # bodies that are not JSON objects, bad UTF-8, deep nesting, size limits
    deep = b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize", "/v1/messages",
                 "/invocations", "/v1/chat/completions/batch", "/detokenize", "/generative_scoring"):
        for i, body in enumerate([b"", b"{", b"[]", b"null", b"5", b'"x"', b"\xff\xfe\xfd", b'{"prompt": "\xff"}',
                                  b'{"model": "tiny", "prompt": "a\xc3", "max_tokens": 2}', deep,
                                  b'{"a": ' * 5000 + b"1" + b"}" * 5000, b'{"prompt": NaN}', b'{"max_tokens": 1e999}',
                                  b" " * 1000, b"\x00" * 1000]):
            out.append(Case(f"raw {path}[{i}]", "POST", path, body))
        out.append(Case(f"too large {path}", "POST", path, b'{"prompt": "' + b"x" * (9 * 2**20) + b'"}'))
    # other routes
    for i, body in enumerate([{"model": MODEL, "prompt": "\ud800"}, {"model": MODEL, "prompt": 5},
                              {"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]}]):
        out.append(_post(f"tokenize[{i}]", "/tokenize", body))
    for i, tokens in enumerate([[384], [-1], [2**63], ["a"], [1.5], 5, list(range(384)) * 100]):
        out.append(_post(f"detokenize[{i}]", "/detokenize", {"model": MODEL, "tokens": tokens}))
    for i, body in enumerate([{"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "\ud800"}]},
                              {"model": MODEL, "max_tokens": "2", "messages": [{"role": "user", "content": "hi"}]},
                              {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],
                               "stop_sequences": [""]},
                              {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],
                               "vas_weights": {HEAD: 1e39}}]):
        out.append(_post(f"messages[{i}]", "/v1/messages", body))
    for i, body in enumerate([completion(prompt="\ud800"), completion(stop=""), chat(seed=2**64),
                              completion(vas_weights={HEAD: 1e39})]):
        out.append(_post(f"invocations[{i}]", "/invocations", body))
    for model_id in ("nope", "x" * 5000, "%00", "..%2F..%2Fetc", MODEL, HEAD):
        out.append(Case(f"GET model {model_id[:10]}", "GET", f"/v1/models/{model_id}"))
    for path in ("/v1/models", "/metrics", "/health", "/version", "/load", "/ping", "/v1/responses/nope",
                 "/v1/nothing", "/v1/completions"):
        out.append(Case(f"GET {path}", "GET", path))
    out += [Case("no auth", "POST", "/v1/completions", _json(completion()), {"Authorization": ""}),
            Case("wrong auth", "POST", "/v1/completions", _json(completion()), {"Authorization": "Bearer nope"}),
            Case("form body", "POST", "/v1/completions", b"a=1", {"Content-Type": "application/x-www-form-urlencoded"}),
            Case("huge header", "POST", "/v1/completions", _json(completion()), {"X-Big": "x" * 60_000})]
    return out


@dataclass
class Result:
    case: Case
    status: int
    seconds: float
    body: bytes


async def _send(http: httpx.AsyncClient, case: Case) -> Result:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}", **(case.headers or {})}
    headers = {k: v for k, v in headers.items() if v}
    start = time.monotonic()
    try:
        response = await http.request(case.method, case.path, content=case.body, headers=headers)
        status, body = response.status_code, response.content
    except httpx.HTTPError as e:  # no answer at all counts as a fault
        status, body = 599, repr(e).encode()
    return Result(case, status, time.monotonic() - start, body)


async def run_cases(url: str, all_cases: list[Case]) -> list[Result]:
    limit = asyncio.Semaphore(CONCURRENCY)
    timeout = httpx.Timeout(ANSWER_WITHIN_S * 3)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as http:
        async def one(case: Case) -> Result:
            async with limit:
                return await _send(http, case)

        return await asyncio.gather(*(one(c) for c in all_cases))


def stream_error(result: Result) -> dict | None:
    """The error event inside a 200 event stream, if any (vLLM reports some errors this way)."""
    for line in result.body.decode(errors="replace").splitlines():
        if line.startswith("data: ") and '"error"' in line:
            try:
                return json.loads(line[6:])
            except ValueError:
                return None
    return None


def status_counts(results: list[Result]) -> Counter:
    return Counter(r.status if not (r.status == 200 and stream_error(r)) else "200+stream error" for r in results)


def test_fuzz(server, model):
    # Every route: the middleware reads, limits and checks (request_guard) every JSON POST body.
    all_cases = cases()
    assert len(all_cases) >= 300 and model == MODEL
    steered = completion(max_tokens=8, temperature=0, vas_weights={HEAD: 4.0})
    before = server.post("/v1/completions", steered)
    assert before.status_code == 200, before.text

    started = time.monotonic()
    results = asyncio.run(run_cases(server.url, all_cases))
    elapsed = time.monotonic() - started
    print(f"\n{len(results)} hostile requests in {elapsed:.1f} s: {dict(status_counts(results))}")
    faults = [f"{r.case.name}: {r.status} {r.body[:300]!r}" for r in results if r.status >= 500]
    assert not faults, "\n".join(faults)
    for r in results:
        if r.case.path == "/v1/messages" and r.status in (400, 422) and b'"type":"error"' in r.body.replace(b" ", b""):
            continue  # vLLM's Anthropic route answers in Anthropic's error shape, as it should
        if 400 <= r.status < 500 and r.status not in (404, 405):  # unknown routes and methods: Starlette's
            ErrorResponse.model_validate_json(r.body)
    errors_in_streams = [f"{r.case.name}: {stream_error(r)}" for r in results if r.status == 200 and stream_error(r)]
    assert not errors_in_streams, "\n".join(errors_in_streams)
    slow = [f"{r.case.name}: {r.seconds:.1f} s" for r in results if r.seconds > ANSWER_WITHIN_S]
    assert not slow, "\n".join(slow)
    # Typed fields: a value of the wrong JSON type never gets a 200.
    typed = [r.case.name for r in results if r.status == 200 and any(
        r.case.name.startswith(f"{route} {field}[") and _wrong_type(kind, index)
        for route in ("completions", "chat") for field, kind in FIELDS.items()
        for index in [_index(r.case.name)])]
    assert not typed, typed

    # The server still works: the same steered greedy request answers as it did before.
    after = server.post("/v1/completions", steered)
    assert after.status_code == 200, after.text
    assert after.json()["vas"]["weights"] == {HEAD: 4.0}
    assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]


def _index(name: str) -> int:
    return int(name.rpartition("[")[2].rstrip("]")) if name.endswith("]") else -1


def _wrong_type(kind: str, index: int) -> bool:
    """Whether WRONG[kind][index] is of another JSON type than `kind` (not just out of range)."""
    if index < 0 or index >= len(WRONG[kind]):
        return False
    value = WRONG[kind][index]
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool), "string": lambda v: isinstance(v, str)}[kind]
    return not ok(value)


if __name__ == "__main__":
    found = asyncio.run(run_cases(sys.argv[1], cases()))
    for r in sorted(found, key=lambda r: r.case.name):
        if r.status >= 500 or (r.status == 200 and stream_error(r)) or "-v" in sys.argv:
            print(f"{r.status} {r.seconds:5.1f}s {r.case.name}: {r.body[:200]!r}")
    print(len(found), "requests:", dict(status_counts(found)))
    if "--dump" in sys.argv:
        with open(sys.argv[sys.argv.index("--dump") + 1], "w") as f:
            json.dump([[r.case.name, r.status, round(r.seconds, 2), r.body[:300].decode(errors="replace")] for r in found], f)
    print("slowest:", [(r.case.name, round(r.seconds, 1)) for r in sorted(found, key=lambda r: -r.seconds)[:5]])
