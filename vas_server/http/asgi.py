"""ASGI plumbing for vas-server's middleware: read a request body once (with a size limit) and
replay it to vLLM's app, capture an answer, and send JSON or vLLM's own error body."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, Awaitable, Callable

from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyTooLarge(Exception):
    pass


async def read_body(receive: Receive, limit: int) -> bytes:
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise BodyTooLarge
        parts.append(part)
        if not message.get("more_body"):
            break
    return b"".join(parts)


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields `body` once, then the client's own messages (http.disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def is_json(scope: Scope) -> bool:
    content_type = dict(scope["headers"]).get(b"content-type", b"")
    return content_type.split(b";")[0].strip().lower() == b"application/json"


def with_length(scope: Scope, length: int) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    return dict(scope, headers=[*headers, (b"content-length", str(length).encode())])


async def capture(app, scope: Scope, receive: Receive) -> tuple[int, list, bytes]:
    """Run the app and keep its whole answer: (status, headers, body)."""
    start: Message = {}
    parts: list[bytes] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))

    await app(scope, receive, send)
    return start.get("status", 500), list(start.get("headers", [])), b"".join(parts)


async def send_raw(send: Send, status: int, headers: list, body: bytes) -> None:
    headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, payload: Any) -> None:
    await send_raw(send, status, [(b"content-type", b"application/json")], json.dumps(payload).encode())


async def send_error(send: Send, status: int, message: str, param: str | None,
                      err_type: str = "BadRequestError") -> None:
    """vLLM's own error body ({"error": {"message", "type", "param", "code"}})."""
    error = create_error_response(message, err_type=err_type, status_code=HTTPStatus(status), param=param)
    await send_json(send, status, error.model_dump())
