"""The upstream's log-prob cap, probed at startup (vas_server.remote.capabilities), against a
local stand-in that answers as documented upstreams do: a 400 above the cap (vLLM's
--max-logprobs, OpenAI's 5), or a silently shorter list; and K clamped to the cap."""

from __future__ import annotations

import asyncio
import json

import pytest
from http_server import QuietHandler, serving

from vas_server.remote.capabilities import clamp
from vas_server.remote.probe import LOGPROB_TRIES, probe_logprob_cap
from vas_server.remote.upstream import CompletionsUpstream


@pytest.fixture(scope="module")
def capped():
    """POST /<mode>/v1/completions: `refuse-N` answers 400 above N log-probs, `short-N` returns
    at most N, `none` returns no log-probs, `down` answers 503; the calls seen, per mode."""
    calls: dict[str, list[int]] = {}

    class Handler(QuietHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
            mode = self.path.split("/")[1]
            calls.setdefault(mode, []).append(body["logprobs"])
            kind, _, cap = mode.partition("-")
            k = body["logprobs"]
            status, answer = 200, None
            if kind == "refuse" and k > int(cap):
                status, answer = 400, {"error": {"message": f"Requested sample logprobs of {k}, which is greater "
                                                            f"than max of {cap}"}}
            elif kind == "down":
                status, answer = 503, {"error": {"message": "overloaded"}}
            elif kind == "none":
                answer = {"choices": [{"logprobs": None}]}
            else:
                n = min(k, int(cap)) if kind == "short" else k
                top = {f"token_id:{i}": -0.1 - i for i in range(n)}
                answer = {"choices": [{"logprobs": {"tokens": ["token_id:0"], "token_logprobs": [-0.1],
                                                    "top_logprobs": [top]}}]}
            self.reply(status, json.dumps(answer).encode())

    with serving(Handler) as url:
        yield url, calls


def _probe(url: str, mode: str) -> int:
    async def run():
        upstream = CompletionsUpstream(f"{url}/{mode}/v1", "m", retries=0)
        try:
            return await probe_logprob_cap(upstream, [1, 2])
        finally:
            await upstream.aclose()
    return asyncio.run(run())


@pytest.mark.parametrize("mode, found", [
    ("refuse-256", 256),  # vLLM with --max-logprobs 256 (README's upstream)
    ("refuse-20", 20),  # vLLM's default --max-logprobs; hosted APIs' 20
    ("refuse-5", 5),  # OpenAI's legacy completions
    ("refuse-30", 20),  # a cap between two tries: used at the lower one
    ("short-20", 20),  # an upstream that truncates instead of refusing
])
def test_the_logprob_cap_is_found_with_one_call_per_try(capped, mode, found):
    url, calls = capped
    assert _probe(url, mode) == found
    assert calls[mode] == list(LOGPROB_TRIES[:LOGPROB_TRIES.index(found) + 1])


def test_an_upstream_without_logprobs_or_down_is_refused_with_the_reason(capped):
    url, _ = capped
    with pytest.raises(ValueError, match="returns no token log-probs"):
        _probe(url, "none")
    with pytest.raises(ValueError, match="failed while its log-prob cap was probed.*503"):
        _probe(url, "down")


@pytest.mark.parametrize("top_k, client, cap, expected", [
    (256, None, 20, (20, 20)),  # the demo's K on vLLM's default cap
    (256, 3, 5, (5, 5)),
    (10, 15, 20, (10, 15)),  # below the cap: unchanged, the client's logprobs asked too
    (10, None, 256, (10, 10)),
])
def test_k_is_clamped_to_the_cap(top_k, client, cap, expected):
    assert clamp(top_k, client, cap) == expected
