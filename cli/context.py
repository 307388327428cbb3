"""What every command needs: settings, the inventory pool, the Temporal client, output."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.stack.devstack import discover
from mlc.config import Settings
from mlc.errors import RuntimeUnavailableError
from mlc.store import connect

if TYPE_CHECKING:  # Temporal and the signer load only in the commands that use them
    import asyncpg
    from temporalio.client import Client

    from cli.api_client import ApiClient
    from mlc.trust.signer import Signer

_PIPE_WIDTH = 100_000
"""Rich assumes 80 columns when output is not a terminal and wraps there; a script that
greps the output needs each message on one line, so a pipe gets no wrapping at all (tables
keep their natural width, text is never broken)."""


def _console(*, stderr: bool = False) -> Console:
    """A terminal's console wraps at its width; a pipe's or file's never wraps."""
    if (sys.stderr if stderr else sys.stdout).isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=_PIPE_WIDTH, soft_wrap=True)


console = _console()
err_console = _console(stderr=True)
T = TypeVar("T")


class State:
    """Options shared by every command (set by the top-level callback)."""

    debug: bool = False
    home: str | None = None


STATE = State()


def settings() -> Settings:
    """Settings from the environment, pointed at a running ``mlc dev`` if there is one."""
    from pathlib import Path

    return discover(Settings.from_env(home=Path(STATE.home) if STATE.home else None))


def local_user() -> str:
    """The OS user name: the principal ``mlc dev`` registers for whoever runs it."""
    return os.environ.get("MLC_USER") or getpass.getuser()


async def signer(cfg: Settings, pool: asyncpg.Pool) -> Signer:
    """Who is acting: the principal owning the signing key (``mlc key create`` / MLC_SIGNING_KEY).

    Nobody can act as someone else by typing a name: the key decides.
    """
    from cli.admin import identify
    from mlc.trust.keys import load_private_key

    return await identify(pool, cfg, load_private_key())


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine."""
    return asyncio.run(coro)


def api(cfg: Settings) -> ApiClient | None:
    """The control plane's client when ``MLC_API_URL`` is set (signing with the user's key)."""
    if not cfg.api_url:
        return None
    from cli.api_client import ApiClient
    from mlc.trust.keys import load_private_key

    return ApiClient(cfg.api_url, load_private_key())


def _direct(cfg: Settings, what: str) -> None:
    """A command that would open the database or Temporal itself refuses under the API: it
    must not silently bypass the server's authentication and trail."""
    if cfg.api_url:
        raise RuntimeUnavailableError(
            f"this command needs {what} directly, but MLC_API_URL is set ({cfg.api_url}): run it on a "
            "server or worker host without MLC_API_URL"
        )


async def rows(
    cfg: Settings, path: str, direct: Callable[[asyncpg.Pool], Awaitable[Sequence[T]]], **params: Any
) -> Sequence[T] | list[Any]:
    """A list command's rows: every page of ``path`` when ``MLC_API_URL`` is set, else
    ``direct`` over the inventory (the query the server's route runs, so both print alike)."""
    remote = api(cfg)
    if remote is not None:
        async with remote:
            return [item async for item in remote.pages(path, **params)]
    async with inventory(cfg) as pool:
        return await direct(pool)


@asynccontextmanager
async def inventory(cfg: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A migrated pool for the command's duration."""
    _direct(cfg, "the inventory database")
    if not cfg.database_url:
        raise RuntimeUnavailableError(
            "no inventory database: start `mlc dev` (in another terminal) or set MLC_DATABASE_URL"
        )
    pool = await connect(cfg.database_url, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


async def client(cfg: Settings, *, identity: str | None = None) -> Client:
    """A Temporal client with the project's data converter (``identity``: who is acting)."""
    _direct(cfg, "Temporal")
    from workers.client import connect as connect_client

    return await connect_client(cfg, identity=identity)


def emit(
    rows: Sequence[BaseModel | dict[str, Any]], *, as_json: bool, columns: Sequence[str], title: str
) -> None:
    """Print ``rows`` as JSON (``--json``) or as a rich table of ``columns``."""
    dicts = [r.model_dump(mode="json") if isinstance(r, BaseModel) else r for r in rows]
    if as_json:
        print(json.dumps(dicts, indent=2, default=str))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in dicts:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(table)


def _cell(value: Any) -> str:
    """A table cell's text, escaped: brackets in values are text, not rich markup."""
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return escape(", ".join(str(v) for v in value))
    return escape(str(value))
