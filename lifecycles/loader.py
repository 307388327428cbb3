"""Turn stored lifecycle source into a runnable entry point, inside the workflow sandbox.

The static checks of :mod:`lifecycles.validation` run at upload time; this module is
the second line: the code gets only safe builtins and an ``__import__`` that admits the
whitelisted modules, and ``getattr``-style builtins refuse dunder names, so code that
hides what it does from the static checks still cannot reach I/O or internals.
"""

from __future__ import annotations

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
    FORBIDDEN_NAMES,
    NONDETERMINISTIC_ATTRIBUTES,
    SAFE_BUILTINS,
    is_allowed_import,
    is_dunder,
)
from mlc.errors import InvalidLifecycleError

MODULE_NAME = "mlc_uploaded_lifecycle"
"""``__name__`` of uploaded code (classes it defines report it as their module)."""


@dataclass(frozen=True)
class LoadedLifecycle:
    """What a workflow needs from uploaded code: its entry point and optional stages."""

    run: Callable[[Lifecycle], Awaitable[None]]
    spec: LifecycleSpec | None


def code_filename(name: str, version: int | str) -> str:
    """The filename compiled code reports in tracebacks: ``<lifecycle NAME@VERSION>``."""
    return f"<lifecycle {name}@{version}>"


def load_lifecycle(source: str, *, filename: str) -> LoadedLifecycle:
    """Execute ``source`` with restricted builtins and return its ``run`` and ``SPEC``.

    Raises:
        InvalidLifecycleError: the code does not compile, raises while loading, has no
            ``async def run`` or a ``SPEC`` that is not a ``LifecycleSpec``
            (``filename:line: reason``).
    """
    try:
        code = compile(source, filename, "exec")
    except SyntaxError as exc:
        raise InvalidLifecycleError(f"{filename}:{exc.lineno or 1}: syntax error: {exc.msg}") from None
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
        __import__=_import,
        getattr=_getattr,
        hasattr=_hasattr,
        setattr=_setattr,
    )
    return table


def _import(
    name: str,
    globals: Mapping[str, object] | None = None,
    locals: Mapping[str, object] | None = None,
    fromlist: Sequence[str] | None = (),
    level: int = 0,
) -> Any:
    names = tuple(fromlist or ())
    if level != 0 or not is_allowed_import(name, names):
        raise ImportError(f"lifecycle code may not import {name}")
    # Looked up per call: inside the sandbox builtins.__import__ is the sandbox's importer.
    return builtins.__import__(name, globals, locals, names, level)


def _check_attribute(name: str) -> None:
    if is_dunder(name) or name in NONDETERMINISTIC_ATTRIBUTES or name in FORBIDDEN_NAMES:
        raise AttributeError(f"lifecycle code may not access attribute {name!r}")


def _getattr(obj: object, name: str, *default: object) -> Any:
    _check_attribute(name)
    return getattr(obj, name, *default)


def _hasattr(obj: object, name: str) -> bool:
    _check_attribute(name)
    return hasattr(obj, name)


def _setattr(obj: object, name: str, value: object) -> None:
    _check_attribute(name)
    setattr(obj, name, value)
