"""The package's import graph has no cycles, and ``import overlaycache`` needs only the runtime
dependencies (the test harnesses and the test tools they use stay out of it).

Every import counts: module level, inside functions, and under ``TYPE_CHECKING``. An edge goes to
the module named (``from a.b import c`` names ``a.b.c`` when that is a module, else ``a.b``); the
implicit import of parent packages is not an edge, or every module would be in a cycle with
``overlaycache/__init__.py``, which re-exports the public API.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import overlaycache

PACKAGE = Path(overlaycache.__file__).parent



def _modules() -> dict[str, Path | None]:
    """Module name -> source file (None for compiled modules), for the whole package."""
    mods: dict[str, Path | None] = {}
    for path in sorted(PACKAGE.rglob("*")):
        rel = path.relative_to(PACKAGE.parent)
        if path.suffix == ".py":
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
        elif path.suffix in (".pyx", ".pyi", ".so"):
            name = ".".join((*rel.parts[:-1], rel.name.split(".")[0]))
            mods.setdefault(name, None)
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in its source."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        if path is None:
            continue
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        named: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                named += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                named += [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        graph[mod] = {t for t in map(resolve, named) if t is not None and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_checker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "overlaycache.remote.catalog" in graph["overlaycache.store.s3"]
    assert "overlaycache._core" in graph["overlaycache._impl"]  # function level, compiled module
    assert "overlaycache.store" in graph["overlaycache.testing.servers"]  # under TYPE_CHECKING


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_store_protocol_knows_nothing_above_it() -> None:
    graph = import_graph()
    assert graph["overlaycache.store.base"] <= {"overlaycache.errors"}
    # The registry opens backends; it knows no format above the key-value protocol.
    assert graph["overlaycache.store.registry"] <= {"overlaycache.errors", "overlaycache.store.base",
                                                    "overlaycache.store.local", "overlaycache.store.s3"}



def test_the_secondary_side_stays_below_the_images() -> None:
    graph = import_graph()
    # remote/ (but the catalog, which opens images) reads stores through their protocol only; the
    # retention policy, like the snapshots, is a pure value module.
    allowed = {"overlaycache._fs", "overlaycache._impl", "overlaycache.errors", "overlaycache.snapshots",
               "overlaycache.store.base", "overlaycache.local.geometry", "overlaycache.retention"}
    for mod, deps in graph.items():
        if mod.startswith("overlaycache.remote.") and mod != "overlaycache.remote.catalog":
            assert {d for d in deps if not d.startswith("overlaycache.remote.")} <= allowed, mod
        if mod.startswith("overlaycache.local"):
            assert not any(d.startswith("overlaycache.remote") for d in deps), mod
        if mod.startswith("overlaycache.store"):
            assert "overlaycache.remote.layout" not in deps, mod
    assert graph["overlaycache.retention"] <= {"overlaycache.errors", "overlaycache.snapshots"}
    # The layout knows no module that uses it: a new format replaces it alone.
    assert graph["overlaycache.remote.layout"] <= {"overlaycache._impl", "overlaycache.errors"}


def test_local_knows_nothing_above_it() -> None:
    graph = import_graph()
    allowed = {"overlaycache._fs", "overlaycache._impl", "overlaycache.errors", "overlaycache.snapshots"}
    for mod, deps in graph.items():
        if mod.startswith("overlaycache.local."):
            assert {d for d in deps if not d.startswith("overlaycache.local")} <= allowed, mod


# Private by convention, public by API: namedtuple's _replace.
_PUBLIC_UNDERSCORED = {"_replace"}


def private_reaches(root: Path = PACKAGE) -> list[str]:
    """Accesses ``x._name`` (``x`` not ``self``/``cls``) in a module under ``root`` whose ``_name``
    that module does not define itself: a reach into another module's private members."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if "testing" in path.relative_to(root).parts:
            continue  # harnesses poke at internals on purpose
        tree = ast.parse(path.read_text(), str(path))
        own: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.arg):
                own.add(node.arg)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                    and node.attr not in own and node.attr not in _PUBLIC_UNDERSCORED):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_private_member_check_finds_a_reach(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("class A:\n    def _own(self) -> None:\n        self._x = 1\n\n"
                              "def f(a: A) -> None:\n    a._own()\n")
    (pkg / "b.py").write_text("def g(vol: object) -> object:\n    return vol._stack\n")
    assert private_reaches(pkg) == ["pkg/b.py:2: vol._stack"]


def test_no_module_reaches_into_another_s_private_members() -> None:
    assert private_reaches() == []


PROBE = """
import json, sys
import overlaycache
print(json.dumps(sorted(m for m in sys.modules
                        if m.split(".")[0] in ("pytest", "_pytest", "hypothesis", "moto")
                        or m.startswith("overlaycache.testing"))))
"""


def test_import_overlaycache_leaves_test_tools_alone(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(overlaycache.__file__).parent.parent)  # the package under test
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert json.loads(out.stdout) == []
