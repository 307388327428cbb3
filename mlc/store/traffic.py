"""The traffic table: which deployments answer each model's stable endpoint per runtime.

One row per (runtime, model), kept current by the trusted inventory worker after a change
was authorized and applied; what served when is in the audit trail (kind ``traffic``).
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from mlc.domain import TrafficRoute
from mlc.store.db import row_dict
from mlc.traffic import TrafficTable

_COLUMNS = "runtime, model, stage, routes, endpoint, workflow_id, run_id, updated_at, decided_at"


def _table(row: asyncpg.Record) -> TrafficTable:
    return TrafficTable.model_validate(row_dict(row))


async def upsert_traffic(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    runtime: str,
    model: str,
    stage: str,
    routes: tuple[TrafficRoute, ...],
    endpoint: str,
    workflow_id: str | None,
    run_id: str | None,
    decided_at: datetime | None = None,
) -> TrafficTable | None:
    """Set the routes live behind ``model``'s endpoint on ``runtime`` (idempotent), unless
    the table holds a change decided after ``decided_at`` (None: now): then nothing changes
    and None is returned. The row stays locked until ``conn``'s transaction ends."""
    row = await conn.fetchrow(
        f"""INSERT INTO traffic (runtime, model, stage, routes, endpoint, workflow_id, run_id, decided_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, coalesce($8, now()))
            ON CONFLICT (runtime, model) DO UPDATE SET stage = EXCLUDED.stage,
                routes = EXCLUDED.routes, endpoint = EXCLUDED.endpoint,
                workflow_id = EXCLUDED.workflow_id, run_id = EXCLUDED.run_id, updated_at = now(),
                decided_at = EXCLUDED.decided_at
            WHERE traffic.decided_at IS NULL OR traffic.decided_at <= EXCLUDED.decided_at
            RETURNING {_COLUMNS}""",
        runtime,
        model,
        stage,
        [r.model_dump(mode="json") for r in routes],
        endpoint,
        workflow_id,
        run_id,
        decided_at,
    )
    return None if row is None else _table(row)


async def read_traffic(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    runtime: str | None = None,
    model: str | None = None,
    stage: str | None = None,
    after: tuple[str, str, str] | None = None,
    limit: int | None = None,
) -> list[TrafficTable]:
    """Stable endpoints, filtered, ordered by stage, model and runtime; ``after`` a (stage,
    model, runtime) cursor and ``limit`` for pages."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM traffic
            WHERE ($1::text IS NULL OR runtime = $1) AND ($2::text IS NULL OR model = $2)
              AND ($3::text IS NULL OR stage = $3)
              AND ($4::text IS NULL OR (stage, model, runtime) > ($4, $5, $6))
            ORDER BY stage, model, runtime LIMIT $7""",
        runtime,
        model,
        stage,
        *(after or (None, "", "")),
        limit,
    )
    return [_table(r) for r in rows]


async def read_one(
    conn: asyncpg.Connection | asyncpg.Pool, runtime: str, model: str, *, lock: bool = False
) -> TrafficTable | None:
    """The stable endpoint of ``model`` on ``runtime``, if anything was ever routed there
    (``lock``: the row stays locked until ``conn``'s transaction ends)."""
    if not lock:
        found = await read_traffic(conn, runtime=runtime, model=model)
        return found[0] if found else None
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM traffic WHERE runtime = $1 AND model = $2 FOR UPDATE", runtime, model
    )
    return None if row is None else _table(row)


async def read_traffic_of(
    conn: asyncpg.Connection | asyncpg.Pool, models: list[str], *, limit: int = 500
) -> list[TrafficTable]:
    """The stable endpoints of ``models``, at most ``limit``, ordered by model, stage, runtime."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM traffic WHERE model = ANY($1::text[])
            ORDER BY model, stage, runtime LIMIT $2""",
        models,
        limit,
    )
    return [_table(r) for r in rows]
