"""VAS over a remote base (`vas-server serve --remote-base`), against a real local vLLM server.

The upstream is vLLM's own OpenAI server on the embedded SmolLM2-135M-Instruct, in float32, with
`--max-logprobs 256`; the remote-mode server steers it with the demo value model, which runs on
its own trunk here (the base's first layers, loaded locally). Its greedy tokens must equal
in-process VAS's on the same requests (the in-process engine takes the shared path, in float32).
The official `openai` client is the client.
"""

from __future__ import annotations

import json
import math
import sys
import time

import openai
import pytest

from http_server import QuietHandler, free_port, serving, start_healthy, stop

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


@pytest.fixture(scope="module")
def base_dir() -> str:
    from vas_server.core.base_model import ensure_base_model

    return str(ensure_base_model())


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, base_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_healthy([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base_dir,
                      "--served-model-name", UPSTREAM_NAME, "--port", str(port), "--dtype", "float32",
                      "--max-logprobs", "256", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
                      "--no-enable-chunked-prefill", "--seed", "0"],
                     tmp_path_factory.mktemp("upstream") / "server.log", url)
    yield process, url
    stop(process)


@pytest.fixture(scope="module")
def remote_url(tmp_path_factory, upstream):
    """The remote-mode server, drafting (its default --remote-draft 8: at T = 0 and 1)."""
    _, upstream_url = upstream
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_healthy([sys.executable, "-m", "vas_server", "serve", "--remote-base", f"{upstream_url}/v1",
                      "--remote-model", UPSTREAM_NAME, "--port", str(port), "--dtype", "float32",
                      "--max-model-len", str(MAX_MODEL_LEN), "--remote-timeout", "20"],
                     tmp_path_factory.mktemp("remote") / "server.log", url)
    yield url
    stop(process)


@pytest.fixture(scope="module")
def remote(remote_url):
    return openai.OpenAI(base_url=f"{remote_url}/v1", api_key="none", max_retries=0, timeout=120)


def _remote_metrics(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("vas_remote_")}


@pytest.fixture(scope="module")
def prompt_ids(base_dir):
    from transformers import AutoTokenizer

    from value_models.sample import chat_prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return [chat_prompt_ids(tokenizer, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def in_process(base_dir):
    """In-process VAS on the same base and value model (the shared path), float32."""
    from vllm import LLM

    from vas_server.cli import demo_value_models
    from vas_server.config import VASConfig
    from vas_server.engine_args import engine_kwargs

    llm = LLM(**engine_kwargs(base_dir, VASConfig(value_models=demo_value_models()), dtype="float32",
                              max_model_len=MAX_MODEL_LEN, seed=0))
    yield llm
    llm.llm_engine.engine_core.shutdown()


def _in_process_tokens(llm, prompts: list[list[int]], params) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def in_process_greedy(in_process, prompt_ids):
    """In-process VAS's greedy tokens for every (case, prompt)."""
    from vllm import SamplingParams

    from vas_server.params import make_extra_args

    params = [SamplingParams(temperature=0, max_tokens=TOKENS,
                             extra_args=make_extra_args(w, top_k=k, restrict_to_top_k=r) if w else None)
              for w, k, r in CASES for _ in prompt_ids]
    return _in_process_tokens(in_process, [ids for _ in CASES for ids in prompt_ids], params)


def _steering(weights, top_k, restrict) -> dict:
    if weights is None:
        return {}
    body = {"vas_weights": weights}
    if top_k is not None:
        body["vas_top_k"] = top_k
    if restrict:
        body["vas_restrict_to_top_k"] = True
    return body


def test_remote_greedy_tokens_equal_in_process_vas(remote, remote_url, prompt_ids, in_process_greedy):
    """All requests at once: the remote loops' value scoring runs batched, as it does in service.
    Drafted: several tokens per upstream call, each round's positions scored in one pass."""
    from concurrent.futures import ThreadPoolExecutor

    before = _remote_metrics(remote_url)

    def greedy(case_and_prompt) -> list[int]:
        (weights, top_k, restrict), ids = case_and_prompt
        answer = remote.completions.create(model="SmolLM2-135M-Instruct", prompt=ids, max_tokens=TOKENS,
                                           temperature=0, extra_body={"return_token_ids": True,
                                                                      **_steering(weights, top_k, restrict)})
        return answer.choices[0].token_ids

    with ThreadPoolExecutor(len(CASES) * len(prompt_ids)) as pool:
        got = list(pool.map(greedy, [(case, ids) for case in CASES for ids in prompt_ids]))
    mismatches = [(CASES[i // len(prompt_ids)], g, w) for i, (g, w) in enumerate(zip(got, in_process_greedy)) if g != w]
    assert not mismatches, mismatches
    assert got[0] != got[2 * len(prompt_ids)], "positive 4 changed nothing"
    after = _remote_metrics(remote_url)
    drafted = after["vas_remote_drafted_tokens_total"] - before.get("vas_remote_drafted_tokens_total", 0)
    accepted = after["vas_remote_accepted_tokens_total"] - before.get("vas_remote_accepted_tokens_total", 0)
    tokens = after["vas_remote_tokens_total"] - before.get("vas_remote_tokens_total", 0)
    calls = after["vas_remote_upstream_calls_total"] - before.get("vas_remote_upstream_calls_total", 0)
    assert tokens == sum(len(g) for g in got) and drafted > tokens > accepted > 0, after
    assert calls < 0.7 * tokens, after  # drafting: several tokens per upstream call


def test_unsteered_requests_draft_whole_rounds(remote, remote_url, prompt_ids):
    """Unsteered, VAS is the base: every drafted token is accepted and each call drafts the cap
    (8), so a request takes ceil(tokens / 8) calls and drafts no token it does not emit (the
    issue's weight-0 goal), at both drafting temperatures."""
    for temperature, tokens in ((1.0, 20), (0.0, 17)):
        before = _remote_metrics(remote_url)
        remote.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt_ids[0], max_tokens=tokens,
                                  temperature=temperature, seed=3, extra_body={"ignore_eos": True})
        after = _remote_metrics(remote_url)
        calls = after["vas_remote_upstream_calls_total"] - before["vas_remote_upstream_calls_total"]
        drafted = after["vas_remote_drafted_tokens_total"] - before["vas_remote_drafted_tokens_total"]
        assert calls == math.ceil(tokens / 8) and drafted == tokens, (temperature, calls, drafted)


def chi_square_p(a: list[int], b: list[int]) -> tuple[float, int]:
    """Two-sample chi-square test that `a` and `b` (token draws) come from one distribution: (p, df).
    Tokens expected fewer than 5 times in either sample share one bin."""
    import collections

    import torch

    ca, cb = collections.Counter(a), collections.Counter(b)
    na, nb = len(a), len(b)
    bins: dict = collections.defaultdict(lambda: [0, 0])
    for token in set(ca) | set(cb):
        total = ca[token] + cb[token]
        key = token if min(total * na, total * nb) / (na + nb) >= 5 else "rare"
        bins[key][0] += ca[token]
        bins[key][1] += cb[token]
    chi2 = 0.0
    for x, y in bins.values():
        total = x + y
        for observed, n in ((x, na), (y, nb)):
            expected = total * n / (na + nb)
            chi2 += (observed - expected) ** 2 / expected
    df = len(bins) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                          torch.tensor(chi2 / 2, dtype=torch.float64))), df


def test_remote_sampling_matches_in_process_including_the_tail(remote, in_process, prompt_ids):
    """Temperature 0.7, K = 5: a good part of the mass lies outside the candidates, so the remote
    loop's coin (vas_server.remote.sampling: the upstream's own draws, accepted or redrawn) lands in
    the base's tail. The first tokens of 250 draws each must pass a chi-square test of one
    distribution; tests/test_remote_sampling.py checks each temperature's rule exactly."""
    from concurrent.futures import ThreadPoolExecutor

    from vllm import SamplingParams

    from vas_server.params import make_extra_args

    draws, steering, temperature = 250, {"positive": 3.0}, 0.7

    def remote_draw(seed: int) -> int:
        answer = remote.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt_ids[1], max_tokens=1,
                                           temperature=temperature, seed=seed,
                                           extra_body={"return_token_ids": True, "vas_weights": steering,
                                                       "vas_top_k": 5})
        return answer.choices[0].token_ids[0]

    with ThreadPoolExecutor(8) as pool:
        remote_tokens = list(pool.map(remote_draw, range(draws)))
    params = [SamplingParams(temperature=temperature, max_tokens=1, seed=10_000 + s,
                             extra_args=make_extra_args(steering, top_k=5)) for s in range(draws)]
    local_tokens = [t[0] for t in _in_process_tokens(in_process, [prompt_ids[1]] * draws, params)]
    base = in_process.generate([{"prompt_token_ids": prompt_ids[1]}],
                               SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)
    candidates = set(base[0].outputs[0].logprobs[0])  # the base's top 5 (raw log-probs), the VAS candidates
    from_tail = sum(t not in candidates for t in remote_tokens) / draws
    assert from_tail >= 0.05, f"only {from_tail:.0%} of the draws came from the tail: the test misses it"
    p, df = chi_square_p(remote_tokens, local_tokens)
    assert df >= 3, "too few distinct first tokens for the test to mean anything"
    assert p > 1e-3, (p, df, sorted(remote_tokens)[:50], sorted(local_tokens)[:50])


def test_drafted_sampling_matches_in_process_over_two_positions(remote, in_process, prompt_ids):
    """Temperature 1, drafted (two positions per call at most here): the first and the second
    tokens of 250 draws each must pass a chi-square test of one distribution with in-process VAS;
    tests/test_remote_draft.py checks the rule exactly, over several positions."""
    from concurrent.futures import ThreadPoolExecutor

    from vllm import SamplingParams

    from vas_server.params import make_extra_args

    draws, steering = 250, {"positive": 3.0}

    def remote_draw(seed: int) -> list[int]:
        answer = remote.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt_ids[1], max_tokens=2,
                                           temperature=1.0, seed=seed,
                                           extra_body={"return_token_ids": True, "vas_weights": steering,
                                                       "vas_top_k": 5, "ignore_eos": True})
        return answer.choices[0].token_ids

    with ThreadPoolExecutor(8) as pool:
        remote_tokens = list(pool.map(remote_draw, range(draws)))
    params = [SamplingParams(temperature=1.0, max_tokens=2, seed=20_000 + s, ignore_eos=True,
                             extra_args=make_extra_args(steering, top_k=5)) for s in range(draws)]
    local_tokens = _in_process_tokens(in_process, [prompt_ids[1]] * draws, params)
    for position in (0, 1):
        p, df = chi_square_p([t[position] for t in remote_tokens], [t[position] for t in local_tokens])
        assert df >= 3 and p > 1e-3, (position, p, df)


def test_logprobs_of_the_chosen_tokens_equal_in_process_vas(remote, in_process, prompt_ids):
    """The chosen tokens' raw log-probs and the top 2, as in-process VAS reports them (vLLM's
    default logprobs_mode), steered and not. Steered, some chosen tokens lie outside the top 2, so
    their own log-prob (not a top entry's) is what the answer shows."""
    from vllm import SamplingParams

    from vas_server.params import make_extra_args

    outside_top = 0
    for weights in (None, {"positive": 4.0}):
        answer = remote.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt_ids[0], max_tokens=TOKENS,
                                           temperature=0, logprobs=2,
                                           extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True,
                                                       **_steering(weights, None, False)})
        local = in_process.generate([{"prompt_token_ids": prompt_ids[0]}], SamplingParams(
            temperature=0, max_tokens=TOKENS, logprobs=2, extra_args=make_extra_args(weights) if weights else None),
            use_tqdm=False)[0].outputs[0]
        got = answer.choices[0]
        assert got.token_ids == list(local.token_ids)
        for position, (token, chosen, top, want) in enumerate(zip(got.token_ids, got.logprobs.token_logprobs,
                                                                   got.logprobs.top_logprobs, local.logprobs)):
            assert chosen == pytest.approx(want[token].logprob, abs=2e-3), position
            want_top = {f"token_id:{t}": lp.logprob for t, lp in want.items() if lp.rank <= 2}
            assert top.keys() == want_top.keys() | {f"token_id:{token}"}, position
            assert all(top[t] == pytest.approx(lp, abs=2e-3) for t, lp in want_top.items()), position
            outside_top += want[token].rank > 2
    assert outside_top, "every chosen token was in the top 2: the test does not see the chosen log-prob"


def test_n_seed_and_stop_strings(remote, prompt_ids):
    """`n` choices, the same ones again for the same seed, and a stop string that ends a choice."""
    body = dict(model="SmolLM2-135M-Instruct", prompt=prompt_ids[1], max_tokens=12, temperature=1.0, n=2, seed=7,
                extra_body={"vas_weights": {"positive": 2.0}})
    first, again = remote.completions.create(**body), remote.completions.create(**body)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.completion_tokens == 24 or any(c.finish_reason == "stop" for c in first.choices)
    greedy = dict(model="SmolLM2-135M-Instruct", prompt=prompt_ids[0], max_tokens=TOKENS, temperature=0)
    text = remote.completions.create(**greedy).choices[0].text
    stop_word = text.split()[len(text.split()) // 2]
    stopped = remote.completions.create(**greedy, stop=[stop_word]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[:text.index(stop_word)], (text, stop_word)


def _upstream_requests(upstream_url: str) -> float:
    """The upstream's finished requests: one per remote upstream call."""
    import httpx

    text = httpx.get(f"{upstream_url}/metrics", timeout=10).text
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


def test_a_client_that_disconnects_stops_its_token_loop(remote, upstream):
    stream = remote.completions.create(model="SmolLM2-135M-Instruct", prompt="Tell me a long story.", max_tokens=400,
                                       temperature=1.0, stream=True, extra_body={"ignore_eos": True,
                                                                                 "vas_weights": {"positive": 1.0}})
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    time.sleep(2)  # the loop's call in flight, if any, ends
    before = _upstream_requests(upstream[1])
    time.sleep(3)
    assert _upstream_requests(upstream[1]) == before, "the token loop kept calling the upstream"


def test_remote_chat_streaming_and_presets_through_the_openai_client(remote):
    chat = remote.chat.completions.create(model="cheerful", messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=8, temperature=0)
    assert chat.model == "cheerful" and chat.choices[0].message.content
    assert chat.model_extra["vas"] == {"weights": {"positive": 3.0}, "top_k": 256, "restrict_to_top_k": False,
                                       "upstream_token_mismatches": 0}  # ids both ways: none
    assert chat.usage.completion_tokens == 8
    chunks = list(remote.completions.create(model="SmolLM2-135M-Instruct", prompt="Hello, my name is",
                                            max_tokens=6, temperature=1.0, seed=3, stream=True,
                                            extra_body={"vas_weights": {"concise": 2.0}}))
    assert "".join(c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["vas"]["weights"] == {"concise": 2.0}
    assert chunks[-1].model_extra["vas"]["upstream_token_mismatches"] == 0


def test_an_unknown_head_is_refused_before_the_upstream_is_called(remote):
    with pytest.raises(openai.BadRequestError) as e:
        remote.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2,
                                  extra_body={"vas_weights": {"nope": 1.0}})
    assert "unknown head 'nope'" in str(e.value)


def test_sampling_the_remote_loop_cannot_do_exactly_is_refused(remote):
    with pytest.raises(openai.BadRequestError) as e:
        remote.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2, top_p=0.9,
                                  extra_body={"vas_weights": {"positive": 1.0}})
    assert "top_p, top_k and min_p are not supported" in str(e.value)


# OpenAI's legacy completions fields: an upstream that "rejects unknown fields with 400" takes only these.
OPENAI_COMPLETION_FIELDS = {"model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs",
                            "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options",
                            "suffix", "temperature", "top_p", "user"}


def _refusal(profile: str, path: str, body: dict | None) -> str | None:
    """Why an upstream with the documented limits of `profile` refuses this call (its 4xx), or None."""
    if path.endswith("/tokenize") and profile in ("no-tokenize", "strict-fields", "text-prompts"):
        return "404 no such route"
    if body is None or not path.endswith("/completions"):
        return None
    if profile == "text-prompts" and not isinstance(body.get("prompt"), str):
        return "400 prompt must be a string"
    cap = {"cap-20": 20, "cap-5": 5, "text-prompts": 20, "strict-fields": 5}.get(profile)
    if cap is not None and (body.get("logprobs") or 0) > cap:
        return f"400 logprobs {body['logprobs']} > max of {cap}"
    unknown = sorted(set(body) - OPENAI_COMPLETION_FIELDS)
    if profile in ("strict-fields", "text-prompts") and unknown:
        return f"400 Unrecognized request argument supplied: {unknown[0]}"
    return None


@pytest.fixture(scope="module")
def conformance_proxy(upstream):
    """The real upstream behind a proxy that keeps the documented limits of an upstream profile
    (the first part of the path, e.g. /cap-20/v1/completions), refusing what that upstream refuses
    with its 4xx; the completions bodies it let through, by profile. The profiles (docs/SERVER.md,
    "VAS over a remote base"): text-prompts (hosted string-prompt APIs: text only, cap 20, OpenAI's
    fields only, no /tokenize), cap-20 (vLLM's default --max-logprobs), cap-5 (token prompts,
    OpenAI's legacy cap), strict-fields (OpenAI's legacy completions: its fields only, cap 5, no
    /tokenize), no-tokenize."""
    import httpx

    seen: dict[str, list[dict]] = {}

    class Proxy(QuietHandler):
        def _forward(self, method: str):
            _, profile, path = self.path.split("/", 2)
            raw = self.rfile.read(int(self.headers.get("content-length", 0))) if method == "POST" else None
            body = json.loads(raw) if raw else None
            refusal = _refusal(profile, "/" + path, body)
            if refusal is not None:
                status, message = refusal.split(" ", 1)
                return self.reply(int(status), json.dumps({"error": {"message": message}}).encode())
            if body is not None and path.endswith("completions"):
                seen.setdefault(profile, []).append(body)
            answer = httpx.request(method, f"{upstream[1]}/{path}", content=raw,
                                   headers={"content-type": "application/json"}, timeout=60)
            self.reply(answer.status_code, answer.content)

        def do_GET(self):
            self._forward("GET")

        def do_POST(self):
            self._forward("POST")

    with serving(Proxy) as url:
        yield url, seen


@pytest.mark.parametrize("profile, found", [
    ("text-prompts", {"token_prompts": False, "token_ids": False, "logprob_cap": 20, "ignore_eos": False,
                      "draft": True, "neutral_samplers": False, "tokenize": False}),
    ("cap-20", {"token_prompts": True, "token_ids": True, "logprob_cap": 20, "ignore_eos": True, "draft": True,
                "neutral_samplers": True, "tokenize": True}),
    ("cap-5", {"token_prompts": True, "token_ids": True, "logprob_cap": 5}),
    ("strict-fields", {"token_prompts": True, "token_ids": False, "logprob_cap": 5, "ignore_eos": False,
                       "neutral_samplers": False, "tokenize": False}),
    ("no-tokenize", {"token_prompts": True, "token_ids": True, "logprob_cap": 256, "tokenize": False}),
])
def test_each_upstream_profile_is_probed_and_steered(conformance_proxy, tmp_path, profile, found):
    """No flag beyond --remote-base/--remote-model: startup finds what the upstream accepts (one
    log line), every request is answered 200, steering changes the greedy text, the demo's K 256
    is served at the cap (counted, and said in the `vas` field and on /v1/models), and no call
    sends what the profile refuses (the proxy would have answered it with its 4xx)."""
    import httpx

    url, seen = conformance_proxy
    port = free_port()
    log = tmp_path / "server.log"
    here = f"http://127.0.0.1:{port}"
    process = start_healthy([sys.executable, "-m", "vas_server", "serve", "--remote-base", f"{url}/{profile}/v1",
                             "--remote-model", UPSTREAM_NAME, "--port", str(port), "--dtype", "float32",
                             "--max-model-len", str(MAX_MODEL_LEN)], log, here)
    try:
        line = next(line for line in log.read_text().splitlines() if "remote-base upstream" in line)
        models = httpx.get(f"{here}/v1/models", timeout=10).json()["data"]
        assert {k: models[0]["vas_upstream"][k] for k in found} == found, line
        assert f"top log-probs up to {found['logprob_cap']} per position (probed)" in line
        client = openai.OpenAI(base_url=f"{here}/v1", api_key="none", max_retries=0, timeout=120)
        answers = [client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPTS[0], max_tokens=16,
                                             temperature=0, extra_body=_steering(w, None, False))
                   for w in (None, {"positive": 6.0})]
        assert answers[0].choices[0].text != answers[1].choices[0].text, [a.choices[0].text for a in answers]
        cap = found["logprob_cap"]
        vas = answers[1].model_extra["vas"]
        metrics = _remote_metrics(here)
        if cap < 256:  # the demo head declares K 256
            assert (vas["top_k"], vas["top_k_requested"], vas["upstream_logprob_cap"]) == (cap, 256, cap)
            # Unsteered requests take the spec's K 20 (the candidates of an exact draw): clamped below it too.
            assert metrics["vas_remote_clamped_requests_total"] == (1 if cap >= 20 else 2)
        else:
            assert vas["top_k"] == 256 and "top_k_requested" not in vas
        assert max(body["logprobs"] for body in seen[profile]) <= cap
        assert next(m for m in models if m["id"] == "positive")["vas_preset"]["top_k"] == min(cap, 256)
        # The steered request's own text mismatches (none where ids go both ways), within the server's.
        if "token ids in answers" in line and "token-id prompts" in line:
            assert metrics["vas_remote_token_mismatches_total"] == vas["upstream_token_mismatches"] == 0
        else:
            assert 0 <= vas["upstream_token_mismatches"] <= metrics["vas_remote_token_mismatches_total"]
    finally:
        stop(process)


def test_the_upstream_tokenizer_is_checked(upstream, base_dir, tokenizer):
    """vLLM's /tokenize on a probe string: the base's own tokenizer passes, another one is refused."""
    import asyncio

    from transformers import AutoTokenizer

    from vas_server.remote.upstream import CompletionsUpstream, check_tokenizer

    async def check(local) -> None:
        remote_base = CompletionsUpstream(f"{upstream[1]}/v1", UPSTREAM_NAME)
        await check_tokenizer(remote_base, local)

    asyncio.run(check(AutoTokenizer.from_pretrained(base_dir)))
    with pytest.raises(ValueError, match="the upstream's tokenizer differs from MODEL's"):
        asyncio.run(check(tokenizer))  # conftest's tiny tokenizer


def test_an_upstream_that_stops_mid_stream_ends_the_stream_with_its_error(remote, upstream):
    """It stops the upstream: the tests after it see it down."""
    stream = remote.completions.create(model="SmolLM2-135M-Instruct", prompt="Tell me a long story.", max_tokens=400,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    received = [next(stream) for _ in range(3)]
    stop(upstream[0])
    started = time.monotonic()
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            received.append(chunk)
    assert time.monotonic() - started < 60
    assert "unreachable" in str(e.value), e.value
    assert len(received) < 400


def test_an_upstream_that_is_down_is_an_error_answer_not_a_hang(remote, upstream):
    """After the upstream stopped."""
    stop(upstream[0])
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        remote.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2, temperature=0)
    assert time.monotonic() - started < 60
    assert e.value.status_code == 503, e.value.response.text
    assert "upstream" in json.loads(e.value.response.text)["error"]["message"] and "unreachable" in str(e.value)


@pytest.fixture(scope="module")
def fake_upstream():
    """A local stand-in for a faulty upstream: POST /v1/completions answers as the path's first
    part says (`slow`: after 2 s; `few`: 2 log-probs; `broken`: not JSON; `failing`: a 500;
    `refusing`: a 400; `flaky-N`: a 503 to the first N calls, then 2 log-probs; `aborted-N`: vLLM's
    answer to a request it aborted, 200 without tokens, to the first N calls, then 2 log-probs)."""
    calls: dict[str, int] = {}

    class Handler(QuietHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            mode = self.path.split("/")[1]
            calls[mode] = calls.get(mode, 0) + 1
            if mode == "slow":
                time.sleep(2)
            status, body = 200, {"choices": [{"logprobs": {"tokens": ["token_id:7"], "token_logprobs": [-0.1],
                                                           "top_logprobs": [{"token_id:7": -0.1, "token_id:8": -2.5}]}}]}
            if mode.startswith("aborted") and calls[mode] <= int(mode.split("-")[1]):
                body = {"choices": [{"finish_reason": "abort",
                                     "logprobs": {"tokens": [], "token_logprobs": [], "top_logprobs": []}}]}
            payload = json.dumps(body).encode()
            if mode == "broken":
                payload = b"<html>not json"
            if mode == "failing":
                status, payload = 500, b'{"error": {"message": "out of memory"}}'
            if mode == "refusing":
                status, payload = 400, b'{"error": {"message": "bad prompt"}}'
            if mode.startswith("flaky") and calls[mode] <= int(mode.split("-")[1]):
                status, payload = 503, b'{"error": {"message": "overloaded"}}'
            self.reply(status, payload)

    with serving(Handler) as url:
        yield url, calls


@pytest.mark.parametrize("mode, status, message, tries", [
    ("slow", 504, "did not answer within 0.5 s", 2),
    ("few", 502, "gave 2 log-probs, 5 asked", 1),
    ("broken", 502, "without token log-probs", 1),
    ("failing", 502, "answered 500: {\"error\": {\"message\": \"out of memory\"}}", 2),
    ("refusing", 502, "answered 400: {\"error\": {\"message\": \"bad prompt\"}}", 1),
])
def test_upstream_faults_name_their_status_and_cause(fake_upstream, mode, status, message, tries):
    """Each fault is the error it names, after one retry where another try might cure it."""
    import asyncio

    from vas_server.remote.upstream import UpstreamError, CompletionsUpstream

    url, calls = fake_upstream

    async def call():
        # 0.5 s makes "slow" time out; the others answer at once, but on a loaded machine (a test
        # suite beside other work) an answer can take longer than that and be retried: 30 s.
        timeout = 0.5 if mode == "slow" else 30.0
        await CompletionsUpstream(f"{url}/{mode}/v1", "m", timeout_s=timeout, retries=1).draw([1, 2, 3], 5, temperature=1.0)

    with pytest.raises(UpstreamError) as e:
        asyncio.run(call())
    assert e.value.status == status and message in str(e.value)
    assert calls[mode] == tries


@pytest.mark.parametrize("retries, answered", [(2, True), (1, False)])
def test_an_upstream_that_recovers_within_the_retries_answers(fake_upstream, retries, answered):
    import asyncio

    from vas_server.remote.upstream import UpstreamError, CompletionsUpstream

    url, _ = fake_upstream
    upstream = CompletionsUpstream(f"{url}/flaky-2-{retries}/v1", "m", retries=retries)  # 503 twice, then answers
    try:
        draw = asyncio.run(upstream.draw([1, 2, 3], 2, temperature=1.0))
    except UpstreamError as e:
        assert not answered and e.status == 502 and "overloaded" in str(e)
    else:
        assert answered and draw.token == 7 and draw.top == [(7, -0.1), (8, -2.5)]
    assert upstream.calls == retries + 1


@pytest.mark.parametrize("retries, answered", [(1, True), (0, False)])
def test_a_request_the_upstream_aborted_is_retried(fake_upstream, retries, answered):
    """vLLM answers a request it aborts while shutting down with 200 and no tokens: that is a
    retryable 503 (the next try finds the upstream back, or down and says so), not a malformed
    answer."""
    import asyncio

    from vas_server.remote.upstream import UpstreamError, CompletionsUpstream

    url, _ = fake_upstream
    upstream = CompletionsUpstream(f"{url}/aborted-1-{retries}/v1", "m", retries=retries)
    try:
        draw = asyncio.run(upstream.draw([1, 2, 3], 2, temperature=1.0))
    except UpstreamError as e:
        assert not answered and e.status == 503 and "aborted the request" in str(e)
    else:
        assert answered and draw.token == 7
    assert upstream.calls == retries + 1


def test_startup_waits_for_an_upstream_that_is_still_starting():
    """An upstream that starts listening later is waited for; one that never answers is an error."""
    import asyncio
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from vas_server.remote.upstream import CompletionsUpstream, wait_until_reachable

    class Models(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    port = free_port()
    servers = []
    threading.Timer(1.5, lambda: servers.append(ThreadingHTTPServer(("127.0.0.1", port), Models))
                    or threading.Thread(target=servers[0].serve_forever, daemon=True).start()).start()
    heard: list[str] = []
    started = time.monotonic()
    asyncio.run(wait_until_reachable(CompletionsUpstream(f"http://127.0.0.1:{port}/v1", "m"), 30, heard.append))
    assert 1.5 <= time.monotonic() - started < 30 and "waiting for the upstream" in heard[0]
    servers[0].shutdown()
    with pytest.raises(ValueError, match="did not answer within 1 s"):
        asyncio.run(wait_until_reachable(CompletionsUpstream(f"http://127.0.0.1:{free_port()}/v1", "m"), 1, heard.append))


def test_the_vllm_client_is_an_upstream_and_closes_its_connections(fake_upstream):
    """The seam: remote mode holds an `Upstream`; the vLLM client is one, and aclose ends its
    HTTP client (a call after it fails instead of opening a new connection)."""
    import asyncio

    import httpx

    from vas_server.remote.upstream import Upstream, UpstreamError, CompletionsUpstream

    url, _ = fake_upstream
    upstream = CompletionsUpstream(f"{url}/flaky-0-0/v1", "m", retries=0)
    assert isinstance(upstream, Upstream)

    async def use_then_close():
        draw = await upstream.draw([1, 2, 3], 2, temperature=1.0)
        await upstream.aclose()
        assert upstream.client.is_closed
        with pytest.raises((RuntimeError, UpstreamError, httpx.HTTPError)):
            await upstream.draw([1, 2, 3], 2, temperature=1.0)
        return draw

    assert len(asyncio.run(use_then_close()).top) == 2
    assert upstream.calls == 2


def test_playground_and_vas_explain_over_a_remote_base(remote_url):
    """The playground page is served in remote mode too; vas_explain, which needs the worker, is a
    400 naming it (the page then shows the steered answer without its per-token view)."""
    import httpx

    page = httpx.get(f"{remote_url}/playground", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(f"{remote_url}/playground/playground.js", timeout=10).status_code == 200
    response = httpx.post(f"{remote_url}/v1/chat/completions", timeout=60, json={
        "model": "SmolLM2-135M-Instruct", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}],
        "vas_weights": {"positive": 2}, "vas_explain": 3})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "vas_explain" and "remote base" in error["message"]
