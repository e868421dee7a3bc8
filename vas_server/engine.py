"""Build vLLM engine arguments with the VAS processor wired in. Both the server and the tests
use this, so the environment and flags that VAS needs are set in exactly one place.

Why each setting:
  * VLLM_USE_V2_MODEL_RUNNER=0: vLLM 0.32 GPU builds default to the V2 model runner, which
    rejects V1-interface logits processors such as ours.
  * async_scheduling=False: with async scheduling the output-token lists the processor reads may
    hold placeholders for tokens not yet sampled; VAS must see committed tokens only.
  * VLLM_CPU_OMP_THREADS_BIND=nobind on small CPU machines, or the worker gets one thread.
  * enforce_eager on CPU: starts in seconds instead of compiling.
  * enable_chunked_prefill=False on CPU: vLLM 0.32's CPU build kills the engine
    ("CPU Generator does not use offset") when a seeded request's prefill is split over steps;
    it rewinds the request's generator with a CUDA-only call. VAS itself is correct under chunked
    prefill (tests/test_chunked_prefill.py runs it with greedy requests, which have no generator).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from vas_server.config import VASConfig

# Value-cache capacity when neither VASConfig.max_requests nor max_num_seqs is given. vLLM's own
# default concurrency (256+) would preallocate gigabytes of value cache at long context lengths.
DEFAULT_VAS_REQUESTS = 32
PROCESSOR_FQCN = "vas_server.processor:VASLogitsProcessor"
WORKER_EXTENSION = "vas_server.processor.VASWorkerExtension"  # adds `collective_rpc("vas_stats")`


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def prepare_environment() -> None:
    """Environment variables vLLM reads at engine start (inherited by its worker processes)."""
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    if not on_gpu():
        if (os.cpu_count() or 1) <= 8:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def engine_kwargs(model: str, vas: VASConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` or `vllm.AsyncEngineArgs(...)`.

    With `vas=None` the engine is plain vLLM (used as the baseline in tests and benchmarks).
    `overrides` are any other vLLM engine arguments and win over our defaults.
    """
    prepare_environment()
    kwargs: dict[str, Any] = {"model": model, "async_scheduling": False}
    if not on_gpu():
        kwargs["enforce_eager"] = True
        kwargs["enable_chunked_prefill"] = False
    if vas is not None:
        heads = vas.heads()  # fails fast, here, on a bad value-model directory or a name clash
        # The value cache holds max_requests requests. Capping the scheduler's concurrency at the
        # same number makes further requests wait in vLLM's queue instead of overflowing it.
        capacity = vas.max_requests or overrides.get("max_num_seqs") or DEFAULT_VAS_REQUESTS
        vas = dataclasses.replace(vas, max_requests=capacity)
        overrides["max_num_seqs"] = min(overrides.get("max_num_seqs") or capacity, capacity)
        kwargs["logits_processors"] = [PROCESSOR_FQCN]
        kwargs["worker_extension_cls"] = WORKER_EXTENSION
        additional = dict(overrides.pop("additional_config", None) or {})
        additional.update(vas.to_additional_config())
        kwargs["additional_config"] = additional
        from vas_server.processor import VASLogitsProcessor

        VASLogitsProcessor.register_heads(heads)
    kwargs.update(overrides)
    return kwargs


