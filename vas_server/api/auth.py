"""API-key check, as a FastAPI dependency on the /v1 routes.

Clients send `Authorization: Bearer <key>` (what the OpenAI clients do with `api_key=`). With no
key configured the server is open. /health and /metrics stay open so that probes and scrapers
need no secret.
"""

from __future__ import annotations

import secrets

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from vas_server.api.errors import APIError

_bearer = HTTPBearer(auto_error=False)


def require_api_key(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    expected: str | None = request.app.state.config.api_key
    if not expected:
        return
    if credentials is None:
        raise APIError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.", code="invalid_api_key")
    # Constant-time comparison: the key must not leak through response timing.
    if not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
