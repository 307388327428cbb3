"""Deployments: which snapshot runs on which runtime, in which stage, mode and state."""

from __future__ import annotations

import asyncpg

from mlc.domain import Deployment, DeploymentState
from mlc.store.db import row_dict

_COLUMNS = (
    "id, model, version, runtime, stage, mode, state, endpoint, workflow_id, details, created_at, updated_at"
)
LIVE = (DeploymentState.DEPLOYING.value, DeploymentState.SERVING.value)


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
    pool: asyncpg.Pool,
    *,
    live_only: bool = True,
    model: str | None = None,
    stage: str | None = None,
    runtime: str | None = None,
) -> list[Deployment]:
    """Deployments, newest last; by default only those deploying or serving."""
    rows = await pool.fetch(
        f"""SELECT {_COLUMNS} FROM deployments
            WHERE (NOT $1 OR state = ANY($2::text[]))
              AND ($3::text IS NULL OR model = $3)
              AND ($4::text IS NULL OR stage = $4)
              AND ($5::text IS NULL OR runtime = $5)
            ORDER BY created_at, id""",
        live_only,
        list(LIVE),
        model,
        stage,
        runtime,
    )
    return [Deployment.model_validate(row_dict(r)) for r in rows]
