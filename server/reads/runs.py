"""Lifecycle runs and one run's status (``mlc status``)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic_core import to_jsonable_python

from mlc.lifecycle_client import find_handle, recorded_status
from mlc.store import runs

if TYPE_CHECKING:
    import asyncpg
    from temporalio.client import Client

    from mlc.contracts.lifecycle import LifecycleStatus
    from mlc.domain import ModelRef

RUN_COLUMNS = ["model", "version", "lifecycle", "state", "stage", "reason", "workflow_id"]


async def run_rows(
    pool: asyncpg.Pool, *, after: tuple[datetime, str, str] | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Runs newest first, as JSON values (times in ISO 8601, whoever prints them)."""
    rows: list[dict[str, Any]] = to_jsonable_python(await runs.read_runs(pool, after=after, limit=limit))
    return rows


def run_key(row: dict[str, Any]) -> tuple[datetime, str, str]:
    """A run's place in :func:`run_rows`' order."""
    return datetime.fromisoformat(row["started_at"]), row["workflow_id"], row["run_id"]


async def run_status(pool: asyncpg.Pool, client: Client, ref: ModelRef) -> LifecycleStatus | None:
    """The newest run of ``ref``: its ``status`` query with the test reports the trail holds
    (None while it is starting)."""
    return await recorded_status(pool, await find_handle(client, pool, ref))
