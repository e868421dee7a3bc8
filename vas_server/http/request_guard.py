"""The body guard: admission checks on a request's JSON body, before vLLM sees it.

The middleware (vas_server.http.middleware) hands every JSON POST (the generation routes and every
other route that takes JSON: /tokenize, /v1/messages, /invocations, ...) to `guard_body`, which
reads the body with a size limit (413 past VASConfig.max_body_bytes), parses it and runs
`check_request(path, body, max_sequences)`. That raises `RequestRejected` (vLLM's
`VLLMValidationError`, naming the parameter, with the HTTP status to answer) for:

  * what vLLM itself cannot take and answers with a 500, a hang or a dead engine
    (docs/SERVER.md, "Hostile input", names the vLLM code):
      - a string or object key that is not valid Unicode (a lone UTF-16 surrogate such as
        "\\ud800" parses as JSON but cannot be encoded to UTF-8 by the tokenizer or detokenizer);
      - an integer outside int64 (vLLM's pydantic models bound only a few fields; `top_k`, `n`,
        `min_tokens` ... past int64 fail when the request is serialised to the engine);
      - NaN or +-Infinity anywhere (Python's JSON parser, and vLLM's, accept them);
      - a body nested deeper than MAX_DEPTH;
  * the types of the standard OpenAI fields, strictly (the pydantic model `StandardFields`, and
    `CompletionFields` for /v1/completions, where `logprobs` is an integer): vLLM's pydantic models
    are lax and take `"max_tokens": "5"`, `"stream": "yes"`, `"temperature": "1"`, `"n": true`;
    OpenAI does not. A string is not a number, a bool is not an integer, a float is not an
    integer; a logit_bias value is a number in -100..100, as OpenAI documents (vLLM adds 1e308 to
    a float32 logit: +inf);
  * what one request may queue: prompts x n (x best_of) past `VASConfig.max_sequences_per_request`
    is a 422 (the request is well-formed, but more than this server takes at once).

Each rule is checked once, here; values vLLM validates correctly itself (ranges such as n >= 1,
temperature >= 0, token ids within the vocabulary) are left to vLLM. The walk over every value
(`_check_values`) stays hand-written: pydantic checks the fields a model declares, not every
string, number and nesting level of an arbitrary body (messages, tools, JSON schemas). The VAS
fields are vas_server.params' (VASRequest), checked on the generation routes after this guard.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vas_server.http.asgi import BodyTooLarge, Receive, Send, read_body, send_error
from vllm.exceptions import VLLMValidationError

MAX_DEPTH = 64  # JSON nesting; chat messages with content parts and a JSON schema need ~10
INT64 = (-2**63, 2**63 - 1)
MAX_LOGIT_BIAS = 100

# The types of the standard fields, OpenAI's (a `kind` is what the 400 says the field must be).
# strict: no coercion, so a string is not a number and a bool or a float is not an integer.
Integer = Annotated[int | None, Field(description="an integer")]
Number = Annotated[float | None, Field(description="a number")]
Boolean = Annotated[bool | None, Field(description="a boolean")]
String = Annotated[str | None, Field(description="a string")]
# Non-empty strings: vLLM refuses an empty stop string too, but its Anthropic route
# (/v1/messages, `stop_sequences`) logs a traceback for it.
NonEmpty = Annotated[str, Field(min_length=1)]
Stop = Annotated[NonEmpty | list[NonEmpty] | None,
                 Field(description="a non-empty string or a list of non-empty strings")]
TokenList = Annotated[list[int] | None, Field(description="a list of integers")]
# OpenAI documents -100..100; vLLM takes any float, and 1e308 becomes an infinite logit.
LogitBias = Annotated[dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None,
                      Field(description=f"an object mapping token ids to numbers in "
                                        f"-{MAX_LOGIT_BIAS}..{MAX_LOGIT_BIAS}")]


class StandardFields(BaseModel):
    """The standard fields of the generation routes, by the JSON type OpenAI's API gives them; any
    route's body is checked against them. A field that is absent or null is left to vLLM's
    defaults, and every other field to vLLM (extra="ignore": nothing is copied). Only the types:
    ranges vLLM checks itself are vLLM's."""

    model_config = ConfigDict(strict=True, extra="ignore")

    max_tokens: Integer = None
    max_completion_tokens: Integer = None
    max_output_tokens: Integer = None
    n: Integer = None
    best_of: Integer = None
    seed: Integer = None
    top_k: Integer = None
    min_tokens: Integer = None
    top_logprobs: Integer = None
    prompt_logprobs: Integer = None
    truncate_prompt_tokens: Integer = None
    priority: Integer = None
    max_tool_calls: Integer = None
    temperature: Number = None
    top_p: Number = None
    min_p: Number = None
    presence_penalty: Number = None
    frequency_penalty: Number = None
    repetition_penalty: Number = None
    length_penalty: Number = None
    stream: Boolean = None
    echo: Boolean = None
    ignore_eos: Boolean = None
    skip_special_tokens: Boolean = None
    spaces_between_special_tokens: Boolean = None
    include_stop_str_in_output: Boolean = None
    add_special_tokens: Boolean = None
    use_beam_search: Boolean = None
    add_generation_prompt: Boolean = None
    continue_final_message: Boolean = None
    return_tokens_as_token_ids: Boolean = None
    return_token_ids: Boolean = None
    parallel_tool_calls: Boolean = None
    store: Boolean = None
    background: Boolean = None
    include_reasoning: Boolean = None
    model: String = None
    user: String = None
    suffix: String = None
    instructions: String = None
    previous_response_id: String = None
    stop: Stop = None
    stop_sequences: Stop = None
    stop_token_ids: TokenList = None
    allowed_token_ids: TokenList = None
    logprob_token_ids: TokenList = None
    logit_bias: LogitBias = None
    logprobs: Boolean = None  # chat (and every route but completions): whether to return them


class CompletionFields(StandardFields):
    logprobs: Integer = None  # completions: how many per token


COMPLETIONS = "/v1/completions"


class RequestRejected(VLLMValidationError, ValueError):
    """A request refused at admission, any field (not only VAS's); `parameter` names it and
    `status_code` is the HTTP status to answer."""

    def __init__(self, param: str, message: str, status_code: int = 400):
        super().__init__(message, parameter=param)
        self.status_code = status_code


async def guard_body(path: str, steerable_paths: tuple[str, ...], max_bytes: int, max_sequences: int,
                     receive: Receive, send: Send) -> tuple[bytes, Any] | None:
    """Read and check a JSON POST's body: (body, parsed JSON or None), or None when the request
    was refused here (answered with vLLM's error body). An empty body on a route that does not
    steer (one not in `steerable_paths`) passes, as vLLM's business; such a route refuses `vas_*`
    fields, so that no answer is silently unsteered."""
    try:
        body = await read_body(receive, max_bytes)
    except BodyTooLarge:
        await send_error(send, 413, f"request body larger than {max_bytes} bytes", None, "RequestEntityTooLarge")
        return None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        payload = None  # not JSON
    steerable = path in steerable_paths
    if not steerable and not body:
        return body, payload
    try:
        check_request(path, payload, max_sequences)
        steering = sorted(k for k in payload if k.startswith("vas_")) if not steerable else []
        if steering:
            raise RequestRejected(steering[0], f"{path} does not take steering fields; "
                                               f"{', '.join(steerable_paths)} do")
    except RequestRejected as e:
        await send_error(send, e.status_code, e.args[0], e.parameter)
        return None
    return body, payload


def check_request(path: str, body: Any, max_sequences: int) -> None:
    """Raise RequestRejected if `body` (the parsed JSON of a POST to `path`; None when the body did
    not parse) must not reach vLLM."""
    if not isinstance(body, dict):
        # Not JSON, not UTF-8, nested past Python's recursion limit, or not an object: vLLM would
        # answer some of these in FastAPI's own shape ({"detail": ...}), not OpenAI's.
        raise RequestRejected("body", "the request body must be a JSON object (UTF-8)")
    _check_values(body)
    fields = CompletionFields if path == COMPLETIONS else StandardFields
    try:
        fields.model_validate(body)
    except ValidationError as e:  # the first field refused, in the model's order; its own message
        field = str(e.errors(include_url=False, include_context=False)[0]["loc"][0])
        raise RequestRejected(field, f"{field} must be {fields.model_fields[field].description}, "
                                     f"got {_describe(body[field])}") from None
    sequences = _num_prompts(body) * max(_count(body, "n"), _count(body, "best_of"))
    if sequences > max_sequences:
        raise RequestRejected("n", f"this request asks for {sequences} sequences (prompts x n); this server takes "
                                   f"at most {max_sequences} per request", 422)


def _check_values(body: Any) -> None:
    """Every string valid Unicode, every number finite and every integer within int64, nesting at
    most MAX_DEPTH; walked without recursion, so no body can exhaust the stack. A refused value
    is named by its path, OpenAI's style (`messages[0].content`, `vas_weights.positive`), as
    vas_server.params names a bad weight; a refused key by the object holding it; too deep a
    body by its top-level field (a path 64 levels deep would help nobody)."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RequestRejected(_top(where), f"the request is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, where or key)
                stack.append((item, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, where)
        elif isinstance(value, float) and not math.isfinite(value):
            raise RequestRejected(where, f"{where} must be a finite number, got {value}")
        elif isinstance(value, int) and not isinstance(value, bool) and not INT64[0] <= value <= INT64[1]:
            raise RequestRejected(where, f"{where} is outside the 64-bit integer range")


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestRejected(where, f"{where} is not valid Unicode (a lone UTF-16 surrogate such as "
                                     f"\\ud800)") from None


def _num_prompts(body: dict) -> int:
    """How many prompts a completions body holds: a list of strings or of token lists is a batch."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def _count(body: dict, field: str) -> int:
    value = body.get(field)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1


def _top(where: str) -> str:
    """The top-level field of a path such as `messages[0].content`."""
    return where.split(".")[0].split("[")[0] or "body"


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", str: "a string", list: "a list", dict: "an object", float: "a float",
            int: "an integer"}.get(type(value), type(value).__name__)
    text = repr(value) if isinstance(value, (bool, int, float)) or isinstance(value, str) and len(value) < 30 else ""
    return f"{kind} {text}".strip()
