#!/usr/bin/env bash
# VAS on vLLM's default GPU execution path, for anyone with a CUDA GPU and vllm==0.32.0
# (`make setup` installs it where `nvidia-smi` works). Runs from the repository root:
#
#   bash benchmarks/gpu_check.sh            # about 15-25 minutes on one recent GPU
#
# 1. The equality tests on the GPU, under both model runners vLLM 0.32 has:
#    - Model Runner V2 (the GPU default) and the V1 runner (VLLM_USE_V2_MODEL_RUNNER=0);
#    - test_shared_trunk.py: shared path vs separate runtime vs the HF reference, and
#      compiled_llm (torch.compile + CUDA graphs, vLLM's default) vs mixed_llm (eager);
#    - test_vas_engine.py, test_plain_vllm_serve.py: steering, admission, preemption;
#    - test_processor_v2.py: the V2 processor against the V1 one (CPU tensors).
# 2. Throughput of steered over plain vLLM at vLLM's defaults (compiled, CUDA graphs, async
#    scheduling): benchmarks/throughput.py --shared --compiled, written to
#    benchmarks/results/gpu_default_path.json.
# 3. With two or more GPUs: tests/test_parallel.py (TP = 2 and PP = 2 steer exactly as one device) and the
#    shared-trunk throughput at --tensor-parallel-size 2 on a random base of SmolLM2's size whose
#    8 / 4 heads TP divides (SmolLM2's 9 / 3 do not): benchmarks/results/gpu_tp2.json.
#    Not run yet: no machine with two GPUs was lent (docs/BENCHMARKS.md).
# Logs go to build/gpu_check/. Report its summary lines with the GPU model and driver.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi >/dev/null 2>&1 || { echo "gpu_check: no CUDA GPU (nvidia-smi failed)"; exit 2; }
make setup >/dev/null || exit 2
OUT=build/gpu_check
mkdir -p "$OUT"
PY=.venv/bin/python
status=0
TESTS="tests/test_shared_trunk.py tests/test_vas_engine.py tests/test_plain_vllm_serve.py tests/test_processor_v2.py"
for runner in 1 0; do
    echo "== tests, VLLM_USE_V2_MODEL_RUNNER=$runner"
    if VLLM_USE_V2_MODEL_RUNNER=$runner $PY -m pytest -q -rs $TESTS \
        > "$OUT/tests_v2runner_$runner.log" 2>&1; then
        tail -1 "$OUT/tests_v2runner_$runner.log"
    else
        status=1; tail -30 "$OUT/tests_v2runner_$runner.log"
    fi
done
echo "== throughput at vLLM's defaults (compiled, CUDA graphs, async scheduling)"
$PY benchmarks/throughput.py --shared --compiled --batches 1 8 32 128 --tokens 64 --contexts \
    --out benchmarks/results/gpu_default_path.json > "$OUT/throughput.log" 2>&1 || status=1
grep -v " INFO \| WARNING " "$OUT/throughput.log" | tail -25
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    echo "== tensor parallelism: TP = 2 against TP = 1"
    if $PY -m pytest -q -rs tests/test_parallel.py > "$OUT/tests_tp2.log" 2>&1; then
        tail -1 "$OUT/tests_tp2.log"
    else
        status=1; tail -30 "$OUT/tests_tp2.log"
    fi
    $PY benchmarks/throughput.py --shared --compiled --random-base --tensor-parallel-size 2 --batches 1 8 32 128 --tokens 64 \
        --contexts --out benchmarks/results/gpu_tp2.json > "$OUT/throughput_tp2.log" 2>&1 || status=1
    grep -v " INFO \| WARNING " "$OUT/throughput_tp2.log" | tail -25
fi
exit $status
