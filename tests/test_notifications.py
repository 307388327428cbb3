"""Notifications are stored once per activity, however often Temporal retries it."""

from __future__ import annotations

import dataclasses

from temporalio.testing import ActivityEnvironment

from activities.inventory import InventoryActivities
from mlc.contracts.inventory import NotifyInput
from mlc.domain import ApprovalGate, LifecycleSpec, Runtime, StageSpec, TestKind
from tests.conftest import FIXTURES, Stack
from tests.lifecycle_helpers import wait_for_gate

MODEL = FIXTURES / "models" / "weak-model"


async def test_a_retried_notify_activity_tells_people_once(stack: Stack) -> None:
    assert stack.worker_pool is not None
    await stack.add_runtime(Runtime(name="local-dev", stage="DEV", task_queue=stack.task_queue))
    snap = await stack.register(MODEL)
    spec = LifecycleSpec(stages=(StageSpec(name="DEV", tests=(TestKind.SMOKE,), gate=ApprovalGate()),))
    handle = await stack.start(snap, spec=spec)
    await wait_for_gate(handle, "DEV")
    described = await handle.describe()
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info,
        workflow_type=described.workflow_type,
        workflow_id=handle.id,
        workflow_run_id=described.run_id,
        activity_id="41",
    )
    inventory = InventoryActivities(stack.worker_pool, stack.settings)
    for _ in range(3):  # the first attempt and two retries of the same activity
        await env.run(inventory.notify, NotifyInput(message="retried note"))
    env.info = dataclasses.replace(env.info, activity_id="42")
    await env.run(inventory.notify, NotifyInput(message="retried note"))  # another call: stored

    rows = await stack.pool.fetch("SELECT idempotency_key FROM notifications WHERE message = 'retried note'")
    keys = sorted(r["idempotency_key"] for r in rows)
    assert keys == [f"{handle.id}/{described.run_id}/41", f"{handle.id}/{described.run_id}/42"]
    await handle.terminate()
