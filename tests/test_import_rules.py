"""The shape of the code stays: no package imports a layer above it, and no import cycle appears.

Every ``import`` counts, including those inside functions and under ``TYPE_CHECKING``: an
import hidden in a function is still a dependency (``docs/architecture.md`` explains the
layers). There is no list of tolerated cycles: any cycle fails.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MAY_IMPORT = {
    "cli": {"server", "workers", "workflows", "activities", "lifecycles", "mlc"},
    "server": {"workers", "workflows", "activities", "lifecycles", "mlc"},
    "workers": {"workflows", "activities", "lifecycles", "mlc"},
    "workflows": {"lifecycles", "mlc"},
    "activities": {"mlc"},
    "lifecycles": {"mlc"},
    "mlc": set(),
}
"""Each top-level package and the project packages it may import (highest layer first)."""

ALLOWED_UPWARD = {
    ("mlc.__main__", "cli"): "`python -m mlc` (the sandbox and the tests run it) is the program's "
    "entry script: nothing imports it",
}


def modules() -> dict[str, Path]:
    """Every module of the project's packages by dotted name."""
    found = {}
    for package in MAY_IMPORT:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (submodules resolved)."""
    known = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in names:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
    return targets


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, without the allowed upward imports."""
    found = modules()
    graph = {}
    for name, path in found.items():
        graph[name] = {t for t in imports(name, path, found) if (name, t.split(".")[0]) not in ALLOWED_UPWARD}
    return graph


def cycles_among_children(graph: dict[str, set[str]], package: str) -> list[set[str]]:
    """Sets of ``package``'s direct children (modules or subpackages) that import each other."""
    prefix = f"{package}." if package else ""
    child = {m: m[len(prefix) :].split(".")[0] for m in graph if m.startswith(prefix) and m != package}
    edges: dict[str, set[str]] = {c: set() for c in child.values()}
    for module, unit in child.items():
        edges[unit] |= {child[t] for t in graph[module] if t in child and child[t] != unit}
    reach: dict[str, set[str]] = {}
    for unit in edges:
        seen, todo = set(), list(edges[unit])
        while todo:
            nxt = todo.pop()
            if nxt not in seen:
                seen.add(nxt)
                todo.extend(edges[nxt])
        reach[unit] = seen
    cycles = {frozenset({u} | {v for v in reach[u] if u in reach[v]}) for u in edges}
    return [set(c) for c in cycles if len(c) > 1]


def test_no_package_imports_a_layer_above_it() -> None:
    graph = import_graph()
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if target.split(".")[0] != module.split(".")[0]
        and target.split(".")[0] not in MAY_IMPORT[module.split(".")[0]]
    )
    assert upward == [], "imports of a higher layer (see docs/architecture.md):\n" + "\n".join(upward)


def test_no_import_cycle() -> None:
    graph = import_graph()
    packages = {""} | {m for m in graph if modules()[m].name == "__init__.py"}
    found = [
        f"{package or '<top>'}: {', '.join(sorted(cycle))}"
        for package in sorted(packages)
        for cycle in cycles_among_children(graph, package)
    ]
    assert found == [], "import cycles (break them, see docs/architecture.md):\n" + "\n".join(found)


def test_the_rules_see_imports_inside_functions(tmp_path: Path) -> None:
    """An import hidden in a function body counts like one at the top of the file."""
    module = tmp_path / "low.py"
    module.write_text("def f():\n    from cli.app import main\n    return main\n")
    assert imports("mlc.low", module, {"cli.app", "mlc.low"}) == {"cli.app"}
