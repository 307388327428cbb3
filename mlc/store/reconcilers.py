"""Runtime reconcilers: the run a trusted worker started for each reconciler workflow id.

Starting and checking take one transaction-scoped advisory lock per workflow id, so a
reconciler's first activity waits until the worker that started it has recorded it.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

_LOCK_SPACE = 727_003
"""First key of the two-key advisory locks (the second is a crc32 of the workflow id)."""


@asynccontextmanager
async def starting(pool: asyncpg.Pool, workflow_id: str) -> AsyncIterator[asyncpg.Connection]:
    """Hold the reconciler's start lock (exclusive) for the block; write with the connection."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", _LOCK_SPACE, _key(workflow_id))
        yield conn


async def read_first_run(pool_or_conn: asyncpg.Pool | asyncpg.Connection, workflow_id: str) -> str | None:
    """The recorded first run id of the reconciler's chain.

    From a pool it waits for a start in progress (shared lock); pass the connection of
    :func:`starting` to read inside the start.
    """
    if not isinstance(pool_or_conn, asyncpg.Pool):
        return await _first_run(pool_or_conn, workflow_id)
    async with pool_or_conn.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock_shared($1, $2)", _LOCK_SPACE, _key(workflow_id))
        return await _first_run(conn, workflow_id)


async def record_first_run(
    conn: asyncpg.Connection, workflow_id: str, runtime: str, first_run_id: str
) -> None:
    """Record the chain a trusted worker just started (replacing any earlier one)."""
    await conn.execute(
        """INSERT INTO reconcilers (workflow_id, runtime, first_run_id) VALUES ($1, $2, $3)
           ON CONFLICT (workflow_id) DO UPDATE
           SET runtime = EXCLUDED.runtime, first_run_id = EXCLUDED.first_run_id, started_at = now()""",
        workflow_id,
        runtime,
        first_run_id,
    )


async def _first_run(conn: asyncpg.Connection, workflow_id: str) -> str | None:
    found: str | None = await conn.fetchval(
        "SELECT first_run_id FROM reconcilers WHERE workflow_id = $1", workflow_id
    )
    return found


def _key(workflow_id: str) -> int:
    """A signed 32-bit key for the workflow id (advisory locks take int4 pairs)."""
    return zlib.crc32(workflow_id.encode()) - 2**31
