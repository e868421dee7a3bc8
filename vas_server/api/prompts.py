"""Turn request prompts into token ids, and check them against the model's context.

We tokenize in the API (instead of handing vLLM text) because the server needs the token
counts before the engine sees the request: to reject an over-long prompt with a 400 before a
stream starts, and to pick the default `max_tokens`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from vas_server.api.errors import APIError, bad_request
from vas_server.api.schemas import ChatMessage, CompletionRequest

CONTEXT_CODE = "context_length_exceeded"


def _check_ids(ids: list[int], vocab_size: int, param: str) -> list[int]:
    if not ids:
        raise bad_request("The prompt must not be empty.", param)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"Token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1}).", param)
    return ids


async def completion_prompts(tokenizer: Any, request: CompletionRequest, vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt: a string, a batch of strings, a token-id list or a batch of them."""
    prompt = request.prompt
    if isinstance(prompt, str):
        batch: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        batch = [list(prompt)]
    else:
        batch = list(prompt)
    if not batch:
        raise bad_request("The prompt must not be empty.", "prompt")

    def encode(p: str | list[int]) -> list[int]:
        return p if isinstance(p, list) else tokenizer.encode(p)

    # Tokenizing a long prompt takes a while; keep the event loop (and other streams) moving.
    encoded = await asyncio.to_thread(lambda: [encode(p) for p in batch])
    return [_check_ids(ids, vocab_size, "prompt") for ids in encoded]


def _message_dict(message: ChatMessage) -> dict[str, str]:
    content = message.content
    text = content if isinstance(content, str) else "".join(part.text for part in content or [])
    # Most chat templates know no "developer" role; it is OpenAI's new name for "system".
    role = "system" if message.role == "developer" else message.role
    out = {"role": role, "content": text}
    if message.name:
        out["name"] = message.name
    return out


async def chat_prompt(tokenizer: Any, messages: list[ChatMessage], vocab_size: int) -> list[int]:
    """Token ids of the conversation rendered with the model's chat template."""
    conversation = [_message_dict(m) for m in messages]

    def render() -> list[int]:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        # The template writes any special tokens itself (as vLLM's chat path assumes).
        return tokenizer.encode(text, add_special_tokens=False)

    try:
        ids = await asyncio.to_thread(render)
    except Exception as e:  # no chat template, or the template rejects the conversation
        raise bad_request(f"Cannot apply the model's chat template to these messages: {e}", "messages") from e
    return _check_ids(ids, vocab_size, "messages")


def max_tokens_for(prompt_len: int, requested: int | None, default: int | None, max_model_len: int,
                   prompt_param: str, max_tokens_param: str) -> int:
    """The number of tokens to generate for one prompt.

    An explicit request that does not fit is a 400 (as OpenAI does); a default is shrunk to fit.
    `default=None` means "the rest of the context".
    """
    room = max_model_len - prompt_len
    if room <= 0:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, your "
                       f"prompt contains {prompt_len} tokens, leaving no room for a completion.",
                       param=prompt_param, code=CONTEXT_CODE)
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                       f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} "
                       f"for the completion). Please reduce the prompt or {max_tokens_param}.",
                       param=max_tokens_param, code=CONTEXT_CODE)
    return requested
