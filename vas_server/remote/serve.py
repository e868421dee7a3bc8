"""`vas-server serve --remote-base URL`: vLLM's own OpenAI server on an engine whose base model runs
elsewhere (vas_server.remote.engine_core). The local model directory gives the tokenizer, the chat
template and the config (and, for a `base_prefix` value model, its first layers); every value
model runs on the separate runtime, since no hidden state comes over HTTP.

vLLM's `AsyncLLM` is built as usual, except that its engine core is a RemoteEngineCore, and vLLM's
`build_and_serve` serves it: routes, chat templates, streaming, errors and the middleware are
those of `vas-server serve`.
"""

from __future__ import annotations

import dataclasses
import os
from argparse import Namespace

import torch
from vllm.logger import init_logger

from vas_server.config import REMOTE_KEY, VASConfig
from vas_server.engine_args import DEFAULT_VAS_REQUESTS
from vas_server.remote.capabilities import given_capabilities
from vas_server.remote.engine_core import RemoteEngineCore
from vas_server.remote.probe import PROBE_CONTEXT_TEXT, STOP_PROMPT, probe
from vas_server.remote.upstream import CompletionsUpstream, Upstream, check_tokenizer, wait_until_reachable

API_KEY_ENV = "VAS_REMOTE_API_KEY"  # the upstream's key, if it wants one
# How long startup waits for an upstream that does not answer yet (one started at the same time,
# still loading its model, as in README's example).
UPSTREAM_STARTUP_WAIT_S = 300
logger = init_logger("vllm.plugins.vas.remote")


def remote_async_llm(vllm_config, vas: VASConfig, upstream: Upstream, tokenizer, draft_cap: int = 1,
                     draft_adaptive: bool = True, logprob_cap: int | None = None):
    """vLLM's AsyncLLM for `vllm_config`, its engine core a RemoteEngineCore on `upstream`;
    `tokenizer` is MODEL's (its identity is checked against every value model's)."""
    from vllm.v1.engine import core_client
    from vllm.v1.engine.async_llm import AsyncLLM

    from vas_server.core.format import tokenizer_identity
    from vas_server.value_runtimes import separate_runtime

    runtime = separate_runtime(vas, vllm_config, tokenizer_identity(tokenizer), list(vas.value_models),
                               value_device(vas))
    logger.info("remote-base value cache: %.1f MiB now, growing with use to at most %.1f MiB (%d slots x %d tokens); "
                "drafting up to %d tokens per call%s", runtime.cache_bytes / 2**20, runtime.max_cache_bytes / 2**20,
                runtime.max_requests, runtime.max_len, draft_cap,
                "" if draft_adaptive or draft_cap == 1 else " (fixed)")
    core = RemoteEngineCore(upstream, runtime, vas, draft_cap, draft_adaptive, logprob_cap)
    # The one monkeypatch left: AsyncLLM.__init__ calls EngineCoreClient.make_async_mp_client
    # directly, and vLLM offers no way to hand it an engine-core client (no parameter, no
    # registry, no plugin hook for the client; its external-engine path still speaks ZMQ to an
    # EngineCore process). The patch lasts only the constructor's call and is always undone.
    make_client = core_client.EngineCoreClient.make_async_mp_client
    core_client.EngineCoreClient.make_async_mp_client = staticmethod(lambda *args, **kwargs: core)
    try:
        llm = AsyncLLM(vllm_config=vllm_config, executor_class=None, log_stats=False)
    finally:
        core_client.EngineCoreClient.make_async_mp_client = make_client
    core.fail = lambda request_id, error: fail_request(llm.output_processor, request_id, error)
    return llm


def stop_prompt(tokenizer) -> list[int] | None:
    """A short chat turn in MODEL's template, which the base ends with eos soon (ignore_eos's
    probe); None for a tokenizer without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    ids = tokenizer.apply_chat_template([{"role": "user", "content": STOP_PROMPT}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def value_device(vas: VASConfig) -> str:
    """Where remote mode runs the value models: the configured device, else the GPU if there is one."""
    return vas.device or ("cuda" if torch.cuda.is_available() else "cpu")


def fail_request(output_processor, request_id: str, error: Exception) -> None:
    """End one request of AsyncLLM with `error`: its generate() raises it (a GracefulHTTPError is
    answered with its own status), and the output processor forgets the request."""
    state = output_processor.request_states.get(request_id)
    if state is not None and state.queue is not None:
        state.queue.put(error)
    output_processor.abort_requests([request_id], internal=True)


async def serve_remote(args: Namespace, vas: VASConfig) -> None:
    """Serve `args` (vLLM's serve arguments, configured by vas_server.cli) on the remote base."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    upstream = CompletionsUpstream(args.remote_base, args.remote_model or (args.served_model_name or [args.model])[0],
                                   api_key=os.environ.get(API_KEY_ENV), timeout_s=args.remote_timeout,
                                   retries=args.remote_retries, tokenizer=tokenizer)
    try:
        await _serve(args, vas, upstream, tokenizer)
    finally:
        await upstream.aclose()  # on every path: startup refused, served and shut down


async def _serve(args: Namespace, vas: VASConfig, upstream: CompletionsUpstream, tokenizer) -> None:
    """serve_remote's body on an open `upstream` (the caller closes it); `tokenizer` is MODEL's."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.entry import build_and_serve
    from vllm.entrypoints.launchers.launcher import setup_server
    from vllm.usage.usage_lib import UsageContext

    vllm_config = AsyncEngineArgs.from_cli_args(args).create_engine_config(UsageContext.OPENAI_API_SERVER)
    try:
        given = given_capabilities(args.remote_capabilities, args.remote_logprob_cap)
        await wait_until_reachable(upstream, UPSTREAM_STARTUP_WAIT_S, logger.info)
        capabilities = await probe(upstream, tokenizer.encode(PROBE_CONTEXT_TEXT, add_special_tokens=False), given,
                                   stop_prompt(tokenizer), tokenizer.eos_token_id)
        if capabilities.tokenize and not args.remote_skip_tokenizer_check:
            await check_tokenizer(upstream, tokenizer)
    except ValueError as e:
        raise SystemExit(f"vas-server: {e}") from None
    logger.info("remote-base upstream %s: %s", upstream.base_url, capabilities.describe())
    if not capabilities.tokenize:
        logger.warning("the upstream at %s has no /tokenize: its tokenizer is taken to be MODEL's, unchecked; "
                       "tokens it names that MODEL's tokenizer does not have are counted in "
                       "vas_remote_token_mismatches", upstream.base_url)
    # The middleware reports what the upstream accepts (/v1/models) and the top-K served (ServerView.applied).
    vllm_config.additional_config[REMOTE_KEY] = capabilities.report()
    if args.remote_draft < 1:
        raise SystemExit("vas-server: --remote-draft must be at least 1")
    # Every value model is separate here, so the value cache's slots follow --max-vas-requests,
    # else --max-num-seqs if given, else DEFAULT_VAS_REQUESTS (32), as `vas-server serve --help`
    # says; vLLM's own default max_num_seqs (128 on a CPU) would let it grow to 4x that.
    vas = dataclasses.replace(vas, max_requests=vas.max_requests or args.max_num_seqs or DEFAULT_VAS_REQUESTS)
    draft = args.remote_draft if capabilities.draft else 1
    engine = remote_async_llm(vllm_config, vas, upstream, tokenizer, draft, not args.remote_draft_fixed,
                              capabilities.logprob_cap)
    listen_address, sock = setup_server(args, reuse_port=False)
    try:
        shutdown = await build_and_serve(engine, listen_address, sock, args)
        await shutdown
    finally:
        engine.shutdown()
        sock.close()
