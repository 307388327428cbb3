"""The ``mlc`` root command: global options and turning errors into readable messages."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated

import click
import typer
from temporalio.service import RPCError

from mlc.cli import inventory_cmds, lifecycle_cmds, stack_cmds
from mlc.cli.context import STATE, err_console
from mlc.errors import MLCError

app = typer.Typer(
    name="mlc",
    help="Durable model life cycles on Temporal: DEV -> SIT -> UAT -> PROD with tests and approvals.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    home: Annotated[
        str | None, typer.Option("--home", help="State folder (default $MLC_HOME or ~/.mlc).")
    ] = None,
) -> None:
    STATE.debug = debug
    STATE.home = home


inventory_cmds.register(app)
lifecycle_cmds.register(app)
stack_cmds.register(app)


def main() -> None:
    """Entry point: run the app; errors become one red line and exit code 1.

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
        return 1
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        return 130
    except typer.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
