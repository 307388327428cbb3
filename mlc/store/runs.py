"""Lifecycle runs: one row per workflow run, at most one active per snapshot."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import asyncpg

from mlc.errors import ConflictError
from mlc.store.db import row_dict


async def start_run(
    pool: asyncpg.Pool,
    *,
    workflow_id: str,
    run_id: str,
    model: str,
    version: int,
    lifecycle: str,
    started_by: str | None = None,
) -> None:
    """Record a run as active; refuse a second active run for the same snapshot."""
    try:
        await pool.execute(
            """INSERT INTO lifecycle_runs (workflow_id, run_id, model, version, lifecycle, state, started_by)
               VALUES ($1, $2, $3, $4, $5, 'starting', $6)
               ON CONFLICT (workflow_id, run_id) DO NOTHING""",
            workflow_id,
            run_id,
            model,
            version,
            lifecycle,
            started_by,
        )
    except asyncpg.UniqueViolationError:
        other = await find_active_run(pool, model, version)
        where = other["workflow_id"] if other else "another workflow"
        raise ConflictError(
            f"{model}@{version} already has a running lifecycle ({where}); a snapshot runs one "
            "lifecycle at a time: wait for it or terminate it"
        ) from None


async def update_run(
    pool: asyncpg.Pool,
    *,
    workflow_id: str,
    run_id: str,
    state: str,
    stage: str | None,
    reason: str | None = None,
    ended: bool = False,
) -> None:
    """Record where a run stands; ``ended`` frees the snapshot for a new run."""
    await pool.execute(
        """UPDATE lifecycle_runs SET state = $3, stage = $4, reason = $5,
               ended_at = CASE WHEN $6 THEN COALESCE(ended_at, now()) ELSE NULL END
           WHERE workflow_id = $1 AND run_id = $2""",
        workflow_id,
        run_id,
        state,
        stage,
        reason,
        ended,
    )


async def read_run(pool: asyncpg.Pool, workflow_id: str, run_id: str) -> dict[str, Any] | None:
    """One run by its Temporal ids, if it has begun."""
    row = await pool.fetchrow(
        "SELECT * FROM lifecycle_runs WHERE workflow_id = $1 AND run_id = $2", workflow_id, run_id
    )
    return row_dict(row)


async def in_flight(pool: asyncpg.Pool, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which of the runs ``keys`` (workflow id, run id) have begun and not ended, in one query."""
    wanted = sorted(set(keys))
    if not wanted:
        return set()
    rows = await pool.fetch(
        """SELECT r.workflow_id, r.run_id FROM lifecycle_runs r
           JOIN unnest($1::text[], $2::text[]) AS k(workflow_id, run_id)
             ON r.workflow_id = k.workflow_id AND r.run_id = k.run_id
           WHERE r.ended_at IS NULL""",
        [w for w, _ in wanted],
        [r for _, r in wanted],
    )
    return {(row["workflow_id"], row["run_id"]) for row in rows}


async def find_active_run(pool: asyncpg.Pool, model: str, version: int) -> dict[str, Any] | None:
    """The active run of a snapshot, if any."""
    row = await pool.fetchrow(
        "SELECT * FROM lifecycle_runs WHERE model = $1 AND version = $2 AND ended_at IS NULL",
        model,
        version,
    )
    return row_dict(row)


async def read_runs(
    pool: asyncpg.Pool,
    *,
    model: str | None = None,
    version: int | None = None,
    after: tuple[datetime, str, str] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Runs, newest first, optionally of one model or snapshot; ``after`` a (started_at,
    workflow id, run id) cursor and ``limit`` for pages."""
    rows = await pool.fetch(
        """SELECT * FROM lifecycle_runs
           WHERE ($1::text IS NULL OR model = $1) AND ($2::int IS NULL OR version = $2)
             AND ($3::timestamptz IS NULL OR (started_at, workflow_id, run_id) < ($3, $4, $5))
           ORDER BY started_at DESC, workflow_id DESC, run_id DESC LIMIT $6""",
        model,
        version,
        after[0] if after else None,
        after[1] if after else "",
        after[2] if after else "",
        limit,
    )
    return [r for r in (row_dict(x) for x in rows) if r is not None]


async def read_latest_of(pool: asyncpg.Pool, refs: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """The newest run of each snapshot in ``refs`` (model, version) that has one, in one query."""
    rows = await pool.fetch(
        """SELECT DISTINCT ON (model, version) * FROM lifecycle_runs
           WHERE (model, version) IN (SELECT * FROM unnest($1::text[], $2::int[]))
           ORDER BY model, version, started_at DESC LIMIT $3""",
        [m for m, _ in refs],
        [v for _, v in refs],
        len(refs),
    )
    return [r for r in (row_dict(x) for x in rows) if r is not None]


async def read_waiting(pool: asyncpg.Pool, *, limit: int) -> list[dict[str, Any]]:
    """Runs waiting at a gate, the longest-waiting first (by when the run began), at most ``limit``."""
    rows = await pool.fetch(
        """SELECT * FROM lifecycle_runs WHERE state = 'awaiting_approval' AND ended_at IS NULL
           ORDER BY started_at, workflow_id LIMIT $1""",
        limit,
    )
    return [r for r in (row_dict(x) for x in rows) if r is not None]


async def read_recent(pool: asyncpg.Pool, *, model: str, limit: int) -> list[dict[str, Any]]:
    """A model's newest runs first, at most ``limit``."""
    rows = await pool.fetch(
        "SELECT * FROM lifecycle_runs WHERE model = $1 ORDER BY started_at DESC LIMIT $2", model, limit
    )
    return [r for r in (row_dict(x) for x in rows) if r is not None]
