"""The OpenAI-compatible HTTP API of vas-server (FastAPI, vLLM's AsyncLLM in-process)."""

from vas_server.api.app import create_app
from vas_server.api.state import ServerConfig

__all__ = ["create_app", "ServerConfig"]
