"""API keys for vas-server's middleware: vLLM's own check, run first.

The keys are vLLM's (`--api-key`, or VLLM_API_KEY) and so is the check
(`AuthenticationMiddleware.verify_token`: a Bearer token compared in constant time, on the routes
under /v1). vLLM installs its AuthenticationMiddleware inside `--middleware` ones, so left to it
a request with a bad key and a bad body would get our 400 before its 401; and its 401 body is
`{"error": "Unauthorized"}`, not OpenAI's error shape. So the middleware asks the same check
first and answers in OpenAI's shape; vLLM's own middleware then passes what we passed.
"""

from __future__ import annotations

from vllm import envs
from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX, AuthenticationMiddleware

from vas_server.http.asgi import Scope, Send, send_error


class ApiKeys:
    """The server's API keys (none: every request passes)."""

    def __init__(self, state):
        keys = [key for key in (getattr(state.args, "api_key", None) or [envs.VLLM_API_KEY]) if key]
        self.check = AuthenticationMiddleware(None, keys) if keys else None

    def allows(self, scope: Scope, path: str) -> bool:
        from starlette.datastructures import Headers

        if self.check is None or scope["method"] == "OPTIONS" or not path.startswith(GUARDED_PREFIX):
            return True
        return self.check.verify_token(Headers(scope=scope))

    @staticmethod
    async def refuse(send: Send) -> None:
        await send_error(send, 401, "Invalid or missing API key: send 'Authorization: Bearer <key>'", None,
                         "AuthenticationError")
