"""What served when: a model's traffic changes from the audit trail (``mlc history``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlc.store import trail

if TYPE_CHECKING:
    import asyncpg

HISTORY_COLUMNS = ["when", "stage", "runtime", "versions", "cause", "actor", "workflow_id"]


async def traffic_rows(
    pool: asyncpg.Pool, model: str, *, stage: str | None, after: int = 0, limit: int | None = None
) -> list[dict[str, Any]]:
    """Every traffic change of ``model``'s stable endpoints (of ``stage``), oldest first,
    with the shares, the cause and who or what caused it; ``after`` a trail ``seq``."""
    entries = await trail.read_entries(
        pool, kinds=(trail.TRAFFIC,), model=model, stage=stage, after=after, limit=limit
    )
    rows = []
    for entry in entries:
        body = entry.data()
        rows.append(
            {
                "when": body.get("recorded_at"),
                "stage": body.get("stage"),
                "runtime": body.get("runtime"),
                "endpoint": body.get("endpoint"),
                "versions": body.get("shares"),
                "routes": body.get("routes"),
                "previous": body.get("previous"),
                "cause": body.get("cause"),
                "actor": body.get("actor"),
                "superseded_by": body.get("superseded_by"),
                "version": entry.version,
                "workflow_id": entry.workflow_id,
                "run_id": entry.run_id,
                "seq": entry.seq,
            }
        )
    return rows
