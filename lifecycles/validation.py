"""Static checks of uploaded lifecycle code, run before anything is stored.

Uploaded code runs inside every worker's workflow sandbox and is replayed for as long as
its runs live, so it may only compose the authoring API: no I/O, no clocks or randomness,
no reaching into interpreter internals. These checks give the author every problem at
once as ``file:line: reason``; :mod:`lifecycles.loader` enforces the same rules again at
run time, so code that slips past a static check still cannot escape.
"""

from __future__ import annotations

import ast
import builtins
import re
from dataclasses import dataclass

ALLOWED_MODULES: frozenset[str] = frozenset(
    {
        "lifecycles.api",
        "typing",
        "datetime",
        "dataclasses",
        "enum",
        "math",
        "collections",
        "itertools",
        "functools",
        "__future__",
    }
)
"""Modules (and their submodules) lifecycle code may import: the API and pure helpers."""

NONDETERMINISTIC_MODULES: frozenset[str] = frozenset({"time", "random", "uuid", "secrets"})
"""Refused with a determinism reason rather than the generic "not allowed" one."""

NONDETERMINISTIC_ATTRIBUTES: frozenset[str] = frozenset({"now", "utcnow", "today"})
"""``datetime.now`` and friends read the clock, which differs on replay."""

SAFE_BUILTINS: frozenset[str] = frozenset(
    {
        "__build_class__",
        "abs",
        "all",
        "any",
        "bool",
        "callable",
        "chr",
        "classmethod",
        "dict",
        "divmod",
        "enumerate",
        "filter",
        "float",
        "format",
        "frozenset",
        "getattr",
        "hasattr",
        "int",
        "isinstance",
        "issubclass",
        "iter",
        "len",
        "list",
        "map",
        "max",
        "min",
        "next",
        "object",
        "ord",
        "pow",
        "property",
        "range",
        "repr",
        "reversed",
        "round",
        "set",
        "setattr",
        "slice",
        "sorted",
        "staticmethod",
        "str",
        "sum",
        "super",
        "tuple",
        "zip",
        "ArithmeticError",
        "AssertionError",
        "AttributeError",
        "Exception",
        "IndexError",
        "KeyError",
        "LookupError",
        "NotImplementedError",
        "RuntimeError",
        "StopIteration",
        "TypeError",
        "ValueError",
        "ZeroDivisionError",
        "NotImplemented",
        "Ellipsis",
    }
)
"""Builtins lifecycle code gets; ``getattr``/``hasattr``/``setattr`` are guarded versions."""

FORBIDDEN_NAMES: dict[str, str] = {
    "open": "file access is not allowed in lifecycle code (it runs inside the workflow)",
    "exec": "running dynamic code is not allowed",
    "eval": "running dynamic code is not allowed",
    "compile": "running dynamic code is not allowed",
    "__import__": "use an import statement (of an allowed module) instead",
    "globals": "introspection is not allowed",
    "locals": "introspection is not allowed",
    "vars": "introspection is not allowed",
    "input": "lifecycle code cannot read input: gates take decisions through `mlc.approval(stage)`",
    "breakpoint": "debuggers cannot attach to workflow code",
    "print": "use `mlc.log(message)` (or `mlc.notify` for people)",
    "hash": "non-deterministic: str hashes differ between worker processes",
    "id": "non-deterministic: object ids differ between worker processes and replays",
}
"""Names refused statically, each with the reason the author sees."""

_GUARDED_ATTRIBUTE_CALLS = frozenset({"getattr", "hasattr", "setattr", "delattr"})
_CAMEL_PARTS = re.compile(r"[^A-Za-z0-9]+")
_LIFECYCLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class Problem:
    """One reason the code cannot be uploaded, at a line of the file."""

    line: int
    reason: str


def is_dunder(name: str) -> bool:
    """``__like_this__``: names that reach interpreter internals."""
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def is_allowed_import(module: str, names: tuple[str, ...] = ()) -> bool:
    """Whether ``import module`` (or ``from module import names``) stays in the whitelist.

    ``from lifecycles import api`` is allowed because it names only an allowed module.
    """
    if any(module == m or module.startswith(m + ".") for m in ALLOWED_MODULES):
        return True
    return bool(names) and all(is_allowed_import(f"{module}.{n}") for n in names)


def check_source(source: str, *, filename: str) -> list[Problem]:
    """Every problem of ``source`` (empty when it may go on to its dry run)."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        return [Problem(exc.lineno or 1, f"syntax error: {exc.msg}")]
    checker = _Checker(defined=_defined_names(tree))
    checker.visit(tree)
    return sorted([*checker.problems, *_entry_point_problems(tree)], key=lambda p: p.line)


def format_problems(filename: str, problems: list[Problem]) -> str:
    """``filename:line: reason`` lines, as compilers print them."""
    return "\n".join(f"{filename}:{p.line}: {p.reason}" for p in problems)


def default_name(stem: str) -> str:
    """A workflow-type-like name from a file stem: ``four_eyes`` -> ``FourEyes``."""
    return "".join(part[:1].upper() + part[1:] for part in _CAMEL_PARTS.split(stem) if part)


def check_lifecycle_name(name: str, *, built_in: tuple[str, ...]) -> str:
    """Return ``name`` if it can be a custom lifecycle's workflow type, else raise ValueError.

    People type it in the Web UI's Workflow Type field, so it must not shadow (even
    case-insensitively) a built-in lifecycle that workers serve as a registered type.
    """
    if not _LIFECYCLE_NAME.match(name):
        raise ValueError(
            f"lifecycle name {name!r} is not valid: start with a letter, then letters, digits, "
            "'_' or '-' (at most 63 characters), e.g. FourEyes"
        )
    clash = next((b for b in built_in if b.casefold() == name.casefold()), None)
    if clash is not None:
        raise ValueError(f"lifecycle name {name!r} is taken by the built-in {clash}; choose another --name")
    return name


def _defined_names(tree: ast.Module) -> set[str]:
    """Every name the module binds anywhere (so shadowing a builtin is not flagged)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
            found.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.add(node.name)
        elif isinstance(node, ast.arg):
            found.add(node.arg)
        elif isinstance(node, ast.alias):
            found.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            found.add(node.name)
    return found


def _entry_point_problems(tree: ast.Module) -> list[Problem]:
    functions = (n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
    entry = [n for n in functions if n.name == "run"]
    usage = "define `async def run(mlc: Lifecycle) -> None` at module level"
    if not entry:
        return [Problem(1, f"no entry point: {usage}")]
    run = entry[-1]
    if isinstance(run, ast.FunctionDef):
        return [Problem(run.lineno, f"the entry point must be `async def run`: {usage}")]
    positional = [*run.args.posonlyargs, *run.args.args]
    required_keywords = [d for d in run.args.kw_defaults if d is None]
    if len(positional) != 1 or run.args.vararg or required_keywords:
        return [Problem(run.lineno, f"the entry point takes exactly one argument, mlc: {usage}")]
    return []


class _Checker(ast.NodeVisitor):
    """Collects import, name, attribute and determinism problems."""

    def __init__(self, *, defined: set[str]) -> None:
        self.defined = defined
        self.problems: list[Problem] = []

    def _refuse(self, node: ast.expr | ast.stmt, reason: str) -> None:
        self.problems.append(Problem(node.lineno, reason))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check_import(node, alias.name, ())

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            self._refuse(node, "relative imports are not allowed: import from lifecycles.api")
            return
        self._check_import(node, node.module or "", tuple(a.name for a in node.names))

    def _check_import(self, node: ast.stmt, module: str, names: tuple[str, ...]) -> None:
        if is_allowed_import(module, names):
            return
        if module.split(".")[0] in NONDETERMINISTIC_MODULES:
            self._refuse(
                node,
                f"non-deterministic import of {module}: lifecycle code is replayed and must "
                "behave the same every time; wait with `await mlc.sleep(timedelta(...))`",
            )
            return
        self._refuse(
            node,
            f"import of {module} is not allowed; lifecycle code may import only "
            f"{', '.join(sorted(ALLOWED_MODULES))}",
        )

    def visit_Name(self, node: ast.Name) -> None:
        name = node.id
        if isinstance(node.ctx, ast.Load) and name not in self.defined:
            if name in FORBIDDEN_NAMES:
                self._refuse(node, f"{name} is not allowed: {FORBIDDEN_NAMES[name]}")
            elif is_dunder(name):
                self._refuse(node, f"{name} is not allowed: dunder names reach interpreter internals")
            elif hasattr(builtins, name) and name not in SAFE_BUILTINS:
                self._refuse(node, f"builtin {name} is not available to lifecycle code")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if is_dunder(node.attr):
            self._refuse(node, f"access to .{node.attr} is not allowed: dunder attributes reach internals")
        elif node.attr in NONDETERMINISTIC_ATTRIBUTES:
            self._refuse(
                node,
                f"non-deterministic call {ast.unparse(node)}(): it reads the clock, which differs "
                "on replay; lifecycle code must not depend on the current time",
            )
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in _GUARDED_ATTRIBUTE_CALLS and len(node.args) >= 2:
            attr = node.args[1]
            if isinstance(attr, ast.Constant) and isinstance(attr.value, str) and is_dunder(attr.value):
                self._refuse(node, f"{func.id}(..., {attr.value!r}) is not allowed: dunder attributes")
        self.generic_visit(node)
