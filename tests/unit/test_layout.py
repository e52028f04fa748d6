"""The house rules of src/kvmlab (ARCHITECTURE.md), checked on the source itself.

Rooms import only earlier rooms of the flow; no import cycle; imports at module level (except
optional heavy third-party packages); modules <= 500 lines, functions <= 60; subprocess only in
core/proc.py; docker containers only in build/containers.py.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "kvmlab"
ORDER = ["core", "model", "source", "build", "qemu", "install", "host", "boot", "nested", "lab",
         "report", "checks", "tasks"]
TOP = {"__init__", "__main__", "cli"}          # the package's entry points sit above every room
# optional or heavy third-party packages, imported only by the steps that use them (rich's
# progress bars only while downloading; pytest only inside `verify`; pygal, the `report`
# extra, only while drawing the report)
LAZY_OK = {"docker", "requests", "urllib3", "fabric", "paramiko", "testinfra", "zstandard",
           "rich", "pytest", "pygal"}
# module -> why it may exceed a limit (keep this empty unless there is a written reason)
EXCEPTIONS: dict[str, str] = {}


def _modules() -> list[tuple[str, Path, ast.Module]]:
    out = []
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out.append((name, f, ast.parse(f.read_text())))
    return out


MODULES = _modules()


def _room(module: str) -> str:
    return module.split(".")[0]


def _kvmlab_imports(tree: ast.Module, top_only: bool) -> list[tuple[int, str]]:
    found = []
    nodes = tree.body if top_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvmlab"):
            base = node.module.removeprefix("kvmlab").lstrip(".")
            for a in node.names:
                target = f"{base}.{a.name}" if base else a.name
                found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.removeprefix("kvmlab.")) for a in node.names
                      if a.name.startswith("kvmlab.")]
    return found


def test_rooms_import_only_earlier_rooms():
    bad = []
    for name, _f, tree in MODULES:
        room = _room(name)
        if room in TOP:
            continue
        for line, target in _kvmlab_imports(tree, top_only=False):
            troom = _room(target)
            if troom in TOP or troom == "__version__":
                continue
            if ORDER.index(troom) > ORDER.index(room):
                bad.append(f"{name}:{line} imports {target} (a later room)")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    known = {n for n, _f, _t in MODULES}
    graph: dict[str, set[str]] = {}
    for name, _f, tree in MODULES:
        deps = set()
        for _line, target in _kvmlab_imports(tree, top_only=True):
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                deps.add(target)
        graph[name] = deps
    seen: set[str] = set()
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        if m in stack:
            cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            visit(d)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, "\n".join(cycles)


def test_imports_are_at_module_level():
    bad = []
    for name, _f, tree in MODULES:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset > 0:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names]
                if not all(n.split(".")[0] in LAZY_OK for n in names):
                    bad.append(f"{name}:{node.lineno} imports {', '.join(names)} in a function")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("limit_module, limit_function", [(500, 60)])
def test_modules_and_functions_stay_small(limit_module, limit_function):
    bad = []
    for name, f, tree in MODULES:
        if name in EXCEPTIONS:
            continue
        n = len(f.read_text().splitlines())
        if n > limit_module:
            bad.append(f"module {name}: {n} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > limit_function:
                    bad.append(f"function {name}.{node.name}: {length} lines")
    assert not bad, "\n".join(bad)


def test_one_process_runner_and_one_container_runner():
    bad = []
    for name, _f, tree in MODULES:
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            if isinstance(node.value, ast.Name) and node.value.id == "subprocess" and \
                    node.attr in ("run", "Popen", "call", "check_call", "check_output") and \
                    name != "core.proc":
                bad.append(f"{name}:{node.lineno} calls subprocess.{node.attr}")
            if node.attr in ("run", "create") and isinstance(node.value, ast.Attribute) and \
                    node.value.attr == "containers" and name != "build.containers":
                bad.append(f"{name}:{node.lineno} runs a container itself")
    assert not bad, "\n".join(bad)


def test_every_module_says_its_job():
    missing = [name for name, _f, tree in MODULES if not ast.get_docstring(tree)]
    assert not missing, f"modules without a docstring: {missing}"
