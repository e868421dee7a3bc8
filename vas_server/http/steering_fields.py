"""The steering fields of a generation request and of its answer (`serve_generation`: the
middleware's generation routes, STEERABLE_PATHS):

  * `rewrite_request`: a `model` that names a preset becomes the base, with the preset's settings
    under the request's own `vas_*` fields (vas_server.presets.override); the body's steering
    becomes a VASRequest (`VASRequest.from_api`: the one validation on this path, done before
    any stream starts), its top-K is resolved (VASConfig.top_k_for), and what vLLM gets in
    `vllm_xargs` is that request, serialised and stamped (params.admitted). The `vas` echo is
    the same request: the settings the worker applies. A preset chosen with none of the
    request's own steering fields runs the preset's settings as they are: that Admission is
    computed once, at the preset's first such request, and reused (`_preset_admission`).
  * `AnswerRewrite`: the echo added to the answer (JSON, or the SSE chunks that finish a choice)
    and, for a preset, the answer's `model` renamed to the preset's id.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from vas_server.http.asgi import Message, Receive, Scope, Send, replay, send_error, send_raw, with_length
from vas_server.http import explain as explanations
from vas_server.params import EXPLAIN_FIELD, EXPLAIN_KEY, EXTRA_ARGS_KEY, REMOTE_RECORD_KEY, STAMP_KEY, Explain, VASParamError, VASRequest
from vas_server.presets import override
from vas_server.http.server_view import Admission, ServerView


# /invocations is SageMaker's route: vLLM answers it with the chat or completions handler.
STEERABLE_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/invocations")
logger = logging.getLogger(__name__)
REPORTING_PATHS = ("/v1/completions", "/v1/chat/completions", "/invocations")  # answers that gain `vas`


async def serve_generation(app, server: ServerView, path: str, payload: dict, body: bytes, scope: Scope,
                           receive: Receive, send: Send) -> None:
    """A generation request whose body the guard passed (so `payload` is its JSON object): a
    `model` no served name, adapter or preset is a 404; invalid steering a 400; else vLLM answers
    the rewritten request, its answer rewritten on the way out (AnswerRewrite)."""
    missing = server.unknown_model(payload.get("model"))
    if missing:
        return await send_error(send, 404, missing, "model", "NotFoundError")
    try:
        if payload.get(EXPLAIN_FIELD) is not None and path not in REPORTING_PATHS:
            raise VASParamError(EXPLAIN_FIELD, f"{EXPLAIN_FIELD} is answered on /v1/completions and "
                                               f"/v1/chat/completions only")
        rewritten = rewrite_request(server, payload, body)
    except VASParamError as e:
        # Refused here, not later: vLLM validates a streaming request only once its 200 event
        # stream has started, and would send the 400 inside it.
        return await send_error(send, 400, e.args[0], e.parameter)
    reporting = path in REPORTING_PATHS
    scope, receive = with_length(scope, len(rewritten.body)), replay(rewritten.body, receive)
    if not reporting and rewritten.preset is None:
        return await app(scope, receive, send)
    rename = (server.base_name, rewritten.preset) if rewritten.preset is not None else None
    explain = (server, rewritten.explain_key) if rewritten.explain_key is not None else None
    record = (server, rewritten.record_key) if rewritten.record_key is not None else None
    await app(scope, receive, AnswerRewrite(send, rewritten.report, reporting, rename, explain, record))


@dataclass
class RewrittenRequest:
    body: bytes  # what vLLM gets
    report: dict | None  # the `vas` echo: the settings applied, None when unsteered
    preset: str | None  # the preset the request chose as its model
    explain_key: str | None = None  # the worker's key of the request's vas_explain record
    record_key: str | None = None  # over a remote base: the engine core's key of the request's record


def rewrite_request(server: ServerView, payload: dict, body: bytes) -> RewrittenRequest:
    """Rewrite a generation request's parsed body (`payload`, modified in place). Raises
    VASParamError (a 400 naming the field) for invalid settings."""
    changed, preset_id, admission, record_key = False, None, None, None
    preset = server.presets.get(payload.get("model"))
    if preset is not None:  # run the base with the preset's settings, the request's on top
        preset_id = payload["model"]
        if _has_own_settings(payload):
            payload.update(override(preset, payload))
        else:
            admission = _preset_admission(server, preset_id)
        payload["model"] = server.base_name
        server.preset_requests[preset_id] = server.preset_requests.get(preset_id, 0) + 1
        changed = True
    explain = Explain.from_api(payload)
    if admission is None:
        request = VASRequest.from_api(payload, server.head_infos)
        if request is None and explain is None:
            return RewrittenRequest(json.dumps(payload).encode() if changed else body, None, preset_id)
        admission = Admission.of(server, request) if request is not None and request.active else None
    if explain is not None:
        if admission is None:
            raise VASParamError(EXPLAIN_FIELD, f"{EXPLAIN_FIELD} explains steering: give a head a non-zero weight")
        if getattr(server.state.args, "remote_base", None):
            raise VASParamError(EXPLAIN_FIELD, f"{EXPLAIN_FIELD} is not available over a remote base (--remote-base)")
        explain = explain.model_copy(update={"id": explanations.new_key()})
    for field in [f for f in payload if f.startswith("vas_")]:
        del payload[field]
    given = payload.get("vllm_xargs")
    if given is not None and not isinstance(given, dict):
        raise VASParamError("vllm_xargs", "vllm_xargs must be an object")
    xargs = ({k: v for k, v in given.items() if k not in (EXTRA_ARGS_KEY, STAMP_KEY, EXPLAIN_KEY, REMOTE_RECORD_KEY)}
             if given else {})
    if admission is not None:
        if payload.get("prompt_embeds") is not None:  # the value runtime needs token ids
            raise VASParamError("prompt_embeds", "steering needs the prompt as text or token ids, "
                                                 "not prompt_embeds")
        xargs.update(admission.xargs)
        if server.upstream is not None:  # over a remote base: the engine core keeps what `vas` adds
            record_key = explanations.new_key()
            xargs[REMOTE_RECORD_KEY] = record_key
    if explain is not None:
        xargs.update(explain.to_extra_args())
    if xargs or given is not None:
        payload["vllm_xargs"] = xargs
    return RewrittenRequest(json.dumps(payload).encode(), admission.report if admission else None, preset_id,
                            explain.id if explain is not None else None, record_key)


def _has_own_settings(payload: dict) -> bool:
    """Whether the request carries steering of its own (a `vas_*` field, misspelt ones included,
    or settings in `vllm_xargs["vas"]`): what VASRequest.from_api reads besides a preset's fields."""
    xargs = payload.get("vllm_xargs")
    return (any(field.startswith("vas_") for field in payload)
            or isinstance(xargs, dict) and xargs.get(EXTRA_ARGS_KEY) is not None)


def _preset_admission(server: ServerView, preset_id: str) -> Admission:
    """The Admission of a preset's own settings, made at the preset's first request and then
    reused: for a request with no steering of its own, from_api would validate the same
    settings against the same heads every time (the preset was validated at startup,
    PresetTable.build), and the resolved top-K and the stamp depend only on them and on this
    process. Doing that once saves about 19 us of a preset request's ~28 (docs/BENCHMARKS.md)."""
    admission = server.preset_admissions.get(preset_id)
    if admission is None:
        settings = override(server.presets.get(preset_id), {})  # the preset's fields alone
        admission = Admission.of(server, VASRequest.from_api(settings, server.head_infos))
        server.preset_admissions[preset_id] = admission
    return admission


class AnswerRewrite:
    """Adds `"vas": report` to a chat or completions answer on its way out (when `reporting`): to
    the JSON object of a 200 answer, or to each SSE chunk in which a choice finishes. With
    `rename` = (base name, preset id), the answer's `model` (JSON, every SSE chunk) becomes the
    preset's id. Other answers pass as they are."""

    def __init__(self, send: Send, report: dict | None, reporting: bool = True,
                 rename: tuple[str, str] | None = None, explain: tuple[ServerView, str] | None = None,
                 record: tuple[ServerView, str] | None = None):
        self.send, self.report, self.reporting, self.rename = send, report, reporting, rename
        self.explain = explain  # (server, key): add the worker's vas_explain record where `vas` goes
        self.record = record  # (server, key): over a remote base, the request's upstream text mismatches
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
            chunk = message.get("body", b"")
            explained = await self._explained() if self.explain and self._finishes(chunk) else None
            if self.record and self.reporting and self._finishes(chunk):
                await self._recorded()
            return await self.send(dict(message, body=self._sse(chunk, explained)))
        self.parts.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(self.parts)
        try:
            answer = json.loads(body)
            if self.reporting:
                if self.record:
                    await self._recorded()
                answer["vas"] = self.report
                if self.explain:
                    answer[EXPLAIN_FIELD] = await self._explained()
            if self.rename and "model" in answer:
                answer["model"] = self.rename[1]
            body = json.dumps(answer).encode()
        except (ValueError, TypeError):
            pass
        await send_raw(self.send, self.start["status"], self.start["headers"], body)

    async def _recorded(self) -> None:
        """Add the request's upstream text mismatches (remote mode's record, read once) to the
        report: `upstream_token_mismatches` (vas_server.remote.wire)."""
        server, key = self.record
        self.record = None
        try:
            results = await asyncio.wait_for(server.state.engine_client.collective_rpc(REMOTE_RECORD_KEY, args=(key,)),
                                             explanations.RPC_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - the answer itself is done; the count is extra
            logger.warning("could not read the remote record from the engine: %r", e)
            return
        count = next((r for r in results or () if r is not None), None)
        if count is not None and self.report is not None:
            self.report = {**self.report, "upstream_token_mismatches": count}

    async def _explained(self) -> dict | None:
        """The request's vas_explain record (read once: the worker forgets it)."""
        server, key = self.explain
        self.explain = None
        return await explanations.fetch(server, key)

    @staticmethod
    def _finishes(chunk: bytes) -> bool:
        return b'"finish_reason":"' in chunk.replace(b'": "', b'":"')

    def _sse(self, chunk: bytes, explained: dict | None = None) -> bytes:
        if self.model_field:
            chunk = chunk.replace(*self.model_field)
        if not self.reporting or not self._finishes(chunk):
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
                if explained is not None:
                    data[EXPLAIN_FIELD], explained = explained, None
                events[i] = b"data: " + json.dumps(data).encode()
        return b"\n\n".join(events)
