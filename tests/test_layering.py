"""Layering (docs/ARCHITECTURE.md), read from the source with `ast`: no module is imported.

Imports are collected everywhere in a file, at module level and inside functions (much of this
code base imports lazily), including `import a.b` followed by `a.b._name`.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The layers, bottom up (docs/ARCHITECTURE.md, "Layers"): a module may import its own layer and
# the layers below it, never one above. The core needs neither the server nor vLLM.
LAYERS = ("core", "server", "tools")


def layer(module: str) -> str | None:
    """The layer of a module of this repository; None for everything else (torch, vllm, ...)."""
    top = module.split(".")[0]
    if module == "vas_server.core" or module.startswith("vas_server.core."):
        return "core"
    if top == "vas_server":
        return "server"
    if top in ("value_models", "benchmarks"):
        return "tools"
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_files(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[str, str | None, int]]:
    """Every import in `source` (the code of `module`) as (module, name, line): `from m import a`
    gives (m, a), `import m` gives (m, None), and `m._a` where m was imported gives (m, _a)."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, str | None, int]] = []
    bound: dict[str, str] = {}  # local name -> module it names, from `import` statements
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, None, node.lineno))
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    root = alias.name.split(".")[0]
                    bound[root] = root
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.append((base, alias.name, node.lineno))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in bound:
                found.append((".".join([bound[value.id], *chain[:-1]]), node.attr, node.lineno))
    return found


def file_imports(path: Path) -> list[tuple[str, str | None, int]]:
    return imports(path.read_text(), module_name(path), path.name == "__init__.py")


def targets(module: str, name: str | None) -> str:
    """The module an import reaches: `from vas_server.core import heads` reaches vas_server.core.heads."""
    if name is not None and (ROOT / module.replace(".", "/") / f"{name}.py").is_file():
        return f"{module}.{name}"
    return module


def is_private(name: str | None) -> bool:
    return name is not None and name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_import_collector_sees_lazy_relative_and_attribute_imports():
    source = ("import value_models.evaluate as ev\nimport vas_server.params\n"
              "def f():\n    from vas_server.core.rule import _steer\n    from . import heads\n"
              "    return ev._generate, vas_server.params._parse\n")
    found = {(m, n) for m, n, _ in imports(source, "value_models.x")}
    assert {("vas_server.core.rule", "_steer"), ("value_models", "heads"), ("value_models.evaluate", "_generate"),
            ("vas_server.params", "_parse")} <= found


def back_imports(path: Path, source: str | None = None) -> list[str]:
    """Imports in a file (its text, or `source` in its place) that run up the layers."""
    module = module_name(path)
    found = imports(source if source is not None else path.read_text(), module, path.name == "__init__.py")
    own = LAYERS.index(layer(module))
    bad = []
    for imported, name, line in found:
        target = targets(imported, name)
        target_layer = layer(target)
        if target_layer is not None and LAYERS.index(target_layer) > own:
            bad.append(f"{path.relative_to(ROOT)}:{line}: {layer(module)} imports {target_layer} ({target})")
        elif layer(module) == "core" and imported.split(".")[0] == "vllm":
            bad.append(f"{path.relative_to(ROOT)}:{line}: the core imports vllm ({imported})")
    return bad


def test_imports_run_one_way():
    bad = [b for path in python_files("vas_server", "value_models", "benchmarks") for b in back_imports(path)]
    assert not bad, "imports must run core <- server <- tools:\n" + "\n".join(bad)


@pytest.mark.parametrize("path, planted", [
    ("vas_server/core/rule.py", "from vas_server.engine_args import engine_kwargs"),
    ("vas_server/core/value_runtime.py", "import vas_server.engine.steering"),
    ("vas_server/core/model.py", "from vllm.config import VllmConfig"),
    ("vas_server/engine/steering.py", "from value_models.train import fit"),
    ("vas_server/params.py", "from value_models import rewards"),
])
def test_a_planted_back_import_is_found(path, planted):
    path = ROOT / path
    assert not back_imports(path)
    source = path.read_text() + "\n\ndef later():\n    " + planted + "\n"
    assert len(back_imports(path, source)) == 1


# Inside the server, three sides (docs/ARCHITECTURE.md, "Layers"): the worker side runs in vLLM's
# engine, the HTTP side in its API process, remote mode replaces the engine core by an upstream;
# they share only the top-level modules and the core.
SIDES = ("vas_server.engine", "vas_server.http", "vas_server.remote")


def side(module: str) -> str | None:
    return next((s for s in SIDES if module == s or module.startswith(s + ".")), None)


def cross_imports(path: Path, source: str | None = None) -> list[str]:
    """Imports in a file of one side (its text, or `source` in its place) that reach the other."""
    module = module_name(path)
    own = side(module)
    if own is None:
        return []
    found = imports(source if source is not None else path.read_text(), module, path.name == "__init__.py")
    return [f"{path.relative_to(ROOT)}:{line}: {own} imports {side(target)} ({target})"
            for imported, name, line in found
            if side(target := targets(imported, name)) not in (None, own)]


def test_engine_and_http_sides_never_import_each_other():
    assert {side(module_name(p)) for p in python_files("vas_server")} >= set(SIDES)
    bad = [b for path in python_files("vas_server") for b in cross_imports(path)]
    assert not bad, "the engine, HTTP and remote sides share only vas_server's top level and the core:\n" + "\n".join(bad)


@pytest.mark.parametrize("path, planted", [
    ("vas_server/http/model_cards.py", "from vas_server.engine.steering import Steering"),
    ("vas_server/engine/steering.py", "import vas_server.http.metrics"),
    ("vas_server/engine/tap_models.py",
     "from vas_server.http import middleware"),
    ("vas_server/remote/serve.py", "from vas_server.engine.runtime_factory import separate_runtime"),
    ("vas_server/engine/steering.py", "from vas_server.remote.upstream import Draw"),
])
def test_a_planted_cross_import_is_found(path, planted):
    path = ROOT / path
    assert not cross_imports(path)
    source = path.read_text() + "\n\ndef later():\n    " + planted + "\n"
    assert len(cross_imports(path, source)) == 1


def import_graph(planted: dict[str, str] | None = None) -> dict[str, set[str]]:
    """vas_server's modules -> the vas_server modules each imports, anywhere in its file (lazy
    and TYPE_CHECKING imports too); `planted` adds source lines to a module (by path)."""
    graph = {}
    for path in python_files("vas_server"):
        module = module_name(path)
        source = path.read_text()
        extra = (planted or {}).get(str(path.relative_to(ROOT)))
        if extra:
            source += "\n\ndef later():\n    " + extra + "\n"
        graph[module] = {targets(m, n) for m, n, _ in imports(source, module, path.name == "__init__.py")
                         if m.split(".")[0] == "vas_server"} - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: its strongly connected components of two or more modules
    (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("path, planted, cycle", [
    ("vas_server/engine/processor.py", "from vas_server.engine.processor_v1 import V1Processor",
     ["vas_server.engine.processor", "vas_server.engine.processor_v1"]),
    ("vas_server/http/server_view.py", "from vas_server.http.steering_fields import rewrite_request",
     ["vas_server.http.server_view", "vas_server.http.steering_fields"]),
])
def test_a_planted_import_cycle_is_found(path, planted, cycle):
    assert cycles(import_graph({path: planted})) == [cycle]


def test_tools_import_no_private_names():
    bad = [f"{path.relative_to(ROOT)}:{line}: {module} {name}"
           for path in python_files("value_models", "benchmarks") for module, name, line in file_imports(path)
           if is_private(name) and module != module_name(path)]
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def test_nothing_cites_the_external_spec():
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    needles = [("VAS" + "_SPEC").encode(), ("../" + "shared").encode()]  # split so this file does not match
    bad = [f"{rel}: {needle.decode()}" for rel in listed if (ROOT / rel).is_file()
           for needle in needles if needle in (ROOT / rel).read_bytes()]
    assert not bad, "cite docs/VAS_RULE.md, not files outside the repository:\n" + "\n".join(bad)


def test_public_names_resolve_through_the_shims():
    """The names users give `vllm serve` (and vas-server passes on) stay where they were, as
    re-exports of the engine and HTTP sides' classes; vas_server's top level stays small."""
    import importlib

    from vas_server.cli import MIDDLEWARE
    from vas_server.engine_args import PROCESSOR_FQCN, WORKER_EXTENSION

    expected = {PROCESSOR_FQCN: "vas_server.engine.processor.VASLogitsProcessor",
                WORKER_EXTENSION: "vas_server.engine.worker_extension.VASWorkerExtension",
                MIDDLEWARE: "vas_server.http.middleware.VASMiddleware"}
    assert set(expected) == {"vas_server.processor:VASLogitsProcessor", "vas_server.processor.VASWorkerExtension",
                             "vas_server.middleware.VASMiddleware"}
    for public, real in expected.items():
        module, _, name = public.replace(":", ".").rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        assert f"{cls.__module__}.{cls.__qualname__}" == real
    top = [p.stem for p in (ROOT / "vas_server").glob("*.py") if p.stem not in ("__init__", "__main__")]
    assert len(top) <= 10, top
