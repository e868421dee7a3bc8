"""The HTTP side of VAS: one ASGI middleware on vLLM's own OpenAI server.

Installed with vLLM's `--middleware vas_server.middleware.VASMiddleware` (`vas-server serve` adds
it). It reads the VAS configuration from the engine's `additional_config["vas"]`
(`app.state.vllm_config`, set by vLLM before the server accepts requests), so a plain
`vllm serve ... --additional-config ... --middleware ...` gets the same behaviour.

What it adds to vLLM's routes, and nothing else:
  * POST /v1/completions, /v1/chat/completions, /v1/responses, /invocations: the top-level `vas_weights`,
    `vas_top_k`, `vas_restrict_to_top_k` move into the body's `vllm_xargs` (params.api_extra_args);
    a misspelt `vas_*` field is a 400. vLLM validates the values at admission through the
    processor's `validate_params`. Chat and completions answers (JSON, or the SSE chunks that
    finish a choice) gain `"vas"`: the settings applied, or null when the request was not steered.
  * Presets (vas_server.presets): a request whose `model` is a preset runs the base with the
    preset's settings (request `vas_*` fields override them field by field), and its answer (JSON,
    or every SSE chunk) names the preset as `model`. An unknown `model` is a 404 listing every id.
  * GET /v1/models: one card per preset (every head is one) after vLLM's own cards, `parent` the
    base; `GET /v1/models/{id}` (which vLLM lacks) answers one card from the same list. Machine
    paths in `root` become model names.
  * GET /metrics: the VAS counters (vas_server.metrics) after vLLM's own metrics, and requests per
    preset (`vas_preset_requests_total{preset=...}`).
  * Every JSON POST body (any route: also /tokenize, /v1/messages, /invocations, ...) is read with
    a size limit (VASConfig.max_body_bytes, 413 past it) and checked by request_guard before
    vLLM parses it.
  * With an API key, a request without it is refused here, first, in OpenAI's error shape.

vLLM internals it relies on (vllm 0.32.0): `app.state.vllm_config`, `app.state.args`
(`api_key`), `app.state.engine_client.collective_rpc`, `app.state.openai_serving_models` (served
names, LoRA adapters), the JSON / SSE shapes of vLLM's answers
and `create_error_response` for vLLM's error body. Starlette puts the app in `scope["app"]`.
"""

from __future__ import annotations

import json
import os
from http import HTTPStatus
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from vllm import envs
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX, AuthenticationMiddleware

from vas_server.config import HeadInfo, VASConfig
from vas_server.params import VASParamError, VASRequest, api_extra_args
from vas_server.presets import Preset, PresetTable, override
from vas_server.request_guard import RequestRejected, check_request

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# /invocations is SageMaker's route: vLLM answers it with the chat or completions handler.
STEERABLE_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/invocations")
REPORTING_PATHS = ("/v1/completions", "/v1/chat/completions", "/invocations")  # answers that gain `vas`
MODELS_PATH = "/v1/models"
METRICS_PATH = "/metrics"


@dataclass
class _Server:
    """What the middleware needs from the running server, read once from app.state."""

    config: VASConfig  # the defaults when the engine has no additional_config["vas"]
    heads: dict[str, HeadInfo]
    presets: PresetTable
    auth: AuthenticationMiddleware | None
    state: Any  # app.state: engine_client for /metrics, openai_serving_models for model ids
    preset_requests: dict[str, int]  # requests per preset, for /metrics

    @classmethod
    def of(cls, state) -> "_Server":
        additional = getattr(state.vllm_config, "additional_config", None) or {}
        config = VASConfig.from_additional_config(additional)
        heads = config.heads()
        presets = config.preset_table(heads, [m.name for m in state.openai_serving_models.base_model_paths])
        tokens = [key for key in (getattr(state.args, "api_key", None) or [envs.VLLM_API_KEY]) if key]
        return cls(config, heads, presets,
                   AuthenticationMiddleware(None, tokens) if tokens else None, state, {})

    @property
    def base_name(self) -> str:
        """The name vLLM answers to first (its responses' `model`)."""
        return self.state.openai_serving_models.base_model_paths[0].name

    def unknown_model(self, model: Any) -> str | None:
        """The 404 message for a `model` that is no served name, LoRA adapter or preset."""
        models = self.state.openai_serving_models
        served = [m.name for m in models.base_model_paths]
        if (not isinstance(model, str) or not model or model in served or model in models.lora_requests
                or self.presets.get(model) or envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING):
            return None
        valid = [*served, *models.lora_requests, *self.presets.presets]
        return f"The model `{model}` does not exist. Valid models: {', '.join(valid)}."

    def authorized(self, scope: Scope) -> bool:
        from starlette.datastructures import Headers

        return self.auth is None or self.auth.verify_token(Headers(scope=scope))


class BodyTooLarge(Exception):
    pass


class VASMiddleware:
    def __init__(self, app):
        self.app = app
        self._server: _Server | None = None

    def server(self, scope: Scope) -> _Server | None:
        if self._server is None:
            state = scope["app"].state
            if not hasattr(state, "vllm_config"):  # the app is not initialised yet
                return None
            self._server = _Server.of(state)
        return self._server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = self.server(scope) if scope["type"] == "http" else None
        if server is None:
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        method = scope["method"]
        if method != "OPTIONS" and path.startswith(GUARDED_PREFIX) and not server.authorized(scope):
            # vLLM's own check, done first so that a wrong key is a 401 before any 400, and in
            # OpenAI's error shape (vLLM's AuthenticationMiddleware answers {"error": "Unauthorized"}).
            return await _send_error(send, 401, "Invalid or missing API key: send 'Authorization: Bearer <key>'",
                                     None, "AuthenticationError")
        if method == "POST" and (path in STEERABLE_PATHS or _is_json(scope)):
            return await self.post(server, path, scope, receive, send)
        if method == "GET" and (path == MODELS_PATH or path.startswith(MODELS_PATH + "/")):
            return await self.models(server, path[len(MODELS_PATH) + 1:] or None, scope, receive, send)
        if method == "GET" and path == METRICS_PATH:
            return await self.metrics(server, scope, receive, send)
        return await self.app(scope, receive, send)

    # -- POST bodies: limits and checks on every JSON route, steering on the generation routes ------

    async def post(self, server: _Server, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        limit = server.config.max_body_bytes
        try:
            body = await _read_body(receive, limit)
        except BodyTooLarge:
            return await _send_error(send, 413, f"request body larger than {limit} bytes", None,
                                     "RequestEntityTooLarge")
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            payload = None  # not JSON
        if path not in STEERABLE_PATHS and not body:
            return await self.app(scope, _replay(body, receive), send)  # an empty POST: vLLM's business
        try:
            check_request(path, payload, server.config.max_sequences_per_request)
        except RequestRejected as e:
            return await _send_error(send, e.status_code, e.args[0], e.parameter)
        if path not in STEERABLE_PATHS:
            steering = sorted(k for k in payload if k.startswith("vas_"))
            if steering:  # never a silently unsteered answer
                return await _send_error(send, 400, f"{path} does not take steering fields; "
                                                    f"{', '.join(STEERABLE_PATHS)} do", steering[0])
            return await self.app(scope, _replay(body, receive), send)
        report, preset_id = None, None
        if isinstance(payload, dict):
            missing = server.unknown_model(payload.get("model"))
            if missing:
                return await _send_error(send, 404, missing, "model", "NotFoundError")
            preset = server.presets.get(payload.get("model"))
            if preset is not None:  # run the base with the preset's settings, the request's on top
                preset_id = payload["model"]
                payload.update(override(preset, payload))
                payload["model"] = server.base_name
                server.preset_requests[preset_id] = server.preset_requests.get(preset_id, 0) + 1
                body = json.dumps(payload).encode()
            try:
                xargs = api_extra_args(payload)
                if xargs is not None:
                    for field in list(payload):
                        if field.startswith("vas_"):
                            del payload[field]
                    given = payload.get("vllm_xargs")
                    payload["vllm_xargs"] = {**given, **xargs} if isinstance(given, dict) else (given or xargs)
                    body = json.dumps(payload).encode()
                report = _report(payload, server)
            except VASParamError as e:
                # validate_params would refuse it too, but a streaming request would then get its
                # 400 inside a 200 event stream (vLLM validates streams lazily): refuse it here.
                return await _send_error(send, 400, e.args[0], e.parameter)
        reporting = path in REPORTING_PATHS and isinstance(payload, dict)
        if not reporting and preset_id is None:
            return await self.app(_with_length(scope, len(body)), _replay(body, receive), send)
        rename = (server.base_name, preset_id) if preset_id is not None else None
        await self.app(_with_length(scope, len(body)), _replay(body, receive),
                       _ReportingSend(send, report, reporting, rename))

    # -- /v1/models ---------------------------------------------------------------------------------

    async def models(self, server: _Server, model_id: str | None, scope: Scope, receive: Receive,
                     send: Send) -> None:
        list_scope = dict(scope, path=MODELS_PATH, raw_path=MODELS_PATH.encode())
        status, headers, body = await _capture(self.app, list_scope, receive)
        if status != 200:
            return await _send_raw(send, status, headers, body)
        listing = json.loads(body)
        cards = listing["data"]
        for card in cards:
            if card.get("root") and os.path.isabs(card["root"]):
                card["root"] = card["id"]  # a model's name, never the serving machine's path
        parent = cards[0]["id"] if cards else None
        created = cards[0]["created"] if cards else 0
        cards += [_preset_card(name, preset, server, parent, created)
                  for name, preset in sorted(server.presets.presets.items())]
        if model_id is None:
            return await _send_json(send, 200, listing)
        card = next((c for c in cards if c["id"] == model_id), None)
        if card is None:
            return await _send_error(send, 404, f"The model `{model_id}` does not exist.", "model",
                                     "NotFoundError")
        await _send_json(send, 200, card)

    # -- /metrics -----------------------------------------------------------------------------------

    async def metrics(self, server: _Server, scope: Scope, receive: Receive, send: Send) -> None:
        from vas_server.metrics import render_vas_metrics

        # vLLM's metrics app gzips when asked to; we append plain text, so ask for plain text.
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"accept-encoding"]
        status, out_headers, body = await _capture(self.app, dict(scope, headers=headers), receive)
        if status == 200 and server.config.value_models:  # else no processor, no worker extension
            body += await render_vas_metrics(server.state.engine_client, server.preset_requests)
        await _send_raw(send, status, out_headers, body)


def _report(payload: dict, server: _Server) -> dict | None:
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


def _preset_card(name: str, preset: Preset, server: _Server, parent: str | None, created: int) -> dict:
    """A preset's /v1/models card: a model whose parent is the base, with its settings (`vas_preset`,
    top_k as it will apply) and, for a head's own preset, the head's card (`vas_head`)."""
    from dataclasses import asdict

    request = VASRequest(dict(preset.weights), preset.top_k, preset.restrict_to_top_k)
    card = {
        "id": name, "object": "model", "created": created, "owned_by": "vas-server", "root": parent,
        "parent": parent, "max_model_len": None, "permission": [],
        "vas_preset": {**request.report(), "top_k": server.config.top_k_for(request, server.heads)},
    }
    if preset.head:
        head = server.heads[name]
        card["vas_head"] = {"value_model": head.value_model, "kind": head.spec.kind,
                            "description": head.spec.description, "trunk": asdict(head.trunk),
                            "runtime": head.runtime, "reward_mean": head.spec.reward_mean,
                            "reward_std": head.spec.reward_std,
                            "num_training_samples": head.spec.num_training_samples}
    return card


class _ReportingSend:
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
        await _send_raw(self.send, self.start["status"], self.start["headers"], body)

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


# -- ASGI plumbing -----------------------------------------------------------------------------------


async def _read_body(receive: Receive, limit: int) -> bytes:
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


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields `body` once, then the client's own messages (http.disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _is_json(scope: Scope) -> bool:
    content_type = dict(scope["headers"]).get(b"content-type", b"")
    return content_type.split(b";")[0].strip().lower() == b"application/json"


def _with_length(scope: Scope, length: int) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    return dict(scope, headers=[*headers, (b"content-length", str(length).encode())])


async def _capture(app, scope: Scope, receive: Receive) -> tuple[int, list, bytes]:
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


async def _send_raw(send: Send, status: int, headers: list, body: bytes) -> None:
    headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: int, payload: Any) -> None:
    await _send_raw(send, status, [(b"content-type", b"application/json")], json.dumps(payload).encode())


async def _send_error(send: Send, status: int, message: str, param: str | None,
                      err_type: str = "BadRequestError") -> None:
    """vLLM's own error body ({"error": {"message", "type", "param", "code"}})."""
    error = create_error_response(message, err_type=err_type, status_code=HTTPStatus(status), param=param)
    await _send_json(send, status, error.model_dump())
