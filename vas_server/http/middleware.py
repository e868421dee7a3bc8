"""The HTTP side of VAS: one ASGI middleware on vLLM's own OpenAI server.

Installed with vLLM's `--middleware vas_server.middleware.VASMiddleware` (`vas-server serve` adds
it). It reads the VAS configuration from the engine's `additional_config["vas"]`
(`app.state.vllm_config`, set by vLLM before the server accepts requests), so a plain
`vllm serve ... --additional-config ... --middleware ...` gets the same behaviour.

What it adds to vLLM's routes, and nothing else:
  * POST /v1/completions, /v1/chat/completions, /v1/responses, /invocations: the top-level
    `vas_weights`, `vas_top_k`, `vas_restrict_to_top_k` are validated (a 400 naming the field,
    also for a misspelt `vas_*` field) and move, as the settings vLLM applies, into the body's
    `vllm_xargs` (vas_server.http.steering_fields). Chat and completions answers (JSON, or the SSE
    chunks that finish a choice) gain `"vas"`: the settings applied, or null when unsteered.
  * Presets (vas_server.presets): a request whose `model` is a preset runs the base with the
    preset's settings (request `vas_*` fields override them field by field), and its answer (JSON,
    or every SSE chunk) names the preset as `model`. An unknown `model` is a 404 listing every id.
  * GET /v1/models: one card per preset (every head is one) after vLLM's own cards, `parent` the
    base; `GET /v1/models/{id}` (which vLLM lacks) answers one card from the same list. Machine
    paths in `root` become model names.
  * GET /playground: the steering playground page (vas_server.http.playground).
  * A request may ask for `vas_explain` (vas_server.params.Explain): the answer then carries, per
    token, the steered candidates with base and steered probabilities and each head's
    contribution, read from the worker when the answer is done (vas_server.http.explain).
  * GET /metrics: the VAS counters (vas_server.http.metrics) after vLLM's own metrics, and requests per
    preset (`vas_preset_requests_total{preset=...}`).
  * Every JSON POST body (any route: also /tokenize, /v1/messages, /invocations, ...) is read with
    a size limit (VASConfig.max_body_bytes, 413 past it) and checked by request_guard before
    vLLM parses it.
  * With an API key, a request without it is refused here, first, in OpenAI's error shape.

It only dispatches; one module per concern does the work: vas_server.http.auth (API keys: vLLM's own
check, run first), .request_guard (the body guard), .steering_fields (request rewrite and answer
echo), .model_cards (/v1/models), .metrics (/metrics), .playground (the page), .explain (vas_explain); .asgi is the plumbing and .server_view
what it knows of the server.

vLLM internals it relies on (vllm 0.32.0): `app.state.vllm_config`, `app.state.args`
(`api_key`), `app.state.engine_client.collective_rpc`, `app.state.openai_serving_models` (served
names, LoRA adapters), the JSON / SSE shapes of vLLM's answers
and `create_error_response` for vLLM's error body. Starlette puts the app in `scope["app"]`.
"""

from __future__ import annotations

from vas_server.http.asgi import Receive, Scope, Send, is_json, replay
from vas_server.http.metrics import serve_metrics
from vas_server.http.model_cards import MODELS_PATH, list_models
from vas_server.http.playground import is_playground, serve_playground
from vas_server.http.request_guard import guard_body
from vas_server.http.server_view import ServerView
from vas_server.http.steering_fields import STEERABLE_PATHS, serve_generation

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
        if not server.api_keys.allows(scope, path):  # first: a wrong key is a 401 before any 400
            return await server.api_keys.refuse(send)
        if method == "POST" and (path in STEERABLE_PATHS or is_json(scope)):
            config = server.config
            guarded = await guard_body(path, STEERABLE_PATHS, config.max_body_bytes,
                                       config.max_sequences_per_request, receive, send)
            if guarded is None:  # refused
                return
            body, payload = guarded
            if path not in STEERABLE_PATHS:
                return await self.app(scope, replay(body, receive), send)
            return await serve_generation(self.app, server, path, payload, body, scope, receive, send)
        if method == "GET" and (path == MODELS_PATH or path.startswith(MODELS_PATH + "/")):
            return await list_models(self.app, server, path[len(MODELS_PATH) + 1:] or None, scope, receive, send)
        if method == "GET" and path == METRICS_PATH:
            return await serve_metrics(self.app, server, scope, receive, send)
        if method == "GET" and is_playground(path):
            return await serve_playground(path, send)
        return await self.app(scope, receive, send)
