"""Deployments: which snapshot runs on which runtime, in which stage, mode and state."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from mlc.domain import Deployment, DeploymentState
from mlc.store.db import row_dict

_COLUMNS = (
    "id, model, version, runtime, stage, mode, state, endpoint, workflow_id, details, created_at, updated_at"
)
LIVE = (DeploymentState.DEPLOYING.value, DeploymentState.SERVING.value)
KEPT = (*LIVE, DeploymentState.COMPLETED.value)
"""States whose files and processes on a runtime are not leftovers: live deployments, and
finished batch jobs (their output is the job's result). ``runtime cleanup`` keeps them."""


async def kept_ids(pool: asyncpg.Pool, *, runtime: str | None = None) -> tuple[str, ...]:
    """Ids of the deployments a runtime's cleanup must keep (see :data:`KEPT`)."""
    rows = await pool.fetch(
        "SELECT id FROM deployments WHERE state = ANY($1::text[]) AND ($2::text IS NULL OR runtime = $2)",
        list(KEPT),
        runtime,
    )
    return tuple(r["id"] for r in rows)


async def upsert_deployment(pool: asyncpg.Pool, deployment: Deployment) -> Deployment:
    """Insert or update a deployment by id (activities retry, so this must be idempotent)."""
    d = deployment.model_dump(mode="json")
    row = await pool.fetchrow(
        f"""INSERT INTO deployments (id, model, version, runtime, stage, mode, state, endpoint,
                                     workflow_id, details)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, endpoint = EXCLUDED.endpoint,
                details = deployments.details || EXCLUDED.details, updated_at = now()
            RETURNING {_COLUMNS}""",
        d["id"],
        d["model"],
        d["version"],
        d["runtime"],
        d["stage"],
        d["mode"],
        d["state"],
        d["endpoint"],
        d["workflow_id"],
        d["details"],
    )
    return Deployment.model_validate(row_dict(row))


async def read_deployment(pool: asyncpg.Pool, deployment_id: str) -> Deployment | None:
    """One deployment by id, if it exists."""
    row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM deployments WHERE id = $1", deployment_id)
    return Deployment.model_validate(row_dict(row)) if row else None


async def read_deployments(
    pool: asyncpg.Connection | asyncpg.Pool,
    *,
    live_only: bool = True,
    model: str | None = None,
    stage: str | None = None,
    runtime: str | None = None,
    after: tuple[datetime, str] | None = None,
    limit: int | None = None,
) -> list[Deployment]:
    """Deployments, newest last; by default only those deploying or serving; ``after`` a
    (created_at, id) cursor and ``limit`` for pages."""
    rows = await pool.fetch(
        f"""SELECT {_COLUMNS} FROM deployments
            WHERE (NOT $1 OR state = ANY($2::text[]))
              AND ($3::text IS NULL OR model = $3)
              AND ($4::text IS NULL OR stage = $4)
              AND ($5::text IS NULL OR runtime = $5)
              AND ($6::timestamptz IS NULL OR (created_at, id) > ($6, $7))
            ORDER BY created_at, id LIMIT $8""",
        live_only,
        list(LIVE),
        model,
        stage,
        runtime,
        after[0] if after else None,
        after[1] if after else "",
        limit,
    )
    return [Deployment.model_validate(row_dict(r)) for r in rows]


async def update_serving(
    pool: asyncpg.Connection | asyncpg.Pool,
    deployment_id: str,
    *,
    state: DeploymentState,
    details: dict[str, object],
    endpoint: str | None = None,
    while_in: tuple[DeploymentState, ...] = (DeploymentState.SERVING,),
) -> Deployment | None:
    """Change a deployment only while it is ``serving`` (or in ``while_in``; None when it
    no longer is).

    The reconciler writes through this, so a deployment its lifecycle retired or failed
    meanwhile is never turned back or overwritten.
    """
    row = await pool.fetchrow(
        f"""UPDATE deployments SET state = $2, endpoint = coalesce($3, endpoint),
                details = details || $4::jsonb, updated_at = now()
            WHERE id = $1 AND state = ANY($5::text[])
            RETURNING {_COLUMNS}""",
        deployment_id,
        state.value,
        endpoint,
        details,
        [s.value for s in while_in],
    )
    return Deployment.model_validate(row_dict(row)) if row else None


async def read_live_of(
    pool: asyncpg.Connection | asyncpg.Pool, refs: list[tuple[str, int]], *, limit: int = 1000
) -> list[Deployment]:
    """The live deployments of the snapshots ``refs`` (model, version), at most ``limit``,
    in one query (a page of snapshots asks once, not once per snapshot)."""
    rows = await pool.fetch(
        f"""SELECT {_COLUMNS} FROM deployments
            WHERE state = ANY($1::text[])
              AND (model, version) IN (SELECT * FROM unnest($2::text[], $3::int[]))
            ORDER BY model, version, stage, runtime LIMIT $4""",
        list(LIVE),
        [m for m, _ in refs],
        [v for _, v in refs],
        limit,
    )
    return [Deployment.model_validate(row_dict(r)) for r in rows]
