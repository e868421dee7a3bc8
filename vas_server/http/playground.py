"""GET /playground: the steering playground, a page served by the server itself.

Three static files shipped as package data (vas_server/demo/playground/: one HTML page, one
script, one stylesheet; no build step, nothing fetched from elsewhere). The page reads
/v1/models and calls /v1/chat/completions like any client, with the key the user types into it
(kept in the page's memory only), so it needs nothing of the server beyond the OpenAI routes and
vas_explain. Not under /v1, so no API key guards the page itself: it holds no data.
"""

from __future__ import annotations

from importlib import resources

from vas_server.http.asgi import Send, send_raw

PLAYGROUND_PATH = "/playground"
# URL path -> (file in the package's demo/playground, content type)
FILES = {
    PLAYGROUND_PATH: ("index.html", b"text/html; charset=utf-8"),
    PLAYGROUND_PATH + "/playground.js": ("playground.js", b"text/javascript; charset=utf-8"),
    PLAYGROUND_PATH + "/playground.css": ("playground.css", b"text/css; charset=utf-8"),
}


def is_playground(path: str) -> bool:
    return path in FILES or path == PLAYGROUND_PATH + "/"


async def serve_playground(path: str, send: Send) -> None:
    """One of the page's files (read from the package each time: they are small)."""
    name, content_type = FILES[path.rstrip("/")]
    body = resources.files("vas_server").joinpath("demo", "playground", name).read_bytes()
    await send_raw(send, 200, [(b"content-type", content_type), (b"cache-control", b"no-cache")], body)
