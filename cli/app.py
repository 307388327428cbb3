"""The ``mlc`` root command: global options and turning errors into readable messages."""

from __future__ import annotations

import os
import sys
import traceback
from typing import TYPE_CHECKING, Annotated

import typer

from cli.context import STATE, err_console
from mlc.errors import MLCError

if TYPE_CHECKING:
    from temporalio.service import RPCError

try:  # newer typer vendors click as typer._click and raises that copy's exceptions
    from typer._click import ClickException
except ImportError:  # older typer runs on click itself
    from click import ClickException  # type: ignore[assignment]

app = typer.Typer(
    name="mlc",
    help="Durable model life cycles on Temporal: DEV -> SIT -> UAT -> PROD with tests and approvals.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help text is plain: `[default: X]` in it is text, not markup
)


def _print_version(value: bool) -> None:
    if value:
        from importlib import metadata

        try:
            version = metadata.version("mlc-orchestrator")
        except metadata.PackageNotFoundError:  # a source tree that was never installed
            version = "unknown"
        print(f"mlc {version}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    home: Annotated[
        str | None, typer.Option("--home", help="State folder (default $MLC_HOME or ~/.mlc).")
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    STATE.debug = debug
    STATE.home = home


COMMAND_MODULES = {
    "model": "inventory_cmds",
    "runtime": "inventory_cmds",
    "user": "inventory_cmds",
    "deployments": "inventory_cmds",
    "history": "inventory_cmds",
    "lifecycle": "lifecycle_cmds",
    "status": "lifecycle_cmds",
    "approve": "lifecycle_cmds",
    "reject": "lifecycle_cmds",
    "rollback": "lifecycle_cmds",
    "dev": "stack_cmds",
    "worker": "stack_cmds",
    "demo": "stack_cmds",
    "key": "trust_cmds",
    "admin": "trust_cmds",
    "policy": "trust_cmds",
    "audit": "trust_cmds",
    "db": "trust_cmds",
    "server": "server_cmds",
    "login": "server_cmds",
}
"""Top-level command -> the module that defines it (``tests/test_cli_usage.py`` checks it)."""


def register_commands(argv: list[str]) -> None:
    """Register the commands ``argv`` can run: only its command's module when it names one.

    Importing all four command modules pulls in Temporal, cryptography, httpx and every
    payload model: most of a command's wall time. ``mlc status`` needs none of that, so a
    known command loads its own module only; help, completion and typos load them all.
    """
    from importlib import import_module

    command = None
    values = iter(argv)
    for arg in values:
        if arg == "--home":  # the root option that takes a value
            next(values, None)
        elif not arg.startswith("-"):
            command = arg
            break
    needs_all = command not in COMMAND_MODULES or "--help" in argv
    for module in sorted(set(COMMAND_MODULES.values())):
        if needs_all or COMMAND_MODULES[command or ""] == module:
            import_module(f"cli.{module}").register(app)


def main() -> None:
    """Entry point: run the app; errors become one red line and an exit code by kind.

    Exit codes: 0 success, 1 other errors, 2 usage errors (unknown command or option,
    missing argument), 3 not found, 4 refused (conflict, permission, failed check),
    5 unavailable (Temporal, PostgreSQL or a runtime cannot be reached).

    The process ends with ``os._exit`` once output is flushed: the Temporal client's
    native threads can otherwise abort the interpreter while it finalizes.
    """
    code = _run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run() -> int:
    try:
        register_commands(sys.argv[1:])
        result = app(standalone_mode=False)
        return result if isinstance(result, int) else 0
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        return 130
    except typer.Exit as exc:
        return int(exc.exit_code)
    except ClickException as exc:  # usage errors (exit code 2) print click's usage lines
        exc.show()
        return exc.exit_code
    except Exception as exc:
        rpc = _rpc_error()
        if not isinstance(exc, MLCError | ValueError) and not (rpc and isinstance(exc, rpc)):
            raise
        if STATE.debug:
            traceback.print_exc()
        message = exc.message if rpc and isinstance(exc, rpc) else str(exc)
        err_console.print(f"[red]error:[/red] {message}", highlight=False)
        return _exit_code(exc)


def _rpc_error() -> type[RPCError] | None:
    """Temporal's RPCError when Temporal was imported (no command raises it otherwise)."""
    service = sys.modules.get("temporalio.service")
    return None if service is None else service.RPCError


_RPC_EXIT_CODES = {
    "NOT_FOUND": 3,
    "ALREADY_EXISTS": 4,
    "FAILED_PRECONDITION": 4,
    "PERMISSION_DENIED": 4,
    "UNAVAILABLE": 5,
    "DEADLINE_EXCEEDED": 5,
}
"""Exit codes by ``RPCStatusCode`` name (so this module need not import Temporal)."""


def _exit_code(exc: Exception) -> int:
    """3 not found, 4 refused, 5 unavailable, 1 anything else (see ``main``)."""
    if isinstance(exc, MLCError):
        return exc.exit_code
    rpc = _rpc_error()
    if rpc is not None and isinstance(exc, rpc):
        return _RPC_EXIT_CODES.get(exc.status.name, 1)
    return 1
