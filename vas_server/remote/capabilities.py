"""What the upstream accepts, found at startup with one tiny request per capability, or given by
`--remote-capabilities` (docs/SERVER.md, "VAS over a remote base"), and what follows from it for
one request.

The capabilities, and what remote mode does without each:
  * `token_prompts`: the prompt as token ids (vLLM, SGLang, llama.cpp, OpenAI's legacy completions).
    Without: the context is sent as text, which the upstream encodes again (wire.TokenTexts counts
    where that gives other ids).
  * `token_ids`: `return_tokens_as_token_ids` is accepted (vLLM). Without: the answer names tokens
    by text (or by llama.cpp's `id` field), mapped back with MODEL's tokenizer.
  * `logprob_cap`: the most top log-probs one call returns per position (vLLM's --max-logprobs,
    default 20; OpenAI's legacy completions 5). A request's K above it is served at the cap, and
    its `vas` field says so.
  * `ignore_eos`: accepted (vLLM, llama.cpp). Without: a draft ends at the upstream's eos, and an
    eos among the top-K is a candidate like any other (it always is).
  * `draft`: several tokens per call with log-probs at each position. Without: one token per call.
  * `neutral_samplers`: `top_k` 0, `top_p` 1 and `min_p` 0 are accepted, and sent with every call:
    llama.cpp's server applies top_k 40, top_p 0.95 and min_p 0.05 unless told otherwise, which
    would make its draws those of a truncated distribution. Without (OpenAI's fields only): not
    sent; such APIs apply no truncation by default.
  * `tokenize`: a /tokenize route (vLLM's, or llama.cpp's), used to check that the upstream
    tokenizes as MODEL does. Without: that is assumed, and logged as unchecked.

vas_server.remote.probe finds them. Invariant: `clamp` never asks more than the cap and never
fewer than one candidate.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field, ValidationError



class Capabilities(BaseModel):
    """What the upstream accepts (module docstring). `given`: the fields set by the flag, not probed."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    token_prompts: bool = True
    token_ids: bool = True
    logprob_cap: int = Field(256, ge=1)
    ignore_eos: bool = True
    draft: bool = True
    neutral_samplers: bool = True
    tokenize: bool = True
    given: frozenset[str] = frozenset()

    def describe(self) -> str:
        """The startup log line's body."""
        def said(name: str, text: str) -> str:
            return f"{text} ({'flag' if name in self.given else 'probed'})"

        return "; ".join([
            said("token_prompts", "token-id prompts" if self.token_prompts else "text prompts only"),
            said("token_ids", "token ids in answers" if self.token_ids else "tokens as text in answers"),
            said("logprob_cap", f"top log-probs up to {self.logprob_cap} per position"),
            said("ignore_eos", "ignore_eos" if self.ignore_eos else "no ignore_eos"),
            said("draft", "drafts several tokens per call" if self.draft else "one token per call"),
            said("neutral_samplers", "top_k/top_p/min_p turned off" if self.neutral_samplers
                 else "no top_k/min_p fields"),
            said("tokenize", "/tokenize" if self.tokenize else "no /tokenize (tokenizer unchecked)")])

    def report(self) -> dict:
        """What /v1/models and the startup log say of the upstream (without `given`)."""
        return self.model_dump(exclude={"given"})


def given_capabilities(flag: str | None, logprob_cap: int | None) -> dict:
    """The capabilities `--remote-capabilities` (a JSON object) and `--remote-logprob-cap` set;
    ValueError naming the bad one."""
    given = {}
    if flag:
        try:
            given = json.loads(flag)
        except ValueError as e:
            raise ValueError(f"--remote-capabilities is not JSON: {e}") from None
        if not isinstance(given, dict):
            raise ValueError("--remote-capabilities must be a JSON object, e.g. '{\"token_prompts\": false}'")
    if logprob_cap is not None:
        given["logprob_cap"] = logprob_cap
    try:
        Capabilities(**given)
    except (ValidationError, TypeError) as e:
        fields = ", ".join(f for f in Capabilities.model_fields if f != "given")
        raise ValueError(f"--remote-capabilities: {e} (the fields: {fields})") from None
    return given


def clamp(top_k: int, client_logprobs: int | None, cap: int) -> tuple[int, int]:
    """(C, log-probs asked per call) for a request whose VAS top-K is `top_k` and whose client
    asked `client_logprobs` top log-probs, on an upstream capped at `cap`: C = min(K, cap); the
    call asks max(C, client_logprobs), which the caller has checked is within the cap."""
    candidates = max(1, min(top_k, cap))
    return candidates, max(candidates, client_logprobs or 0)
