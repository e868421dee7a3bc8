"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with a 4xx status.

Every way a request can be wrong ends here as an `APIError` (raised by our code) or as one of
FastAPI's own validation errors (malformed JSON, a field of the wrong type or out of range), which
the handlers below turn into the same shape, so a client never sees FastAPI's native
`{"detail": ...}` body or a 500 for bad input.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vas_server.api.schemas import ErrorDetail, ErrorResponse

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = INVALID_REQUEST):
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.detail).model_dump(), status_code=self.status)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# Pydantic appends the member type to the location of an error inside a union field
# (("body", "stop", "list[str]")); these are not parameter names.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def param_path(loc: Sequence[Any]) -> str | None:
    """FastAPI's error location ("body", "messages", 0, "content") as `messages[0].content`."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_TAGS or not str(part).isidentifier():
            break
        else:
            out += f".{part}" if out else str(part)
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"type": "unknown", "msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code=None)
    param = param_path(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param, code="unknown_parameter")
    if first.get("type") == "missing":
        what = f"parameter: {param}" if param else "request body"
        return bad_request(f"Missing required {what}", param, code="missing_required_parameter")
    return bad_request(f"Invalid value for {param or 'the request body'}: {first['msg']}", param)


def install_error_handlers(app: FastAPI, record: Callable[[Request, int], None]) -> None:
    """`record(request, status)` is told about every error response (for metrics)."""

    def respond(request: Request, error: APIError) -> JSONResponse:
        record(request, error.status)
        return error.response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes (404) and wrong methods (405) keep their status, in our shape.
        return respond(request, APIError(exc.status_code, str(exc.detail), code=None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error while serving %s", request.url.path)
        return respond(request, APIError(500, f"Internal server error: {type(exc).__name__}",
                                         type="server_error", code=None))
