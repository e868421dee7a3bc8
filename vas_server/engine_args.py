"""Build vLLM engine arguments with the VAS processor wired in. Both the server and the tests
use this, so the environment and flags that VAS needs are set in exactly one place.

VAS runs on vLLM's default execution path: either model runner (vas_server.engine.processor picks the
processor interface), async scheduling, torch.compile and CUDA graphs (the hidden-state tap lives
inside the model's forward: vas_server.engine.hidden_states). What it sets, each only when the user did
not set it (docs/SERVER.md, "What vas-server changes in vLLM's engine"):
  * the processor, its `additional_config` and the worker extension (`vas_stats`);
  * max_num_seqs capped at the value-cache capacity when a value model runs on the separate
    runtime: extra requests wait in vLLM's queue instead of overflowing the preallocated cache;
  * on CPUs only:
    - enforce_eager: a server ready in 29 s instead of 82 s with a warm compile cache, plus ~50 s
      for the first inductor compile of a configuration (2-core AMX host, docs/BENCHMARKS.md);
      `--no-enforce-eager` compiles, with VAS as without;
    - enable_chunked_prefill=False: vLLM 0.32's CPU build kills the engine ("CPU Generator does
      not use offset") when a seeded request's prefill is split over steps; it rewinds the
      request's generator with a CUDA-only call. VAS itself is correct under chunked prefill
      (tests/test_chunked_prefill.py runs it with greedy requests, which have no generator);
    - dtype=float32 on an x86 CPU without AVX512-BF16 or AMX: vLLM's CPU build would follow the
      checkpoint's bfloat16 there too, and emulated bfloat16 is several times slower than float32
      (measured on a 2-core AVX2 EPYC: 14.8 against 39.9 tokens/s at batch 8, 18.3 against 86.3 at
      batch 64; torch's bf16 matmul 0.3 GFLOP/s against 100 for float32);
    - VLLM_CPU_OMP_THREADS_BIND=nobind on small machines, or the worker gets one thread.
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


def cpu_lacks_fast_bfloat16() -> bool:
    """An x86 CPU with neither AVX512-BF16 nor AMX: bfloat16 matmuls are emulated there."""
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False  # ARM, POWER and RISC-V builds of vLLM have their own bfloat16 paths
    return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def prepare_environment() -> None:
    """Environment variables vLLM reads at engine start (inherited by its worker processes)."""
    if not on_gpu():
        if (os.cpu_count() or 1) <= 8:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def engine_settings(vas: VASConfig | None, given: dict[str, Any]) -> dict[str, Any]:
    """The engine arguments vas-server sets, given those the user set (`given`: every argument the
    user gave, whatever its value, and nothing else; they win over our defaults). Used by
    `engine_kwargs` (Python) and by `vas-server serve` (CLI flags).

    With `vas=None` the engine is plain vLLM (the baseline in tests and benchmarks).
    """
    defaults: dict[str, Any] = {}
    if not on_gpu():
        defaults.update(enforce_eager=True, enable_chunked_prefill=False)
        if (given.get("pipeline_parallel_size") or 1) > 1:
            # vLLM 0.32's CPU runner allocates a later stage's receive buffer only in its compile
            # warm-up, so eager PP fails at the first step. Dynamo with its eager backend runs that
            # warm-up and the same kernels as eager mode, without Inductor's minutes of compiling.
            defaults.update(enforce_eager=False, compilation_config={"backend": "eager"})
    if default_dtype(None) is not None:
        defaults["dtype"] = default_dtype(None)
    settings = {key: value for key, value in defaults.items() if given.get(key) is None}
    if vas is None:
        return settings
    # The middleware reads the config from here too (max_body_bytes, default_top_k, the heads).
    settings["additional_config"] = {**(given.get("additional_config") or {}), **vas.to_additional_config()}
    if not vas.value_models:
        return settings
    head_infos = vas.read_heads()  # fails fast, here, on a bad value-model directory or a name clash
    if any(h.runtime == "separate" for h in head_infos.values()):
        # The value cache holds max_requests requests. Capping the scheduler's concurrency at the
        # same number makes further requests wait in vLLM's queue instead of overflowing it.
        # Shared-path models (config.runtime_path) keep no cache: with only those, no cap.
        capacity = vas.max_requests or given.get("max_num_seqs") or DEFAULT_VAS_REQUESTS
        vas = dataclasses.replace(vas, max_requests=capacity)
        settings["max_num_seqs"] = min(given.get("max_num_seqs") or capacity, capacity)
    settings["logits_processors"] = [*(given.get("logits_processors") or []), PROCESSOR_FQCN]
    settings["worker_extension_cls"] = WORKER_EXTENSION
    settings["additional_config"].update(vas.to_additional_config())
    return settings


def engine_kwargs(model: str, vas: VASConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` or `vllm.AsyncEngineArgs(...)`; `overrides` are any
    other vLLM engine arguments."""
    prepare_environment()
    return {"model": model, **overrides, **engine_settings(vas, overrides)}


def engine_dtype(llm) -> str:
    """The dtype a running `vllm.LLM` chose, e.g. "float32"."""
    return str(llm.llm_engine.vllm_config.model_config.dtype).removeprefix("torch.")


def default_dtype(dtype: str | None) -> str | None:
    """What `dtype` the engine gets when the user gave `dtype` (None: none): the one vas-server
    passes on (None: vLLM's own choice, the checkpoint's dtype). The one place that picks float32
    where a CPU emulates bfloat16 (engine_settings, and the evaluation's offline KL)."""
    if dtype is None and not on_gpu() and cpu_lacks_fast_bfloat16():
        return "float32"
    return None if dtype in (None, "auto") else dtype
