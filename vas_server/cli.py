"""`vas-server serve`: vLLM's own OpenAI server (`vllm serve`) with VAS wired in.

    vas-server serve                                   # embedded SmolLM2 base + demo value models
    vas-server serve MODEL --value-model NAME=PATH [--value-model ...] [any `vllm serve` flag]

Every `vllm serve` flag is accepted and means what it means there. Ours add the value models and
set, through vLLM's own extension points, what VAS needs (vas_server.engine_args.engine_settings): the
logits processor and its `additional_config`, the worker extension, the middleware that maps the
`vas_*` request fields (vas_server.http.middleware), and engine defaults (eager mode on CPU, ...) that
a flag given by the user overrides. Then vLLM's `serve` command runs, in its usual process layout.
When the server answers, it prints its URL and a ready-to-paste curl line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
import threading
import time
import urllib.request
from importlib.resources import files
from typing import Any, Sequence

from vas_server.presets import DEFAULT_HEAD_WEIGHT

API_KEY_ENV = "VAS_SERVER_API_KEY"  # also honoured, as vLLM's own VLLM_API_KEY is
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
MIDDLEWARE = "vas_server.middleware.VASMiddleware"
READY_TIMEOUT_S = 900


def demo_value_models() -> dict[str, str]:
    """The shipped demo value models (for the embedded base): every directory with a vas.json
    under the package's demo/ data, by directory name."""
    demo = files("vas_server").joinpath("demo")
    if not demo.is_dir():
        return {}
    return {d.name: str(d) for d in sorted(demo.iterdir(), key=lambda d: d.name) if d.joinpath("vas.json").is_file()}


def parse_value_model(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path:
        raise argparse.ArgumentTypeError(f"--value-model expects NAME=PATH, got {text!r}")
    return name.strip(), path


def parse_preset(text: str):
    from vas_server.presets import parse

    try:
        return parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def demo_presets() -> list[tuple[str, Any]]:
    """The shipped presets for the demo heads (vas_server/demo/presets.yaml, a --config file)."""
    import yaml

    path = files("vas_server").joinpath("demo", "presets.yaml")
    if not path.is_file():
        return []
    return [parse_preset(text) for text in yaml.safe_load(path.read_text()).get("preset", [])]


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(the whole parser, its `serve` subparser): vLLM's serve flags plus the VAS group."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vas-server", description="Value Augmented Sampling on vLLM's OpenAI server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = make_arg_parser(commands.add_parser(
        "serve", usage="vas-server serve [model_tag] [options]",
        help="start vLLM's OpenAI-compatible server with VAS (every `vllm serve` flag works)",
        description=f"vLLM's OpenAI server with VAS. Without a model: the embedded {EMBEDDED_MODEL_NAME} "
                    "with the demo value heads."))
    vas = serve.add_argument_group("VAS", "value models and steering defaults (vas-server's own flags)")
    vas.add_argument("--value-model", action="extend", nargs="+", type=parse_value_model, default=None,
                     metavar="NAME=PATH",
                     help="a value-model checkpoint directory; repeatable (default: the shipped demo value "
                          "models, when serving the embedded base)")
    vas.add_argument("--preset", action="extend", nargs="+", type=parse_preset, default=None,
                     metavar="NAME=HEAD:W[,HEAD:W...][@K=N][@restrict]",
                     help="a steering preset served as a model named NAME; repeatable (default: the demo "
                          "presets, vas_server/demo/presets.yaml, when serving the embedded base). Every "
                          f"head is also a preset under its own name, at weight {DEFAULT_HEAD_WEIGHT:g}")
    vas.add_argument("--no-value-models", action="store_true", help="serve without any value model")
    vas.add_argument("--default-top-k", type=int, default=None,
                     help="VAS candidates per step when a request sets no vas_top_k (default: each value "
                          "model's own default_top_k from its vas.json, else 20)")
    vas.add_argument("--max-vas-requests", type=int, default=None,
                     help="requests that can hold a value cache at once; also caps the engine's concurrency "
                          "(default: --max-num-seqs if given, else 32)")
    vas.add_argument("--max-body-bytes", type=int, default=None,
                     help="largest accepted HTTP request body; larger ones get a 413 (default: 8 MiB)")
    vas.add_argument("--max-sequences-per-request", type=int, default=None,
                     help="most sequences one request may queue (prompts x n); more get a 422 (default: 128)")
    remote = serve.add_argument_group("VAS over a remote base", "the base runs behind an OpenAI-compatible "
                                      "/v1/completions with token log-probs (vLLM, SGLang, llama.cpp's server, "
                                      "OpenAI-style hosted APIs); MODEL is a local copy of its tokenizer and config")
    remote.add_argument("--remote-base", default=None, metavar="URL",
                        help="the upstream's /v1 URL, e.g. http://host:8000/v1 (its key, if any, in "
                             "$VAS_REMOTE_API_KEY). What it accepts is probed at startup and logged in one line: "
                             "token-id prompts, token ids in answers, its log-prob cap (a request's VAS top-K "
                             "above it is served at it), ignore_eos, drafting, /tokenize")
    remote.add_argument("--remote-model", default=None, help="the model name the upstream serves (default: "
                                                             "--served-model-name, else MODEL)")
    remote.add_argument("--remote-timeout", type=float, default=30.0,
                        help="seconds one upstream call may take before it is retried or the request fails "
                             "(default: 30)")
    remote.add_argument("--remote-retries", type=int, default=2,
                        help="more tries of an upstream call that failed in a way another try may cure: "
                             "unreachable, timed out, 429 or 5xx (default: 2; backoff 0.25 s, doubled)")
    remote.add_argument("--remote-draft", type=int, default=8, metavar="N",
                        help="the most tokens one upstream call drafts, VAS verifying them exactly (at "
                             "temperature 0 and 1; other temperatures take one token per call). The length "
                             "adapts to each request's acceptance, up to N. 1: one token per call, no drafting "
                             "(default: 8)")
    remote.add_argument("--remote-draft-fixed", action="store_true",
                        help="draft N tokens every call instead of adapting the length to the acceptance")
    remote.add_argument("--remote-logprob-cap", type=int, default=None, metavar="N",
                        help="the most top log-probs the upstream returns per position (default: probed at "
                             "startup with one-token calls); a request's VAS top-K above it is served at it")
    remote.add_argument("--remote-capabilities", default=None, metavar="JSON",
                        help="what the upstream accepts, instead of probing it, as a JSON object with any of: "
                             "token_prompts, token_ids, ignore_eos, draft, tokenize (true/false) and logprob_cap "
                             "(an integer), e.g. '{\"token_prompts\": false, \"logprob_cap\": 20}'; the "
                             "others are probed")
    remote.add_argument("--remote-skip-tokenizer-check", action="store_true",
                        help="skip checking the upstream's /tokenize against MODEL's tokenizer (an upstream "
                             "without /tokenize is served unchecked anyway, with a warning); a different "
                             "tokenizer gives garbage")
    return parser, serve


def explicit_args(argv: Sequence[str]) -> dict[str, Any]:
    """The serve arguments the user gave on the command line (or in a --config file), whatever
    their values: `--no-enforce-eager` is given even though it equals vLLM's default, and must
    win over vas-server's CPU default."""
    _, serve_parser = build_parser()
    for action in serve_parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return vars(serve_parser.parse_args(list(argv)))


def configure(args: argparse.Namespace, defaults: argparse.Namespace, given: dict[str, Any] | None = None):
    """Fill in the base model, the value models and every setting VAS needs, in place; returns
    the VASConfig. A flag the user gave (`given`, from explicit_args) wins over our defaults
    (see vas_server.engine_args.engine_settings)."""
    from vas_server.config import VASConfig
    from vas_server.engine_args import engine_settings, prepare_environment

    if args.model_tag is not None:  # `serve MODEL` as with `vllm serve MODEL`
        args.model, args.model_tag = args.model_tag, None
    embedded = args.model == defaults.model
    if embedded:
        from vas_server.core.base_model import ensure_base_model

        args.model = str(ensure_base_model())
        args.served_model_name = args.served_model_name or [EMBEDDED_MODEL_NAME]
    if not args.api_key and os.environ.get(API_KEY_ENV):
        args.api_key = [os.environ[API_KEY_ENV]]
    # The demo value models only fit the embedded base's tokenizer.
    value_models = dict(args.value_model) if args.value_model else (demo_value_models() if embedded else {})
    names = [name for name, _ in args.preset or []]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise SystemExit(f"vas-server: preset {twice[0]!r} is given twice")
    presets = dict(args.preset) if args.preset else (dict(demo_presets()) if embedded and not args.value_model else {})
    if args.no_value_models:
        value_models, presets = {}, {}
    options = {key: value for key, value in (("default_top_k", args.default_top_k),
                                             ("max_requests", args.max_vas_requests),
                                             ("max_body_bytes", args.max_body_bytes),
                                             ("max_sequences_per_request", args.max_sequences_per_request))
               if value is not None}
    if given is None:  # called from Python: whatever differs from the defaults counts as given
        given = {key: value for key, value in vars(args).items() if value != getattr(defaults, key, None)}
    else:
        given = {key: getattr(args, key) for key in given}  # as resolved above (model, api key)
    try:
        vas = VASConfig(value_models=value_models, presets={n: p.to_json() for n, p in presets.items()}, **options)
        settings = engine_settings(vas, given)  # reads every vas.json: a bad directory fails here
        vas.preset_table(vas.read_heads(), args.served_model_name or [args.model])  # a bad preset fails here
    except (ValueError, OSError) as e:
        raise SystemExit(f"vas-server: {e}") from None
    for key, value in settings.items():
        setattr(args, key, value)
    args.middleware = [*args.middleware, MIDDLEWARE]
    prepare_environment()
    return vas


def ready_message(args: argparse.Namespace, head_names: Sequence[str], url: str, presets: Sequence[str] = ()) -> str:
    """The lines printed once the server answers."""
    name = (args.served_model_name or [args.model])[0]
    body: dict[str, Any] = {"model": name, "prompt": "Hello, my name is", "max_tokens": 32}
    if head_names:
        body["vas_weights"] = {sorted(head_names)[0]: 2.0}
    auth = f" -H \"Authorization: Bearer ${API_KEY_ENV}\"" if args.api_key else ""
    named = f"; presets: {', '.join(presets)}" if presets else ""
    listed = ", ".join(sorted(head_names)) or "none"
    return (f"vas-server ready at {url}/v1 (model {name!r}, value heads: {listed}{named})\n"
            f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
            f"-d {shlex.quote(json.dumps(body))}\n"
            f"  playground: {url}/playground")


def announce_when_ready(args: argparse.Namespace, head_names: Sequence[str], presets: Sequence[str] = ()) -> None:
    """Print the ready lines from a thread once GET /health answers 200 (vLLM serves in this
    process's event loop, which this thread must not block)."""
    host = "localhost" if args.host in (None, "", "0.0.0.0", "::") else args.host
    url = f"http://{host}:{args.port}"

    def poll() -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        print(ready_message(args, head_names, url, presets), flush=True)
                        return
            except OSError:
                pass
            time.sleep(0.5)

    threading.Thread(target=poll, name="vas-ready", daemon=True).start()


def serve(args: argparse.Namespace, defaults: argparse.Namespace, given: dict[str, Any] | None = None) -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    vas = configure(args, defaults, given)
    if args.port == 0:  # the ready line needs the real port: pick a free one now
        with socket.socket() as s:
            s.bind((args.host or "", 0))
            args.port = s.getsockname()[1]
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    announce_when_ready(args, list(vas.read_heads()), list(vas.presets))
    if args.remote_base:
        import uvloop

        from vas_server.remote.serve import serve_remote

        uvloop.run(serve_remote(args, vas))
        return
    ServeSubcommand.cmd(args)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, serve_parser = build_parser()
    if argv[:1] == ["serve"] and _config_without_model(argv):
        # vLLM's --config handling insists on a model; ours defaults to the embedded base.
        argv.insert(1, serve_parser.get_default("model"))
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args, serve_parser.parse_args([]), explicit_args(argv[1:]))  # argv[0] is "serve"


def _config_without_model(argv: list[str]) -> bool:
    """`serve --config FILE` with no model on the command line or in FILE."""
    import yaml

    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return False
    if len(argv) > 1 and not argv[1].startswith("-"):
        return False  # serve MODEL ...
    try:
        with open(argv[argv.index("--config") + 1]) as f:
            config = yaml.safe_load(f) or {}
    except OSError:
        return False  # vLLM reports the missing file
    return isinstance(config, dict) and "model" not in config


if __name__ == "__main__":
    main(sys.argv[1:])
