"""The audit trail: test results, approval decisions and notifications."""

from __future__ import annotations

from typing import Any

import asyncpg

from mlc.domain import ApprovalRecord, StageTestReport
from mlc.store.db import row_dict


async def record_test_report(
    pool: asyncpg.Pool,
    *,
    workflow_id: str,
    run_id: str,
    model: str,
    version: int,
    report: StageTestReport,
) -> None:
    """Store every result of a stage's tests (idempotent per run, stage and deployment)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "DELETE FROM test_results WHERE workflow_id = $1 AND run_id = $2 AND stage = $3",
            workflow_id,
            run_id,
            report.stage,
        )
        await conn.executemany(
            """INSERT INTO test_results (workflow_id, run_id, model, version, stage,
                                         deployment_id, test, passed, summary, metrics)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)""",
            [
                (
                    workflow_id,
                    run_id,
                    model,
                    version,
                    report.stage,
                    r.deployment_id,
                    r.test.value,
                    r.passed,
                    r.summary,
                    r.metrics,
                )
                for r in report.results
            ],
        )


async def record_decision(
    pool: asyncpg.Pool,
    *,
    workflow_id: str,
    run_id: str,
    model: str,
    version: int,
    record: ApprovalRecord,
) -> None:
    """Store one gate decision with its evidence; a retried activity writes it once."""
    await pool.execute(
        """INSERT INTO approvals (workflow_id, run_id, model, version, stage, decision,
                                  approver, comment, evidence, decided_at)
           SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10
           WHERE NOT EXISTS (SELECT 1 FROM approvals WHERE workflow_id = $1 AND run_id = $2
                             AND stage = $5 AND decided_at = $10)""",
        workflow_id,
        run_id,
        model,
        version,
        record.stage,
        record.decision.value,
        record.approver,
        record.comment,
        record.evidence.model_dump(mode="json") if record.evidence else None,
        record.decided_at,
    )


async def read_decisions(pool: asyncpg.Pool, model: str, version: int) -> list[dict[str, Any]]:
    """Every decision about a snapshot, oldest first."""
    rows = await pool.fetch(
        "SELECT * FROM approvals WHERE model = $1 AND version = $2 ORDER BY decided_at", model, version
    )
    return [r for r in (row_dict(x) for x in rows) if r is not None]


async def read_test_results(pool: asyncpg.Pool, model: str, version: int) -> list[dict[str, Any]]:
    """Every test result of a snapshot, oldest first."""
    rows = await pool.fetch(
        "SELECT * FROM test_results WHERE model = $1 AND version = $2 ORDER BY recorded_at, id",
        model,
        version,
    )
    return [r for r in (row_dict(x) for x in rows) if r is not None]


async def create_notification(
    pool: asyncpg.Pool, *, workflow_id: str, model: str | None, version: int | None, message: str
) -> None:
    """Store a notification for people watching a lifecycle."""
    await pool.execute(
        "INSERT INTO notifications (workflow_id, model, version, message) VALUES ($1, $2, $3, $4)",
        workflow_id,
        model,
        version,
        message,
    )
