"""A latency-injecting HTTP proxy: every request waits --latency-ms, then goes to --target as is.

It stands for the network between remote mode and a remote upstream: the wait costs no CPU (an
asyncio sleep), the body is passed through unparsed. POSTs to /v1/completions are counted; GET
/proxy/calls answers the count (benchmarks/remote_latency.py reads it for calls per token).

    python benchmarks/latency_proxy.py --target http://127.0.0.1:8301 --port 8305 [--latency-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


def app(target: str, latency_s: float) -> web.Application:
    state = {"calls": 0}
    application = web.Application(client_max_size=64 * 2**20)

    async def session_context(application):
        application["session"] = ClientSession(connector=TCPConnector(limit=0), timeout=ClientTimeout(total=600))
        yield
        await application["session"].close()

    async def calls(request: web.Request) -> web.Response:
        return web.json_response({"calls": state["calls"]})

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        if request.method == "POST" and request.path == "/v1/completions":
            state["calls"] += 1
        await asyncio.sleep(latency_s)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with application["session"].request(request.method, target + request.path_qs, data=body,
                                                  headers=headers) as answer:
            payload = await answer.read()
            return web.Response(body=payload, status=answer.status,
                                headers={"content-type": answer.headers.get("content-type", "application/json")})

    application.cleanup_ctx.append(session_context)
    application.router.add_get("/proxy/calls", calls)
    application.router.add_route("*", "/{tail:.*}", forward)
    return application


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    args = ap.parse_args()
    web.run_app(app(args.target.rstrip("/"), args.latency_ms / 1e3), host="127.0.0.1", port=args.port,
                access_log=None, print=None, backlog=1024, shutdown_timeout=1)


if __name__ == "__main__":
    main()
