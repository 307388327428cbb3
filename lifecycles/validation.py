"""Static checks of uploaded lifecycle code, run at upload and again before every load.

Uploaded code runs on the sandboxed lifecycle worker and is replayed for as long as its
runs live, so it may only compose the authoring API: no I/O, no clocks or randomness,
no reaching into interpreter internals. These checks give the author every problem at
once as ``file:line: reason``; :mod:`lifecycles.lifecycle_code` runs them again on the worker and
adds run-time guards. They are hardening, not the boundary: the boundary is the
lifecycle worker's sandbox (a process with nothing to steal) and the trusted activities,
which treat every payload from workflow code as hostile.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib
import re
import types
from collections.abc import Iterator
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
        "collections.abc",
        "itertools",
        "functools",
        "__future__",
    }
)
"""Modules lifecycle code may import: the API and pure helpers (exactly these)."""

WITHHELD: dict[str, frozenset[str]] = {
    "typing": frozenset({"get_type_hints", "ForwardRef", "reveal_type"}),
    "functools": frozenset({"update_wrapper", "wraps"}),
}
"""Public names of allowed modules that lifecycle code still does not get: they evaluate
code held in strings (annotations) or copy attributes named by strings."""

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

INTERNAL_PREFIXES: tuple[str, ...] = ("f_", "tb_", "co_", "gi_", "cr_", "ag_")
"""Attributes of frames, tracebacks, code objects, generators and coroutines
(``gi_frame``, ``f_back``, ``f_globals``, ``tb_frame``...): they lead to any module."""

FORMAT_ATTRIBUTES: frozenset[str] = frozenset({"format", "format_map"})
"""``str.format`` looks up the attributes a format string names, hidden from these checks."""

MODEL_MACHINERY: frozenset[str] = frozenset(
    {
        "model_config",
        "model_fields",
        "model_computed_fields",
        "model_construct",
        "model_rebuild",
        "model_post_init",
        "model_validate",
        "model_validate_json",
        "model_validate_strings",
        "model_json_schema",
        "model_parametrized_name",
    }
)
"""Class-level machinery of the pydantic types the API returns: shared by every run on a
worker, so changing it would reach other runs; reading fields needs none of it."""

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
    Which names an allowed module offers is :func:`public_names`.
    """
    if module in ALLOWED_MODULES:
        return True
    return bool(names) and all(f"{module}.{n}" in ALLOWED_MODULES for n in names)


@functools.cache
def public_names(module: str) -> frozenset[str]:
    """What lifecycle code may take from allowed ``module``: its public names (``__all__``,
    else those without ``_``) minus module objects and :data:`WITHHELD` ones.

    Module objects are left out because each one is a step to ``sys``, ``os`` or
    ``builtins`` (``dataclasses.sys``, ``typing.types``, ``enum.bltns``...).
    """
    real = importlib.import_module(module)
    declared = getattr(real, "__all__", None)
    candidates = declared if declared is not None else [n for n in dir(real) if not n.startswith("_")]
    return frozenset(
        n
        for n in candidates
        if not n.startswith("_")
        and hasattr(real, n)
        and not isinstance(getattr(real, n), types.ModuleType)
        and n not in WITHHELD.get(module, frozenset())
    )


def attribute_problem(name: str) -> str | None:
    """Why lifecycle code may not use attribute ``name`` (None: it may).

    The same rule holds for ``obj.name`` in the source, for ``getattr(obj, "name")`` at
    run time and for keyword captures in ``match`` class patterns.
    """
    if is_dunder(name):
        return "dunder attributes reach interpreter internals"
    if name.startswith("_"):
        return "private members are not part of the authoring API"
    if name.startswith(INTERNAL_PREFIXES):
        return "frame, traceback, code and generator internals reach any module"
    if name in FORMAT_ATTRIBUTES:
        return "str.format looks up attributes named inside the string; use an f-string"
    if name in MODEL_MACHINERY:
        return "the API's types are read through their fields; their class machinery is shared by every run"
    return None


def check_source(source: str, *, filename: str) -> list[Problem]:
    """Every problem of ``source`` (empty when it may go on to its dry run)."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        return [Problem(exc.lineno or 1, f"syntax error: {exc.msg}")]
    checker = _Checker(defined=_defined_names(tree), modules=_module_aliases(tree))
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
    if not _LIFECYCLE_NAME.fullmatch(name):
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
        elif isinstance(node, ast.MatchAs | ast.MatchStar) and node.name:
            found.add(node.name)
    return found


def _module_aliases(tree: ast.Module) -> dict[str, str]:
    """Names bound to allowed modules (``import math``, ``from lifecycles import api``)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in ALLOWED_MODULES and "." not in alias.name:
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in ALLOWED_MODULES:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _strings_in(annotation: ast.expr) -> Iterator[ast.Constant]:
    """String constants in an annotation, except the values of ``Literal[...]``."""
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        yield annotation
        return
    if isinstance(annotation, ast.Subscript):
        head = annotation.value
        name = head.id if isinstance(head, ast.Name) else head.attr if isinstance(head, ast.Attribute) else ""
        if name == "Literal":
            return
    for child in ast.iter_child_nodes(annotation):
        if isinstance(child, ast.expr):
            yield from _strings_in(child)


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
    """Collects import, name, attribute, annotation, pattern and determinism problems."""

    def __init__(self, *, defined: set[str], modules: dict[str, str]) -> None:
        self.defined = defined
        self.modules = modules
        self.problems: list[Problem] = []

    def _refuse(self, node: ast.expr | ast.stmt | ast.pattern | ast.arg, reason: str) -> None:
        self.problems.append(Problem(node.lineno, reason))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if "." in alias.name and is_allowed_import(alias.name):
                self._refuse(
                    node,
                    f"`import {alias.name}` binds the package {alias.name.split('.')[0]}, which is not "
                    f"allowed; write `from {alias.name} import NAME`",
                )
                continue
            self._check_import(node, alias.name, ())

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            self._refuse(node, "relative imports are not allowed: import from lifecycles.api")
            return
        module = node.module or ""
        names = tuple(a.name for a in node.names)
        self._check_import(node, module, names)
        if module in ALLOWED_MODULES:
            for name in names:
                if (
                    name != "*"
                    and f"{module}.{name}" not in ALLOWED_MODULES
                    and name not in public_names(module)
                ):
                    self._refuse(
                        node, f"{module}.{name} is not available to lifecycle code: {self._why(module, name)}"
                    )

    @staticmethod
    def _why(module: str, name: str) -> str:
        real = getattr(importlib.import_module(module), name, None)
        if isinstance(real, types.ModuleType):
            return f"it is the module {real.__name__}, and modules lead out of the sandbox"
        if name in WITHHELD.get(module, frozenset()):
            return "it evaluates code held in strings or copies attributes named by strings"
        if real is None:
            return f"{module} has no public {name}"
        return "it is not public"

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
        if is_dunder(name):
            self._refuse(node, f"{name} is not allowed: dunder names reach interpreter internals")
        elif isinstance(node.ctx, ast.Load) and name not in self.defined:
            if name in FORBIDDEN_NAMES:
                self._refuse(node, f"{name} is not allowed: {FORBIDDEN_NAMES[name]}")
            elif hasattr(builtins, name) and name not in SAFE_BUILTINS:
                self._refuse(node, f"builtin {name} is not available to lifecycle code")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        attr = node.attr
        if is_dunder(attr):
            self._refuse(node, f"access to .{attr} is not allowed: dunder attributes reach internals")
        elif attr in NONDETERMINISTIC_ATTRIBUTES:
            self._refuse(
                node,
                f"non-deterministic call {ast.unparse(node)}(): it reads the clock, which differs "
                "on replay; lifecycle code must not depend on the current time",
            )
        elif (problem := attribute_problem(attr)) is not None:
            self._refuse(node, f"access to .{attr} is not allowed: {problem}")
        elif isinstance(node.value, ast.Name) and node.value.id in self.modules:
            module = self.modules[node.value.id]
            if attr not in public_names(module):
                self._refuse(
                    node, f"{module}.{attr} is not available to lifecycle code: {self._why(module, attr)}"
                )
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in _GUARDED_ATTRIBUTE_CALLS and len(node.args) >= 2:
            attr = node.args[1]
            if isinstance(attr, ast.Constant) and isinstance(attr.value, str):
                problem = attribute_problem(attr.value)
                if problem is not None:
                    self._refuse(node, f"{func.id}(..., {attr.value!r}) is not allowed: {problem}")
        self.generic_visit(node)

    # --- code hidden in strings: annotations --------------------------------------------

    def _check_annotation(self, annotation: ast.expr | None) -> None:
        for text in _strings_in(annotation) if annotation is not None else ():
            self._refuse(
                text,
                f"string annotation {str(text.value)[:40]!r} is not allowed: it is code these checks cannot "
                "see (typing evaluates it); write the type itself, with `from __future__ import "
                "annotations` if it is defined further down",
            )

    def visit_arg(self, node: ast.arg) -> None:
        self._check_annotation(node.annotation)
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._check_annotation(node.returns)
        self.generic_visit(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._check_annotation(node.returns)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._check_annotation(node.annotation)
        self.generic_visit(node)

    # --- match patterns: attribute lookups without attribute syntax ----------------------

    def visit_MatchClass(self, node: ast.MatchClass) -> None:
        for attr in node.kwd_attrs:
            problem = attribute_problem(attr)
            if problem is not None:
                self._refuse(node, f"match pattern capturing .{attr} is not allowed: {problem}")
        self.generic_visit(node)

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        if node.name and is_dunder(node.name):
            self._refuse(node, f"{node.name} is not allowed: dunder names reach interpreter internals")
        self.generic_visit(node)
