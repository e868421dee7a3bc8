"""`vas-server serve`: start the OpenAI-compatible VAS server.

    vas-server serve                                   # embedded SmolLM2 base + demo value models
    vas-server serve --model PATH --value-model NAME=PATH [--value-model ...]
    vas-server serve --engine-arg max_num_seqs=64 --engine-arg dtype=float32

When the server accepts connections it prints its URL and a ready-to-paste curl line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

API_KEY_ENV = "VAS_SERVER_API_KEY"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
# Seconds uvicorn waits for open requests on shutdown before cancelling (and so aborting) them.
GRACEFUL_SHUTDOWN_S = 30


def demo_value_models() -> dict[str, str]:
    """The shipped demo value models (for the embedded base): every directory with a vas.json
    under value_models/demo/, by directory name. Empty until they are trained and shipped."""
    import value_models

    demo = Path(value_models.__file__).parent / "demo"
    if not demo.is_dir():
        return {}
    return {d.name: str(d) for d in sorted(demo.iterdir()) if (d / "vas.json").is_file()}


def _name_equals_value(text: str, option: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{option} expects NAME=VALUE, got {text!r}")
    return name.strip(), value


def parse_value_model(text: str) -> tuple[str, str]:
    return _name_equals_value(text, "--value-model")


def parse_engine_arg(text: str) -> tuple[str, Any]:
    key, raw = _name_equals_value(text, "--engine-arg")
    try:
        value = json.loads(raw)  # numbers, booleans, lists, objects
    except ValueError:
        value = raw  # anything else is a string
    return key.replace("-", "_"), value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vas-server", description="Value Augmented Sampling server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the OpenAI-compatible server",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("--model", default=None,
                       help="base model: a Hugging Face directory or name (default: the embedded "
                            f"{EMBEDDED_MODEL_NAME}, converted on first use)")
    serve.add_argument("--served-model-name", default=None,
                       help="the `model` clients send (default: the --model argument, or "
                            f"{EMBEDDED_MODEL_NAME} for the embedded base)")
    serve.add_argument("--value-model", action="append", type=parse_value_model, default=None,
                       metavar="NAME=PATH",
                       help="a value-model checkpoint directory; repeatable (default: the shipped demo value "
                            "models, when serving the embedded base)")
    serve.add_argument("--no-value-models", action="store_true", help="serve without any value model")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all)")
    serve.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    serve.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                       help=f"require this bearer token on /v1 routes (default: ${API_KEY_ENV}, else none)")
    serve.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    serve.add_argument("--default-top-k", type=int, default=None,
                       help="VAS candidates per step when a request sets no vas_top_k (default: 20)")
    serve.add_argument("--max-vas-requests", type=int, default=None,
                       help="requests that can hold a value cache at once; also caps the engine's concurrency "
                            "(default: max_num_seqs if given, else 32)")
    serve.add_argument("--engine-arg", action="append", type=parse_engine_arg, default=[], metavar="KEY=VALUE",
                       help="any other vLLM engine argument (AsyncEngineArgs field), e.g. max_num_seqs=64; "
                            "VALUE is read as JSON when it parses, else as a string; repeatable")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    overrides = dict(args.engine_arg)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SystemExit(f"vas-server: unknown vLLM engine argument(s): {', '.join(unknown)}")
    if args.max_model_len is not None:
        overrides["max_model_len"] = args.max_model_len
    return overrides


def server_config(args: argparse.Namespace):
    from vas_server.api import ServerConfig
    from vas_server.config import VASConfig

    if args.model is None:
        from vas_server.base_model import ensure_base_model

        model, default_name = str(ensure_base_model()), EMBEDDED_MODEL_NAME
        value_models = demo_value_models()
    else:
        model, default_name = args.model, args.model
        value_models = {}  # the demo value models only fit the embedded base's tokenizer
    if args.value_model:
        value_models = dict(args.value_model)
    if args.no_value_models:
        value_models = {}
    vas = None
    if value_models:
        options = {} if args.default_top_k is None else {"default_top_k": args.default_top_k}
        if args.max_vas_requests is not None:
            options["max_requests"] = args.max_vas_requests
        try:
            vas = VASConfig(value_models=value_models, **options)
            vas.heads()  # a bad directory fails here, with its message, before anything starts
        except (ValueError, OSError) as e:
            raise SystemExit(f"vas-server: {e}") from None
    return ServerConfig(model=model, served_model_name=args.served_model_name or default_name, vas=vas,
                        engine_overrides=engine_overrides(args), api_key=args.api_key or None)


def ready_message(config, url: str) -> str:
    """The lines printed once the server accepts connections."""
    body: dict[str, Any] = {"model": config.served_model_name, "prompt": "Hello, my name is", "max_tokens": 32}
    heads = sorted(config.heads())
    if heads:
        body["vas_weights"] = {heads[0]: 2.0}
    auth = f" -H \"Authorization: Bearer ${API_KEY_ENV}\"" if config.api_key else ""
    return (f"vas-server ready at {url}/v1 (model {config.served_model_name!r}, "
            f"value heads: {', '.join(heads) or 'none'})\n"
            f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
            f"-d {shlex.quote(json.dumps(body))}")


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from vas_server.api import create_app

    config = server_config(args)

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.should_exit or not self.servers:
                return
            port = self.servers[0].sockets[0].getsockname()[1]  # the real port, also for --port 0
            host = "localhost" if args.host in ("0.0.0.0", "::") else args.host
            print(ready_message(config, f"http://{host}:{port}"), flush=True)

    uv_config = uvicorn.Config(create_app(config), host=args.host, port=args.port, log_level=args.log_level,
                               timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    AnnouncingServer(uv_config).run()


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        serve(args)


if __name__ == "__main__":
    main(sys.argv[1:])
