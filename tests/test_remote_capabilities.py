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
            if self.path.endswith("/tokenize") or mode == "chatonly":  # chatonly: no /v1/completions
                return self.reply(404, b'{"detail": "Not Found"}')
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
                # `scaled`: log-probs after temperature (SGLang's default), not raw
                scale = 1 / max(body["temperature"], 0.1) if kind == "scaled" else 1.0
                top = {f"token_id:{i}": (-0.1 - i) * scale for i in range(n)}
                # The best token not banned by logit_bias (one that ignores it: always token 0).
                banned = {} if kind == "ignorebias" else body.get("logit_bias") or {}
                token = next(i for i in range(1000) if str(i) not in banned)
                answer = {"choices": [{"logprobs": {"tokens": [f"token_id:{token}"], "token_logprobs": [-0.1 - token],
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


# -- what goes over the wire (vas_server.remote.wire) ----------------------------------------------


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from vas_server.core.base_model import ensure_base_model

    return AutoTokenizer.from_pretrained(ensure_base_model())


def test_both_answer_formats_give_the_same_draws(smol_tokenizer):
    """vLLM's legacy format with ids, the same by text (mapped by MODEL's tokenizer), and llama.cpp's
    `content` list with `id` fields: one Draw, best first."""
    from vas_server.remote.wire import TokenTexts, positions

    ids = smol_tokenizer.encode(" the cat sat", add_special_tokens=False)
    lps = [-0.5, -1.5, -2.5]
    text = [smol_tokenizer.decode([i]) for i in ids]
    legacy_ids = {"logprobs": {"tokens": [f"token_id:{ids[1]}"], "token_logprobs": [lps[1]],
                               "top_logprobs": [{f"token_id:{i}": lp for i, lp in zip(ids[::-1], lps[::-1])}]}}
    legacy_text = {"logprobs": {"tokens": [text[1]], "token_logprobs": [lps[1]],
                                "top_logprobs": [dict(zip(text, lps))]}}
    content = {"logprobs": {"content": [{"id": ids[1], "token": "?", "logprob": lps[1], "top_logprobs": [
        {"id": i, "token": "?", "logprob": lp} for i, lp in zip(ids, lps)]}]}}
    texts = TokenTexts(smol_tokenizer)
    draws = [positions(answer, 3, texts) for answer in (legacy_ids, legacy_text, content)]
    assert draws[0] == draws[1] == draws[2]
    assert draws[0][0].token == ids[1] and draws[0][0].top == list(zip(ids, lps))
    assert texts.mismatches == 0


def test_a_short_top_list_is_refused_unless_texts_collided(smol_tokenizer):
    from vas_server.remote.wire import ShortLogprobs, TokenTexts, positions

    texts = TokenTexts(smol_tokenizer)
    answer = {"logprobs": {"tokens": [" the"], "token_logprobs": [-0.1], "top_logprobs": [{" the": -0.1}]}}
    with pytest.raises(ShortLogprobs):
        positions(answer, 2, texts)  # the cap's probe: fewer than asked is a lower cap
    assert positions(answer, 2, texts, full=False)[0].top == [(smol_tokenizer.encode(" the")[0], -0.1)]
    assert texts.mismatches == 1  # serving: the missing candidate is counted


def test_texts_are_mapped_and_mismatches_counted(smol_tokenizer):
    """A token text MODEL's tokenizer lacks is an error, counted; a context that is not the
    tokenizer's own segmentation of its text is sent as text and counted."""
    from vas_server.remote.wire import TokenTexts

    texts = TokenTexts(smol_tokenizer)
    with pytest.raises(ValueError, match="does not have"):
        texts.id_of("no such token text \u2603\u2603")
    assert texts.mismatches == 1
    canonical = smol_tokenizer.encode("Hello world", add_special_tokens=False)
    assert texts.prompt_text(canonical) == "Hello world" and texts.mismatches == 1
    split = smol_tokenizer.encode("Hel", add_special_tokens=False) + smol_tokenizer.encode("lo world",
                                                                                          add_special_tokens=False)
    assert split != canonical  # the same text, other ids: the upstream would read `canonical`
    assert texts.prompt_text(split) == "Hello world" and texts.mismatches == 2


def test_only_accepted_fields_are_sent():
    from vas_server.remote.wire import completion_body

    body = completion_body("m", "text", 2, 5, 0.0, token_ids=False, seed=3, ignore_eos=False)
    assert set(body) == {"model", "prompt", "max_tokens", "logprobs", "temperature", "seed"}
    body = completion_body("m", [1, 2], 2, 5, 1.0, token_ids=True, neutral_samplers=True, banned=[7], ignore_eos=True)
    assert body["return_tokens_as_token_ids"] and body["ignore_eos"] and body["logit_bias"] == {"7": -100}
    assert (body["top_k"], body["top_p"], body["min_p"]) == (0, 1.0, 0.0)  # llama.cpp's default samplers off


@pytest.mark.parametrize("flag, cap, problem", [
    ('{"token_prompts": false}', None, None),
    (None, 20, None),
    ('{"draft": "no"}', None, "draft"),
    ('{"logprob_cap": 0}', None, "logprob_cap"),
    ('{"tokenise": true}', None, "tokenise"),
    ("[1]", None, "JSON object"),
    ("{", None, "not JSON"),
])
def test_given_capabilities_are_validated(flag, cap, problem):
    from vas_server.remote.capabilities import given_capabilities

    if problem is None:
        assert given_capabilities(flag, cap) == ({"token_prompts": False} if flag else {"logprob_cap": 20})
    else:
        with pytest.raises(ValueError, match=problem):
            given_capabilities(flag, cap)


def test_probe_finds_each_capability_and_requires_logit_bias(capped):
    """The whole probe against the stand-in: ids both ways, cap 20, one position per call (no
    drafting, so no ignore_eos), no /tokenize; one that ignores logit_bias, one whose log-probs
    are after temperature and one without /v1/completions are refused."""
    from vas_server.remote.capabilities import Capabilities
    from vas_server.remote.probe import probe

    url, calls = capped

    async def run(mode: str, given: dict) -> Capabilities:
        upstream = CompletionsUpstream(f"{url}/{mode}/v1", "m", retries=0)
        try:
            return await probe(upstream, [1, 2], given)
        finally:
            await upstream.aclose()

    before = len(calls.get("refuse-20", []))
    found = asyncio.run(run("refuse-20", {}))
    # The format (1), neutral samplers (1, its greedy draw reused), logit_bias banned (1), raw
    # log-probs (2), the cap (256, 100, 50, 20), drafting (1); /tokenize is not a completion.
    assert len(calls["refuse-20"]) - before == 10
    assert found.report() == {"token_prompts": True, "token_ids": True, "logprob_cap": 20, "ignore_eos": False,
                              "draft": False, "neutral_samplers": True, "tokenize": False}
    assert "top log-probs up to 20 per position (probed)" in found.describe()
    given = asyncio.run(run("refuse-20", {"logprob_cap": 5, "draft": True}))
    assert (given.logprob_cap, given.draft) == (5, True) and "up to 5 per position (flag)" in given.describe()
    with pytest.raises(ValueError, match="ignores logit_bias"):
        asyncio.run(run("ignorebias-256", {}))
    with pytest.raises(ValueError, match="log-probs change with the temperature"):
        asyncio.run(run("scaled-256", {}))
    with pytest.raises(ValueError, match="offers only chat completions is not supported"):
        asyncio.run(run("chatonly", {}))


def test_logprobs_of_a_position_with_collapsed_texts_are_rectangular():
    """A position whose top list came back shorter (two candidates with one text) still gives
    vLLM n log-probs per position: its last repeated."""
    from vas_server.remote.engine_core import _logprobs
    from vas_server.remote.sampling import Step
    from vas_server.remote.wire import Draw

    full, short = Draw(5, -0.5, [(5, -0.5), (6, -1.0), (7, -2.0)]), Draw(6, -1.0, [(6, -1.0), (8, -3.0)])
    lists = _logprobs([Step(5, -0.5, 1), Step(6, -1.0, 1)], [full, short], 3)
    assert lists.logprob_token_ids.tolist() == [[5, 5, 6, 7], [6, 6, 8, 8]]
    assert lists.logprobs.tolist() == [[-0.5, -0.5, -1.0, -2.0], [-1.0, -1.0, -3.0, -3.0]]
