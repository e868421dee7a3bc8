"""vLLM's per-token logprobs rendered in the two OpenAI shapes (completions and chat).

vLLM gives, per generated token, a dict {token_id: Logprob(logprob, rank, decoded_token)} holding
the sampled token and the `k` most likely ones. JSON has no -inf, so a token that was masked out
(e.g. by `vas_restrict_to_top_k`) is reported with -9999.0, the value OpenAI documents for
"very unlikely".
"""

from __future__ import annotations

import math
from typing import Sequence

from vllm.logprobs import Logprob

from vas_server.api.schemas import CompletionLogprobs, TokenLogprob, TopLogprob

FLOOR = -9999.0

TokenLogprobs = dict[int, Logprob]


def _value(lp: Logprob) -> float:
    return lp.logprob if math.isfinite(lp.logprob) else FLOOR


def _text(lp: Logprob) -> str:
    return lp.decoded_token or ""


def _top(position: TokenLogprobs, k: int) -> list[Logprob]:
    ranked = [lp for lp in position.values() if lp.rank is not None and lp.rank <= k]
    return sorted(ranked, key=lambda lp: lp.rank)


def completion_logprobs(token_ids: Sequence[int], positions: Sequence[TokenLogprobs], k: int,
                        text_offset: int) -> tuple[CompletionLogprobs, int]:
    """The completions `logprobs` object for these tokens, and the text offset after them."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token_id, position in zip(token_ids, positions):
        chosen = position[token_id]
        out.tokens.append(_text(chosen))
        out.token_logprobs.append(_value(chosen))
        top: dict[str, float] = {}
        for lp in _top(position, k):  # different ids can share a text (e.g. partial UTF-8): keep the likelier
            top.setdefault(_text(lp), _value(lp))
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(_text(chosen))
    return out, text_offset


def chat_logprobs(token_ids: Sequence[int], positions: Sequence[TokenLogprobs], k: int) -> list[TokenLogprob]:
    """The chat `logprobs.content` entries for these tokens."""
    def top(lp: Logprob) -> TopLogprob:
        return TopLogprob(token=_text(lp), logprob=_value(lp), bytes=list(_text(lp).encode("utf-8")))

    content = []
    for token_id, position in zip(token_ids, positions):
        chosen = top(position[token_id])
        content.append(TokenLogprob(**chosen.model_dump(), top_logprobs=[top(lp) for lp in _top(position, k)]))
    return content
