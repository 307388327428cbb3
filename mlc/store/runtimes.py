"""Runtimes: where models can run, tagged with a stage and service tags."""

from __future__ import annotations

import asyncpg

from mlc.domain import Runtime
from mlc.errors import ConflictError, NotFoundError
from mlc.store.db import row_dict

_COLUMNS = (
    "name, kind, stage, service_tags, modes, task_queue, docker, restart, kafka, gateway, hosting, "
    "model_network"
)


def _runtime(row: asyncpg.Record) -> Runtime:
    return Runtime.model_validate(row_dict(row))


async def create_runtime(pool: asyncpg.Pool, runtime: Runtime, *, replace: bool = False) -> Runtime:
    """Add a runtime; with ``replace`` an existing one of the same name is overwritten."""
    data = runtime.model_dump(mode="json")
    conflict = (
        "ON CONFLICT (name) DO UPDATE SET kind = EXCLUDED.kind, stage = EXCLUDED.stage, "
        "service_tags = EXCLUDED.service_tags, modes = EXCLUDED.modes, "
        "task_queue = EXCLUDED.task_queue, docker = EXCLUDED.docker, restart = EXCLUDED.restart, "
        "kafka = EXCLUDED.kafka, gateway = EXCLUDED.gateway, hosting = EXCLUDED.hosting, "
        "model_network = EXCLUDED.model_network"
        if replace
        else "ON CONFLICT (name) DO NOTHING"
    )
    row = await pool.fetchrow(
        f"INSERT INTO runtimes ({_COLUMNS}) "
        f"VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) {conflict} "
        f"RETURNING {_COLUMNS}",
        data["name"],
        data["kind"],
        data["stage"],
        data["service_tags"],
        data["modes"],
        data["task_queue"],
        data["docker"],
        data["restart"],
        data["kafka"],
        data["gateway"],
        data["hosting"],
        data["model_network"],
    )
    if row is None:
        raise ConflictError(f"runtime {runtime.name} already exists; use --replace to overwrite it")
    return _runtime(row)


async def read_runtime(pool: asyncpg.Pool, name: str) -> Runtime:
    """Return runtime ``name`` or raise NotFoundError."""
    row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM runtimes WHERE name = $1", name)
    if row is None:
        raise NotFoundError(f"runtime {name} does not exist; see `mlc runtime list`")
    return _runtime(row)


async def read_runtimes(
    pool: asyncpg.Pool,
    *,
    stage: str | None = None,
    after: tuple[str, str] | None = None,
    limit: int | None = None,
) -> list[Runtime]:
    """Runtimes by stage and name, optionally only those of one stage; ``after`` a (stage,
    name) cursor and ``limit`` for pages."""
    rows = await pool.fetch(
        f"""SELECT {_COLUMNS} FROM runtimes
            WHERE ($1::text IS NULL OR stage = $1) AND ($2::text IS NULL OR (stage, name) > ($2, $3))
            ORDER BY stage, name LIMIT $4""",
        stage,
        after[0] if after else None,
        after[1] if after else "",
        limit,
    )
    return [_runtime(r) for r in rows]


async def delete_runtime(pool: asyncpg.Pool, name: str) -> None:
    """Remove a runtime that has no live deployments."""
    live = await pool.fetchval(
        "SELECT count(*) FROM deployments WHERE runtime = $1 AND state IN ('deploying','serving')",
        name,
    )
    if live:
        raise ConflictError(f"runtime {name} still has {live} live deployment(s); retire them first")
    status = await pool.execute("DELETE FROM runtimes WHERE name = $1", name)
    if status.endswith(" 0"):
        raise NotFoundError(f"runtime {name} does not exist")
