"""Helpers for lifecycle tests: start like the Web UI, wait for gates, read the inventory."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import asyncpg
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowHandle
from temporalio.common import RawValue

from mlc.contracts.lifecycle import LifecycleResult, LifecycleStatus
from mlc.domain import LifecycleState, ModelSnapshot
from mlc.lifecycle_client import read_status
from mlc.store import trail


async def start_like_ui(
    client: Client,
    body: dict[str, Any],
    *,
    workflow_id: str,
    task_queue: str,
    workflow: str = "ModelLifecycle",
) -> WorkflowHandle[Any, Any]:
    """Start a workflow the way the Web UI's start form does: one raw json/plain payload."""
    raw = Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(body).encode())
    return await client.start_workflow(
        workflow, RawValue(raw), id=workflow_id, task_queue=task_queue, result_type=LifecycleResult
    )


async def wait_for(
    handle: WorkflowHandle[Any, Any], predicate: Any, *, timeout: float = 90.0, what: str = "state"
) -> LifecycleStatus:
    """Poll the status query until ``predicate(status)`` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: LifecycleStatus | None = None
    while asyncio.get_running_loop().time() < deadline:
        last = await read_status(handle)
        if last is not None and predicate(last):
            return last
        if last is not None and last.state is LifecycleState.FAILED:
            raise AssertionError(f"lifecycle failed while waiting for {what}: {last.reason}")
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last status: {last}")


async def wait_for_gate(handle: WorkflowHandle[Any, Any], stage: str) -> LifecycleStatus:
    """Wait until the run waits for a decision at ``stage``."""
    return await wait_for(
        handle,
        lambda s: s.pending_gate is not None and s.pending_gate.stage == stage,
        what=f"the gate at {stage}",
    )


HISTORIES = Path(__file__).parent / "histories"


async def keep_history(handle: WorkflowHandle[Any, Any], workflow: str, name: str) -> None:
    """With MLC_RECORD_HISTORIES=1, save the run's history for the replay test."""
    if os.environ.get("MLC_RECORD_HISTORIES") != "1":
        return
    target = HISTORIES / workflow / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text((await handle.fetch_history()).to_json())


async def tamper_with_registration(pool: asyncpg.Pool, snap: ModelSnapshot) -> int:
    """Change ``snap``'s registration entry in the trail as a superuser can (triggers off);
    return its seq. The chain's head stays as it was: only a full check notices."""
    registered = next(e for e in await trail.read_entries(pool) if snap.sha256 in e.body)  # the first
    async with pool.acquire() as conn:
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(
            "UPDATE audit_log SET body = replace(body, $2, 'forged') WHERE seq = $1",
            registered.seq,
            snap.sha256,
        )
        await conn.execute("SET session_replication_role = DEFAULT")
    return registered.seq
