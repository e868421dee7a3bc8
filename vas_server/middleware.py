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

One module per concern: vas_server.asgi (plumbing), .server_view (what it knows of the server),
.request_guard (the body checks), .steering_fields (request rewrite and answer echo),
.model_cards (/v1/models), .metrics (/metrics). Auth is vLLM's own token check
(`AuthenticationMiddleware.verify_token`, the `--api-key` and `VLLM_API_KEY` it reads), run here
first so that a request with a bad key is a 401 in OpenAI's error shape before any body check.

vLLM internals it relies on (vllm 0.32.0): `app.state.vllm_config`, `app.state.args`
(`api_key`), `app.state.engine_client.collective_rpc`, `app.state.openai_serving_models` (served
names, LoRA adapters), the JSON / SSE shapes of vLLM's answers
and `create_error_response` for vLLM's error body. Starlette puts the app in `scope["app"]`.
"""

from __future__ import annotations

import json

from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX

from vas_server.asgi import (BodyTooLarge, Receive, Scope, Send, capture, is_json, read_body, replay, send_error,
                             send_raw, with_length)
from vas_server.model_cards import MODELS_PATH, list_models
from vas_server.params import VASParamError
from vas_server.request_guard import RequestRejected, check_request
from vas_server.server_view import ServerView
from vas_server.steering_fields import AnswerRewrite, steer_request

# /invocations is SageMaker's route: vLLM answers it with the chat or completions handler.
STEERABLE_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/invocations")
REPORTING_PATHS = ("/v1/completions", "/v1/chat/completions", "/invocations")  # answers that gain `vas`
METRICS_PATH = "/metrics"


class VASMiddleware:
    def __init__(self, app):
        self.app = app
        self._server: ServerView | None = None

    def server(self, scope: Scope) -> ServerView | None:
        if self._server is None:
            state = scope["app"].state
            if not hasattr(state, "vllm_config"):  # the app is not initialised yet
                return None
            self._server = ServerView.of(state)
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
            return await send_error(send, 401, "Invalid or missing API key: send 'Authorization: Bearer <key>'",
                                    None, "AuthenticationError")
        if method == "POST" and (path in STEERABLE_PATHS or is_json(scope)):
            return await self.post(server, path, scope, receive, send)
        if method == "GET" and (path == MODELS_PATH or path.startswith(MODELS_PATH + "/")):
            return await list_models(self.app, server, path[len(MODELS_PATH) + 1:] or None, scope, receive, send)
        if method == "GET" and path == METRICS_PATH:
            return await self.metrics(server, scope, receive, send)
        return await self.app(scope, receive, send)

    async def post(self, server: ServerView, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        """Every JSON POST: the size limit and request_guard's checks; on the generation routes,
        the steering fields (vas_server.steering_fields)."""
        limit = server.config.max_body_bytes
        try:
            body = await read_body(receive, limit)
        except BodyTooLarge:
            return await send_error(send, 413, f"request body larger than {limit} bytes", None,
                                    "RequestEntityTooLarge")
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            payload = None  # not JSON
        if path not in STEERABLE_PATHS and not body:
            return await self.app(scope, replay(body, receive), send)  # an empty POST: vLLM's business
        try:
            check_request(path, payload, server.config.max_sequences_per_request)
        except RequestRejected as e:
            return await send_error(send, e.status_code, e.args[0], e.parameter)
        if path not in STEERABLE_PATHS:
            steering = sorted(k for k in payload if k.startswith("vas_"))
            if steering:  # never a silently unsteered answer
                return await send_error(send, 400, f"{path} does not take steering fields; "
                                                   f"{', '.join(STEERABLE_PATHS)} do", steering[0])
            return await self.app(scope, replay(body, receive), send)
        if not isinstance(payload, dict):  # vLLM answers it (a 400)
            return await self.app(scope, replay(body, receive), send)
        missing = server.unknown_model(payload.get("model"))
        if missing:
            return await send_error(send, 404, missing, "model", "NotFoundError")
        try:
            steered = steer_request(server, payload, body)
        except VASParamError as e:
            # validate_params would refuse it too, but a streaming request would then get its 400
            # inside a 200 event stream (vLLM validates streams lazily): refuse it here.
            return await send_error(send, 400, e.args[0], e.parameter)
        reporting = path in REPORTING_PATHS
        scope, receive = with_length(scope, len(steered.body)), replay(steered.body, receive)
        if not reporting and steered.preset is None:
            return await self.app(scope, receive, send)
        rename = (server.base_name, steered.preset) if steered.preset is not None else None
        await self.app(scope, receive, AnswerRewrite(send, steered.report, reporting, rename))

    async def metrics(self, server: ServerView, scope: Scope, receive: Receive, send: Send) -> None:
        from vas_server.metrics import render_vas_metrics

        # vLLM's metrics app gzips when asked to; we append plain text, so ask for plain text.
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"accept-encoding"]
        status, out_headers, body = await capture(self.app, dict(scope, headers=headers), receive)
        if status == 200 and server.config.value_models:  # else no processor, no worker extension
            body += await render_vas_metrics(server.state.engine_client, server.preset_requests)
        await send_raw(send, status, out_headers, body)
