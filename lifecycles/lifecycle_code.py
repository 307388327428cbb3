"""Turn stored lifecycle source into a runnable entry point, inside the workflow sandbox.

Runs on the sandboxed lifecycle worker, before every run (and replay) of uploaded code:

1. the full static check of :mod:`lifecycles.validation` again, so code stored by any
   route is refused here with ``file:line: reason`` exactly as at upload;
2. the code is compiled with guards: every attribute read goes through
   ``__mlc_getattr__`` (refusing private, dunder and internal names, and any module,
   frame, traceback or code object as a result), and every attribute write or delete
   through ``__mlc_writable__`` (only objects of classes the code defined itself);
3. it runs with safe builtins only and an ``__import__`` that returns read-only views of
   the allowed modules holding their public, non-module names.

All of this is hardening: the boundary is the lifecycle worker's sandbox, a process that
holds no credentials and reaches nothing but Temporal.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import sys
import types
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from lifecycles.api import Lifecycle, LifecycleSpec
from lifecycles.validation import (
    ALLOWED_MODULES,
    NONDETERMINISTIC_ATTRIBUTES,
    SAFE_BUILTINS,
    attribute_problem,
    check_source,
    format_problems,
    is_allowed_import,
    public_names,
)
from mlc.errors import InvalidLifecycleError

MODULE_NAME = "mlc_uploaded_lifecycle"
"""``__name__`` of uploaded code (classes it defines report it as their module)."""

GETATTR = "__mlc_getattr__"
WRITABLE = "__mlc_writable__"
"""Builtins the compiled code calls; source cannot name them (dunder names are refused)."""

_OPAQUE = (types.ModuleType, types.FrameType, types.TracebackType, types.CodeType)
"""Objects no attribute read may hand to lifecycle code."""


@dataclass(frozen=True)
class LoadedLifecycle:
    """What a workflow needs from uploaded code: its entry point and optional stages."""

    run: Callable[[Lifecycle], Awaitable[None]]
    spec: LifecycleSpec | None


def code_filename(name: str, version: int | str) -> str:
    """The filename compiled code reports in tracebacks: ``<lifecycle NAME@VERSION>``."""
    return f"<lifecycle {name}@{version}>"


def load_lifecycle(source: str, *, filename: str, check: bool = True) -> LoadedLifecycle:
    """Check ``source``, execute it guarded and return its ``run`` and ``SPEC``.

    Args:
        source: The stored lifecycle code.
        filename: What errors and tracebacks call it (``<lifecycle NAME@VERSION>``).
        check: Run the static checks first (always, except in tests that prove the
            run-time guards hold on their own).

    Raises:
        InvalidLifecycleError: the code fails a static check, raises while loading, has
            no ``async def run`` or a ``SPEC`` that is not a ``LifecycleSpec``
            (``filename:line: reason``).
    """
    if check:
        problems = check_source(source, filename=filename)
        if problems:
            raise InvalidLifecycleError(format_problems(filename, problems))
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        raise InvalidLifecycleError(f"{filename}:{exc.lineno or 1}: syntax error: {exc.msg}") from None
    code = compile(ast.fix_missing_locations(_Guard(tree).visit(tree)), filename, "exec")
    module = types.ModuleType(MODULE_NAME)
    namespace = module.__dict__
    namespace["__builtins__"] = restricted_builtins()
    # dataclasses resolves string annotations through sys.modules[cls.__module__] while the
    # class is created, so the module is registered for as long as its top level runs.
    sys.modules[MODULE_NAME] = module
    try:
        exec(code, namespace)
    except Exception as exc:
        raise InvalidLifecycleError(describe_error(exc, filename)) from None
    finally:
        del sys.modules[MODULE_NAME]
    run = namespace.get("run")
    if not inspect.iscoroutinefunction(run):
        raise InvalidLifecycleError(f"{filename}:1: no entry point: define `async def run(mlc: Lifecycle)`")
    spec = namespace.get("SPEC")
    if spec is not None and not isinstance(spec, LifecycleSpec):
        raise InvalidLifecycleError(
            f"{filename}:1: SPEC must be a LifecycleSpec (from lifecycles.api), not {type(spec).__name__}"
        )
    return LoadedLifecycle(run=run, spec=spec)


def error_line(exc: BaseException, filename: str) -> int | None:
    """The innermost line of the uploaded code on ``exc``'s traceback, if it passed there."""
    line: int | None = None
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def describe_error(exc: BaseException, filename: str) -> str:
    """``filename:line: ExceptionType: message`` for an error raised by uploaded code."""
    line = error_line(exc, filename)
    where = f"{filename}:{line}" if line is not None else filename
    return f"{where}: {type(exc).__name__}: {exc}"


def restricted_builtins() -> dict[str, Any]:
    """The builtins uploaded code runs with: safe ones plus guarded import and attributes."""
    table = {name: getattr(builtins, name) for name in SAFE_BUILTINS}
    table.update(
        {
            "__import__": _import,
            "getattr": _getattr,
            "hasattr": _hasattr,
            "setattr": _setattr,
            GETATTR: _getattr,
            WRITABLE: _writable,
        }
    )
    return table


class _Guard(ast.NodeTransformer):
    """Route attribute reads through ``__mlc_getattr__`` and writes through ``__mlc_writable__``.

    Annotations are left alone when ``from __future__ import annotations`` makes them
    text (dataclasses read that text); otherwise they are evaluated, so guarded too.
    """

    def __init__(self, tree: ast.Module) -> None:
        self.lazy_annotations = any(
            isinstance(node, ast.ImportFrom)
            and node.module == "__future__"
            and any(a.name == "annotations" for a in node.names)
            for node in tree.body
        )

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.ctx, ast.Load):
            call = ast.Call(
                func=ast.Name(GETATTR, ast.Load()), args=[node.value, ast.Constant(node.attr)], keywords=[]
            )
            return ast.copy_location(call, node)
        guarded = ast.Call(func=ast.Name(WRITABLE, ast.Load()), args=[node.value], keywords=[])
        node.value = ast.copy_location(guarded, node.value)
        return node

    def visit_arg(self, node: ast.arg) -> ast.AST:
        return node if self.lazy_annotations else self.generic_visit(node)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        returns = node.returns
        if self.lazy_annotations:
            node.returns = None
        self.generic_visit(node)
        if self.lazy_annotations:
            node.returns = returns
        return node

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if not self.lazy_annotations:
            return self.generic_visit(node)
        target = self.visit(node.target)
        assert isinstance(target, ast.Name | ast.Attribute | ast.Subscript)
        node.target = target
        if node.value is not None:
            node.value = self.visit(node.value)
        return node


def _import(
    name: str,
    globals: Mapping[str, object] | None = None,
    locals: Mapping[str, object] | None = None,
    fromlist: Sequence[str] | None = (),
    level: int = 0,
) -> types.ModuleType:
    """``import`` for lifecycle code: a read-only view of an allowed module, never the module."""
    names = tuple(fromlist or ())
    if level != 0 or not is_allowed_import(name, names) or (not names and "." in name):
        raise ImportError(f"lifecycle code may not import {name}")
    if not names:
        return _view(name)
    view = _view(name) if name in ALLOWED_MODULES else types.ModuleType(name)
    for wanted in names:
        if f"{name}.{wanted}" in ALLOWED_MODULES:
            view.__dict__[wanted] = _view(f"{name}.{wanted}")
        elif wanted != "*" and wanted not in view.__dict__:
            raise ImportError(f"lifecycle code may not import {wanted} from {name}")
    return view


def _view(name: str) -> types.ModuleType:
    """A fresh module holding the public, non-module names of allowed module ``name``.

    The module is imported with the importer in force (inside a workflow, the sandbox's),
    so sandbox restrictions (``datetime.now``...) still apply to what the view holds.
    """
    # Looked up per call: inside the sandbox builtins.__import__ is the sandbox's importer.
    module: Any = builtins.__import__(name, None, None, (), 0)
    for part in name.split(".")[1:]:
        module = getattr(module, part)
    view = types.ModuleType(name)
    for public in public_names(name):
        value = getattr(module, public, None)
        if value is not None and not isinstance(value, _OPAQUE):
            view.__dict__[public] = value
    view.__dict__["__all__"] = tuple(sorted(k for k in view.__dict__ if not k.startswith("_")))
    return view


def _check_attribute(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError("attribute name must be a string")
    problem = attribute_problem(name)
    if problem is None and name in NONDETERMINISTIC_ATTRIBUTES:
        problem = "it reads the clock, which differs on replay"
    if problem is not None:
        raise AttributeError(f"lifecycle code may not access attribute {name!r}: {problem}")


def _getattr(obj: object, name: str, *default: object) -> Any:
    _check_attribute(name)
    value = getattr(obj, name, *default)
    if isinstance(value, _OPAQUE):
        raise AttributeError(
            f"lifecycle code may not access attribute {name!r}: it is a {type(value).__name__}, "
            "which reaches outside the authoring API"
        )
    return value


def _hasattr(obj: object, name: str) -> bool:
    _check_attribute(name)
    return hasattr(obj, name)


def _writable(obj: object) -> object:
    """``obj`` if lifecycle code may set or delete its attributes: it is an instance of a
    class the code defined, or such a class. Everything else is shared with other runs."""
    owner = obj if isinstance(obj, type) else type(obj)
    if owner.__module__ != MODULE_NAME:
        what = obj.__name__ if isinstance(obj, type) else f"{type(obj).__name__} objects"
        raise AttributeError(
            f"lifecycle code may not change attributes of {what}: only objects of classes it defines"
        )
    return obj


def _setattr(obj: object, name: str, value: object) -> None:
    _check_attribute(name)
    setattr(_writable(obj), name, value)
