"""The name `vllm serve --middleware` takes; see vas_server.http.middleware."""
from vas_server.http.middleware import VASMiddleware

__all__ = ["VASMiddleware"]
