"""The model image's copy of ``mlc`` is exactly what the commands it runs import.

``MLC_SOURCES`` (:mod:`activities.runtimes.docker.images`) is an allow-list: a module
missing from it makes a container fail with ``ImportError``; one too many ships orchestrator
code into images that run hostile models. This test computes the import closure of the
``python -m`` commands the runtime drivers start in containers and compares.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mlc
from activities.runtimes.docker import images as docker_images

ROOT = Path(__file__).resolve().parent.parent
MLC_DIR = Path(mlc.__file__).resolve().parent


def image_commands() -> set[str]:
    """The ``mlc`` modules the drivers run with ``python -m`` (a ``"-m"`` followed by one)."""
    found: set[str] = set()
    for path in (ROOT / "activities" / "runtimes").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.List | ast.Tuple):
                values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
                found.update(
                    module
                    for flag, module in zip(values, values[1:], strict=False)
                    if flag == "-m" and isinstance(module, str) and module.split(".")[0] == "mlc"
                )
    return found


def module_file(name: str) -> Path | None:
    """The source file of an ``mlc`` module or package, if it is one."""
    base = MLC_DIR.parent.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imported(path: Path) -> set[str]:
    """Every ``mlc`` module ``path`` imports, inside functions too (a lazy import still runs)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mlc":
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "mlc")
    return names


def closure(commands: set[str]) -> set[str]:
    """Files (relative to the ``mlc`` package) that running ``python -m`` on ``commands`` loads."""
    todo = [*commands, *(f"{c}.__main__" for c in commands)]
    seen: set[Path] = set()
    while todo:
        parts = todo.pop().split(".")
        for end in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            path = module_file(".".join(parts[:end]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported(path))
    return {p.relative_to(MLC_DIR).as_posix() for p in seen}


def test_images_carry_exactly_what_their_commands_import() -> None:
    commands = image_commands()
    assert commands == {"mlc.serving", "mlc.streaming"}, "a new command in images: check this test"
    needed = closure(commands)
    shipped = {rel for rel, _ in docker_images._mlc_source_files()}
    missing, extra = sorted(needed - shipped), sorted(shipped - needed)
    assert missing == [], f"add {missing} to MLC_SOURCES: containers would fail to import them"
    assert extra == [], f"remove {extra} from MLC_SOURCES: no command images run imports them"
