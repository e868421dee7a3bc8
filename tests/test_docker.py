"""The Docker files, checked without a Docker engine (there is none on these machines): they
parse, every file they copy exists, they run the README's setup script, and the entrypoint they
share is valid bash that starts `vas-server serve`."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"gpu": REPO / "Dockerfile", "cpu": REPO / "docker" / "Dockerfile.cpu"}
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


@pytest.fixture(params=sorted(DOCKERFILES), ids=sorted(DOCKERFILES))
def dockerfile(request) -> tuple[str, list[tuple[str, str]]]:
    return request.param, parse_dockerfile(DOCKERFILES[request.param])


def test_instructions_are_valid(dockerfile):
    kind, instructions = dockerfile
    assert instructions[0][0] == "FROM"
    unknown = [k for k, _ in instructions if k not in INSTRUCTIONS]
    assert not unknown, f"{kind}: unknown instructions {unknown}"


def test_gpu_image_builds_on_vllm_openai():
    assert parse_dockerfile(DOCKERFILES["gpu"])[0] == ("FROM", "vllm/vllm-openai:v0.32.0")


def test_copied_files_exist(dockerfile):
    kind, instructions = dockerfile
    for keyword, args in instructions:
        if keyword not in ("COPY", "ADD"):
            continue
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        for source in parts[:-1]:
            assert (REPO / source).exists(), f"{kind}: {keyword} source {source!r} does not exist"


def test_runs_the_readme_setup_script(dockerfile):
    kind, instructions = dockerfile
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    assert any("scripts/setup.sh" in r for r in runs), f"{kind}: never runs scripts/setup.sh"
    assert (REPO / "scripts" / "setup.sh").is_file()
    copied = " ".join(args for keyword, args in instructions if keyword == "COPY")
    assert "scripts/" in copied and "pyproject.toml" in copied


def test_setup_script_reads_the_variables_the_images_set(dockerfile):
    """The images choose the vLLM build through an environment variable (no GPU while building);
    the setup script must read every VAS_SETUP_* variable they set."""
    kind, instructions = dockerfile
    env = " ".join(args for keyword, args in instructions if keyword == "ENV")
    setup = (REPO / "scripts" / "setup.sh").read_text()
    for name in re.findall(r"\b(VAS_SETUP_\w+)=", env):
        assert name in setup, f"{kind} sets {name}, which scripts/setup.sh does not read"


def test_entrypoint_is_shared_and_serves(dockerfile):
    kind, instructions = dockerfile
    entrypoints = [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert entrypoints == ['["bash", "docker/entrypoint.sh"]'], f"{kind}: {entrypoints}"
    assert ("EXPOSE", "8000") in instructions


def test_entrypoint_runs_vas_server_serve_with_the_containers_arguments():
    """The entrypoint itself, run here with this checkout's .venv (the images build the same one):
    the arguments after the image name reach `vas-server serve`'s parser, after the host and port
    the entrypoint sets; an unknown flag is refused by that parser."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["vas-server"] == "vas_server.cli:main"
    shown = subprocess.run(["bash", str(ENTRYPOINT), "--help=VAS"], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    for flag in ("--value-model", "--preset", "--default-top-k", "--no-value-models"):  # vLLM's help, our group
        assert flag in shown.stdout, flag
    refused = subprocess.run(["bash", str(ENTRYPOINT), "--no-such-flag"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--no-such-flag" in refused.stderr
