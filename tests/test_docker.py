"""The Docker files, checked without a Docker engine (scripts/docker_check.sh builds and runs the
images for real; it needs root and a daemon, so it is not part of `make test`): they parse, every
file they copy exists, both have the same two stages and runtime contents, they run the README's
setup script, their HEALTHCHECK answers as Docker reads it, the README's run lines give vLLM's
engine the shared memory it needs, and the entrypoint they share starts `vas-server serve`."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"gpu": REPO / "Dockerfile", "cpu": REPO / "docker" / "Dockerfile.cpu"}
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"
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


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The instructions of each stage, each list starting with its FROM (ARGs before the first
    FROM, which only parameterise FROM lines, are dropped)."""
    out: list[list[tuple[str, str]]] = []
    for keyword, args in instructions:
        if keyword == "FROM":
            out.append([])
        if out:
            out[-1].append((keyword, args))
    return out


def test_instructions_are_valid(dockerfile):
    kind, instructions = dockerfile
    before_from = [k for k, _ in instructions[:next(i for i, (k, _) in enumerate(instructions) if k == "FROM")]]
    assert set(before_from) <= {"ARG"}, f"{kind}: only ARG may precede the first FROM, not {before_from}"
    unknown = [k for k, _ in instructions if k not in INSTRUCTIONS]
    assert not unknown, f"{kind}: unknown instructions {unknown}"


def test_gpu_image_builds_on_vllm_openai():
    froms = [args for keyword, args in parse_dockerfile(DOCKERFILES["gpu"]) if keyword == "FROM"]
    assert froms == ["vllm/vllm-openai:v0.32.0 AS build", "vllm/vllm-openai:v0.32.0"]


def test_images_have_the_same_two_stages():
    """A `build` stage that runs setup and converts the base model, and a runtime stage that takes
    only the finished /opt/vas-server from it; the runtime stages of the two images differ only in
    their base and the CPU image's system packages."""
    runtimes = {}
    for kind, path in DOCKERFILES.items():
        build, runtime = stages(parse_dockerfile(path))
        assert build[0][1].endswith(" AS build"), f"{kind}: {build[0]}"
        runs = " ".join(args for keyword, args in build if keyword == "RUN")
        assert "scripts/setup.sh" in runs and "ensure_base_model" in runs and "docker/trim-venv.sh" in runs, kind
        assert ("COPY", "--from=build /opt/vas-server /opt/vas-server") in runtime, kind
        # the runtime stage has no RUN but the system packages: nothing is installed there
        assert [args for keyword, args in runtime if keyword == "RUN"] in ([], ["sh /tmp/system-packages.sh && rm /tmp/system-packages.sh"]), kind
        runtimes[kind] = [(k, a) for k, a in runtime[1:] if not (k in ("COPY", "RUN") and "system-packages" in a)]
    assert runtimes["cpu"] == runtimes["gpu"]


def test_build_stage_sets_the_same_setup_variables():
    """Both build stages install the server only (no test or training extras), convert the base
    into the image's cache, and keep no pip cache."""
    for kind, path in DOCKERFILES.items():
        env = " ".join(args for keyword, args in stages(parse_dockerfile(path))[0] if keyword == "ENV")
        for setting in ("VAS_SETUP_EXTRAS= ", "VAS_SERVER_CACHE=/opt/vas-server/cache", "PIP_NO_CACHE_DIR=1"):
            assert setting in env + " ", f"{kind}: {setting!r} not in {env!r}"
    assert "VAS_TORCH_INDEX=${VAS_TORCH_INDEX}" in " ".join(
        args for keyword, args in parse_dockerfile(DOCKERFILES["cpu"]) if keyword == "ENV")


def test_copied_files_exist(dockerfile):
    kind, instructions = dockerfile
    for keyword, args in instructions:
        if keyword not in ("COPY", "ADD"):
            continue
        if "--from=" in args:  # from an earlier stage, not the build context
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
    for name in re.findall(r"\b(VAS_(?:SETUP_\w+|TORCH_INDEX|VENV_\w+))=", env):
        assert name in setup, f"{kind} sets {name}, which scripts/setup.sh does not read"


def test_entrypoint_is_shared_and_serves(dockerfile):
    kind, instructions = dockerfile
    entrypoints = [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert entrypoints == ['["bash", "docker/entrypoint.sh"]'], f"{kind}: {entrypoints}"
    assert ("EXPOSE", "8000") in instructions


def test_healthcheck_runs_the_healthcheck_script(dockerfile):
    kind, instructions = dockerfile
    checks = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert len(checks) == 1 and checks[0].endswith('CMD [".venv/bin/python", "docker/healthcheck.py"]'), checks
    assert "--start-period=" in checks[0]


def test_healthcheck_answers_as_docker_reads_it(server):
    """docker/healthcheck.py against the suite's real server: exit 0 while it serves (its /health
    is open without the API key), 1 on a port where nothing listens."""
    from http_server import free_port

    port = server.url.rsplit(":", 1)[1].split("/")[0]
    up = subprocess.run([sys.executable, str(HEALTHCHECK)], env={**os.environ, "PORT": port}, timeout=30)
    assert up.returncode == 0
    down = subprocess.run([sys.executable, str(HEALTHCHECK)], env={**os.environ, "PORT": str(free_port())}, timeout=30)
    assert down.returncode == 1


def test_readme_run_lines_give_the_engine_shared_memory():
    """vLLM's engine core needs more /dev/shm than Docker's default 64 MiB: every `docker run`
    line of the README and docs/SERVER.md shares the host's IPC or sizes /dev/shm."""
    lines = [line for doc in ("README.md", "docs/SERVER.md") for line in (REPO / doc).read_text().splitlines()
             if line.startswith("docker run ")]
    assert len(lines) >= 2
    for line in lines:
        assert "--ipc=host" in line or re.search(r"--shm-size[= ]\d+[gGmM]", line), line


def test_trim_keeps_what_serving_imports():
    """docker/trim-venv.sh compiles byte code again for the modules serving imports: each one it
    names exists (a renamed module would silently lose its byte code)."""
    script = (REPO / "docker" / "trim-venv.sh").read_text()
    names = re.findall(r'"((?:vas_server|vllm)\.[\w.]+)"', script)
    assert len(names) >= 10
    for name in names:
        assert importlib.util.find_spec(name) is not None, name


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
