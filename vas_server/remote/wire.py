"""What goes over the wire to an OpenAI-compatible /v1/completions, and back: the request body
for the upstream's capabilities (vas_server.remote.capabilities), and the answer's per-position
log-probs in either of the two formats upstreams use, as token ids.

Answer formats (`positions`):
  * OpenAI's legacy completions format (vLLM, OpenAI, SGLang): `logprobs.tokens`,
    `logprobs.token_logprobs`, `logprobs.top_logprobs` (one {token: log-prob} object per position);
  * the `content` list (llama.cpp's server, OpenAI's chat format): `logprobs.content`, one
    {token, logprob, top_logprobs: [{token, logprob}]} per position, with `id` where llama.cpp adds it.
A token is named by `token_id:N` (vLLM's return_tokens_as_token_ids), by an `id` field, or by its
text alone; text is mapped back to an id with MODEL's tokenizer (`TokenTexts`), and a text that
names no single id is a mismatch, counted.

Text prompts (`prompt_text`): the context's ids are decoded; the upstream encodes that text again,
and where that gives other ids than the context's (a sampled token sequence that is not the
tokenizer's own segmentation of its text) the upstream continues a different sequence: also a
mismatch, counted (docs/SERVER.md, "VAS over a remote base" measures how often).
"""

from __future__ import annotations

from dataclasses import dataclass, field

BANNED = -100  # OpenAI's logit_bias minimum: the token is never drawn


@dataclass(frozen=True)
class Draw:
    """One step of the base: the token the upstream drew, that token's raw (temperature 1) log-prob,
    and the best tokens with their raw log-probs, best first (k of them, fewer only where an
    upstream answering with text named two candidates with the same text)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    mismatches: int = 0  # on a call's first Draw: the call's text mismatches (TokenTexts)


@dataclass
class TokenTexts:
    """MODEL's tokenizer as text <-> ids, for upstreams that take or give text. `mismatches`
    counts every text that does not name one id, and every context the upstream would read as
    other ids than ours."""

    tokenizer: object
    mismatches: int = 0
    _ids_of: dict[str, list[int]] | None = field(default=None, repr=False)
    _specials: tuple[list[int], list[int]] | None = field(default=None, repr=False)

    def id_of(self, text: str) -> int:
        """The id whose text is `text` (each token decoded alone, as upstreams show it; "" for a
        special token an upstream skips); of several, eos if it is one, else the lowest, counted
        as a mismatch; ValueError for a text that names none."""
        if self._ids_of is None:
            ids_of: dict[str, list[int]] = {}
            for i, piece in enumerate(self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))):
                shown = self.tokenizer.decode([i])
                ids_of.setdefault(shown, []).append(i)
                if isinstance(piece, str) and piece.startswith("\u2581") and not shown.startswith(" "):
                    # SentencePiece's word-start marker, which decode drops and vLLM restores
                    ids_of.setdefault(" " + shown, []).append(i)
            for i in self.tokenizer.all_special_ids:  # shown as "" where special tokens are skipped (vLLM)
                ids_of.setdefault("", []).append(i)
            self._ids_of = ids_of
        ids = self._ids_of.get(text)
        if not ids:
            self.mismatches += 1
            raise ValueError(f"the upstream named a token {text!r} that MODEL's tokenizer does not have")
        if len(ids) > 1:
            self.mismatches += 1
            if self.tokenizer.eos_token_id in ids:  # the one that matters most: it ends the answer
                return self.tokenizer.eos_token_id
        return ids[0]

    def prompt_text(self, context: list[int]) -> str:
        """The text whose encoding (with the special tokens the tokenizer adds itself) is `context`
        where it can be: the tokens the tokenizer adds are left to the upstream to add. Counts a
        mismatch when encoding the text gives other ids."""
        prefix, suffix = self._added()
        body = context
        if prefix and body[:len(prefix)] == prefix:
            body = body[len(prefix):]
        text = self.tokenizer.decode(body)
        if self.tokenizer.encode(text) != context:
            self.mismatches += 1
        return text

    def _added(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer adds around any text (a BOS, say): (before, after)."""
        if self._specials is None:
            marker = self.tokenizer.encode("a", add_special_tokens=False)
            full = self.tokenizer.encode("a")
            start = next((i for i in range(len(full)) if full[i:i + len(marker)] == marker), 0)
            self._specials = (full[:start], full[start + len(marker):])
        return self._specials


NEUTRAL_SAMPLERS = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}  # every token drawable (llama.cpp's defaults are not)


def completion_body(model: str, context: list[int] | str, n: int, k: int, temperature: float, *,
                    token_ids: bool, neutral_samplers: bool = False, banned=(), seed: int | None = None,
                    ignore_eos: bool = False) -> dict:
    """A /v1/completions body: n tokens after `context` (ids, or text for an upstream that takes
    only text), the top-k log-probs at each position; `token_ids`: ask for ids in the answer
    (vLLM's return_tokens_as_token_ids, which upstreams that refuse unknown fields do not get);
    `neutral_samplers`: turn off top_k, top_p and min_p, which some upstreams apply by default."""
    body = {"model": model, "prompt": context, "max_tokens": n, "logprobs": k, "temperature": temperature}
    if neutral_samplers:
        body.update(NEUTRAL_SAMPLERS)
    if token_ids:
        body["return_tokens_as_token_ids"] = True
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's and llama.cpp's; changes where the upstream stops, not what it draws
    if banned:
        body["logit_bias"] = {str(t): BANNED for t in banned}
    if seed is not None:
        body["seed"] = seed
    return body


def positions(choice: dict, k: int, texts: TokenTexts | None, full: bool = True) -> list[Draw]:
    """The choice's positions as Draws, each with its k best. ValueError, KeyError, IndexError or
    TypeError for an answer without token log-probs; ShortLogprobs for a position with fewer than
    k where `full` (else those are kept, each missing one counted as a mismatch: an upstream
    answering with text lists two candidates with the same text once)."""
    logprobs = choice["logprobs"]
    if "content" in logprobs and logprobs.get("tokens") is None:
        rows = [(entry, entry["logprob"], [(t, t["logprob"]) for t in entry["top_logprobs"]])
                for entry in logprobs["content"]]
    else:
        rows = [(token, logprob, list(top.items())) for token, logprob, top in
                zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True)]
    draws = []
    for token, logprob, top in rows:
        if len(top) < k:
            if full or texts is None:
                raise ShortLogprobs(len(top), k)
            texts.mismatches += k - len(top)
        best = {}
        for name, lp in top:
            best.setdefault(_token_id(name, texts), float(lp))  # a text named twice keeps its best
        ranked = sorted(best.items(), key=lambda pair: -pair[1])
        # vLLM adds the drawn token's log-prob when it is not among the top k: the k best are the first k.
        draws.append(Draw(_token_id(token, texts), float(logprob), ranked[:k]))
    return draws


class ShortLogprobs(ValueError):
    def __init__(self, given: int, asked: int):
        super().__init__(f"{given} log-probs given, {asked} asked")
        self.given, self.asked = given, asked


def _token_id(token, texts: TokenTexts | None) -> int:
    """A token's id: `token_id:N` (vLLM's return_tokens_as_token_ids), an entry's `id` (llama.cpp),
    or its text through MODEL's tokenizer."""
    if isinstance(token, dict):
        if isinstance(token.get("id"), int):
            return token["id"]
        token = token["token"]
    if not isinstance(token, str):
        raise TypeError(f"not a token: {token!r}")
    if token.startswith("token_id:"):
        return int(token.removeprefix("token_id:"))
    if texts is None:
        raise ValueError(f"not a token id: {token!r} (the upstream must honour return_tokens_as_token_ids)")
    return texts.id_of(token)
