"""Runtime kinds are plug-ins: each is a package found through the registry, its own
options reach `mlc runtime add`, and the runtime modules import each other in no cycle."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import activities.runtimes
from activities.runtimes.base import RuntimeDriver
from activities.runtimes.registry import driver_for, kinds
from mlc.config import Settings
from mlc.domain import Runtime, RuntimeKind

RUNTIMES = Path(activities.runtimes.__file__).parent


def test_every_kind_is_registered_with_its_driver(tmp_path: Path) -> None:
    found = kinds()
    assert set(found) == set(RuntimeKind)
    for kind in found:
        runtime = Runtime(name=f"r-{kind.value}", kind=kind, stage="DEV")
        driver = driver_for(runtime, Settings.from_env(home=tmp_path))
        assert isinstance(driver, RuntimeDriver)
        assert type(driver).__module__ == f"activities.runtimes.{kind.value}.driver"


def test_each_kinds_options_are_mlc_runtime_add_options(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MLC_DATABASE_URL", "TEMPORAL_ADDRESS")}
    result = subprocess.run(
        [sys.executable, "-m", "mlc", "runtime", "add", "--help"],
        env={**env, "MLC_HOME": str(tmp_path), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    names = [o.name for spec in kinds().values() for o in spec.options]
    assert len(names) == len(set(names))
    for name in names:
        assert f"--{name.replace('_', '-')}" in result.stdout


def _imports() -> dict[str, set[str]]:
    """Runtime module -> the runtime modules it imports when loaded or called (anywhere
    in it but ``if TYPE_CHECKING:`` blocks, by name)."""
    modules = {}
    for path in RUNTIMES.rglob("*.py"):
        parts = path.relative_to(RUNTIMES.parent.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
            for n in ast.walk(block)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_the_runtime_modules_import_each_other_in_no_cycle() -> None:
    graph = _imports()
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path[path.index(name) :], name))}"
        if name not in done:
            for target in sorted(graph[name]):
                visit(target, (*path, name))
            done.add(name)

    for name in sorted(graph):
        visit(name, ())
