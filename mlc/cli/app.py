"""The ``mlc`` root command: global options and turning errors into readable messages."""

from __future__ import annotations

import os
import sys
import traceback
from importlib import metadata
from typing import Annotated

import typer
from temporalio.service import RPCError, RPCStatusCode

from mlc.cli import inventory_cmds, lifecycle_cmds, stack_cmds, trust_cmds
from mlc.cli.context import STATE, err_console
from mlc.errors import MLCError

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
)


def _print_version(value: bool) -> None:
    if value:
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


inventory_cmds.register(app)
lifecycle_cmds.register(app)
stack_cmds.register(app)
trust_cmds.register(app)


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
        result = app(standalone_mode=False)
        return result if isinstance(result, int) else 0
    except (MLCError, RPCError, ValueError) as exc:
        if STATE.debug:
            traceback.print_exc()
        message = exc.message if isinstance(exc, RPCError) else str(exc)
        err_console.print(f"[red]error:[/red] {message}", highlight=False)
        return _exit_code(exc)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        return 130
    except typer.Exit as exc:
        return int(exc.exit_code)
    except ClickException as exc:  # usage errors (exit code 2) print click's usage lines
        exc.show()
        return exc.exit_code


_RPC_EXIT_CODES = {
    RPCStatusCode.NOT_FOUND: 3,
    RPCStatusCode.ALREADY_EXISTS: 4,
    RPCStatusCode.FAILED_PRECONDITION: 4,
    RPCStatusCode.PERMISSION_DENIED: 4,
    RPCStatusCode.UNAVAILABLE: 5,
    RPCStatusCode.DEADLINE_EXCEEDED: 5,
}


def _exit_code(exc: Exception) -> int:
    """3 not found, 4 refused, 5 unavailable, 1 anything else (see ``main``)."""
    if isinstance(exc, MLCError):
        return exc.exit_code
    if isinstance(exc, RPCError):
        return _RPC_EXIT_CODES.get(exc.status, 1)
    return 1
