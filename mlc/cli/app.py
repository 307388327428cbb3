"""The ``mlc`` root command: global options and turning errors into readable messages."""

from __future__ import annotations

import sys
from typing import Annotated

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
    home: Annotated[str | None, typer.Option("--home", help="State folder (default $MLC_HOME or ~/.mlc).")] = None,
) -> None:
    STATE.debug = debug
    STATE.home = home


inventory_cmds.register(app)
lifecycle_cmds.register(app)
stack_cmds.register(app)


def main() -> None:
    """Entry point: run the app; errors become one red line and exit code 1."""
    try:
        app(standalone_mode=False)
    except (MLCError, RPCError, ValueError) as exc:
        if STATE.debug:
            raise
        message = exc.message if isinstance(exc, RPCError) else str(exc)
        err_console.print(f"[red]error:[/red] {message}", highlight=False)
        sys.exit(1)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
