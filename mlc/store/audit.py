"""Reading the audit trail by snapshot, and notifications for people following a lifecycle."""

from __future__ import annotations

from typing import Any

import asyncpg

from mlc.store import trail


async def read_decisions(pool: asyncpg.Pool, model: str, version: int) -> list[dict[str, Any]]:
    """Every decision about a snapshot, oldest first (signed ones carry ``key_id``)."""
    entries = await trail.read_entries(pool, kinds=(trail.DECISION,), model=model, version=version)
    return [decision_row(e) for e in entries]


async def read_test_results(pool: asyncpg.Pool, model: str, version: int) -> list[dict[str, Any]]:
    """Every test result of a snapshot, oldest first, one row per test and deployment."""
    entries = await trail.read_entries(pool, kinds=(trail.TEST_REPORT,), model=model, version=version)
    return [row for e in entries for row in test_rows(e)]


def decision_row(entry: trail.Entry) -> dict[str, Any]:
    """A decision entry as ``mlc audit show`` lists it."""
    return {**entry.data(), "seq": entry.seq, "workflow_id": entry.workflow_id, "run_id": entry.run_id}


def test_rows(entry: trail.Entry) -> list[dict[str, Any]]:
    """A test report entry as ``mlc audit show`` lists it: one row per test and deployment."""
    body = entry.data()
    return [
        {
            **result,
            "stage": body["stage"],
            "seq": entry.seq,
            "workflow_id": entry.workflow_id,
            "run_id": entry.run_id,
        }
        for result in body["report"]["results"]
    ]


async def create_notification(
    pool: asyncpg.Pool,
    *,
    workflow_id: str,
    model: str | None,
    version: int | None,
    message: str,
    idempotency_key: str | None = None,
) -> bool:
    """Store a notification for people watching a lifecycle; False when ``idempotency_key``
    was stored already (a retried activity must not tell people twice)."""
    status: str = await pool.execute(
        "INSERT INTO notifications (workflow_id, model, version, message, idempotency_key) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (idempotency_key) DO NOTHING",
        workflow_id,
        model,
        version,
        message,
        idempotency_key,
    )
    return status.endswith(" 1")
