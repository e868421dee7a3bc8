"""The steering fields of a generation request and of its answer (vas_server.middleware's
generation routes):

  * `steer_request`: a `model` that names a preset becomes the base, with the preset's settings
    under the request's own `vas_*` fields (vas_server.presets.override); the top-level `vas_*`
    fields move into the body's `vllm_xargs` (params.api_extra_args), checked once here so that a
    streaming request is refused before its stream starts; and the `vas` echo is computed.
  * `AnswerRewrite`: the echo added to the answer (JSON, or the SSE chunks that finish a choice)
    and, for a preset, the answer's `model` renamed to the preset's id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from vas_server.asgi import Message, Send, send_raw
from vas_server.params import VASRequest, api_extra_args
from vas_server.presets import override
from vas_server.server_view import ServerView


@dataclass
class SteeredRequest:
    body: bytes  # what vLLM gets
    report: dict | None  # the `vas` echo: the settings applied, None when unsteered
    preset: str | None  # the preset the request chose as its model


def steer_request(server: ServerView, payload: dict, body: bytes) -> SteeredRequest:
    """Rewrite a generation request's parsed body (`payload`, modified in place). Raises
    VASParamError (a 400 naming the field) for invalid settings."""
    changed, preset_id = False, None
    preset = server.presets.get(payload.get("model"))
    if preset is not None:  # run the base with the preset's settings, the request's on top
        preset_id = payload["model"]
        payload.update(override(preset, payload))
        payload["model"] = server.base_name
        server.preset_requests[preset_id] = server.preset_requests.get(preset_id, 0) + 1
        changed = True
    xargs = api_extra_args(payload)
    if xargs is not None:
        for field in list(payload):
            if field.startswith("vas_"):
                del payload[field]
        given = payload.get("vllm_xargs")
        payload["vllm_xargs"] = {**given, **xargs} if isinstance(given, dict) else (given or xargs)
        changed = True
    report = _report(payload, server)
    return SteeredRequest(json.dumps(payload).encode() if changed else body, report, preset_id)


def _report(payload: dict, server: ServerView) -> dict | None:
    """The `vas` field of the answer: the settings applied, None when unsteered. Raises
    VASParamError for invalid settings (the same check as the processor's validate_params)."""
    xargs = payload.get("vllm_xargs")
    known = server.heads if server.config.value_models else None
    request = VASRequest.from_extra_args(xargs if isinstance(xargs, dict) else None, known)
    if request is None or not request.active:
        return None
    report = request.report()
    report["top_k"] = server.config.top_k_for(request, server.heads)
    return report


class AnswerRewrite:
    """Adds `"vas": report` to a chat or completions answer on its way out (when `reporting`): to
    the JSON object of a 200 answer, or to each SSE chunk in which a choice finishes. With
    `rename` = (base name, preset id), the answer's `model` (JSON, every SSE chunk) becomes the
    preset's id. Other answers pass as they are."""

    def __init__(self, send: Send, report: dict | None, reporting: bool = True,
                 rename: tuple[str, str] | None = None):
        self.send, self.report, self.reporting, self.rename = send, report, reporting, rename
        # SSE chunks are rewritten as bytes: vLLM writes compact JSON, and a string inside content
        # has its quotes escaped, so `"model":"<base>"` only matches the field itself.
        self.model_field = (tuple(f'"model":{json.dumps(name)}'.encode() for name in rename)
                            if rename else None)
        self.mode = "pass"  # "json": buffer and rewrite; "sse": rewrite finishing chunks
        self.start: Message | None = None
        self.parts: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            if message["status"] == 200 and content_type.startswith(b"application/json"):
                self.mode, self.start = "json", message
                return
            if message["status"] == 200 and content_type.startswith(b"text/event-stream"):
                self.mode = "sse"
            return await self.send(message)
        if message["type"] != "http.response.body" or self.mode == "pass":
            return await self.send(message)
        if self.mode == "sse":
            return await self.send(dict(message, body=self._sse(message.get("body", b""))))
        self.parts.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(self.parts)
        try:
            answer = json.loads(body)
            if self.reporting:
                answer["vas"] = self.report
            if self.rename and "model" in answer:
                answer["model"] = self.rename[1]
            body = json.dumps(answer).encode()
        except (ValueError, TypeError):
            pass
        await send_raw(self.send, self.start["status"], self.start["headers"], body)

    def _sse(self, chunk: bytes) -> bytes:
        if self.model_field:
            chunk = chunk.replace(*self.model_field)
        if not self.reporting or b'"finish_reason":"' not in chunk.replace(b'": "', b'":"'):
            return chunk
        events = chunk.split(b"\n\n")
        for i, event in enumerate(events):
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            try:
                data = json.loads(event[6:])
            except ValueError:
                continue
            if any(c.get("finish_reason") for c in data.get("choices") or []):
                data["vas"] = self.report
                events[i] = b"data: " + json.dumps(data).encode()
        return b"\n\n".join(events)
