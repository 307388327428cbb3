"""The runtime reconciler within the trust model: it can only restart or fail what the
inventory admitted, only the reconciler run a trusted worker started may drive it, and
it acts on what the driver observes, not on what it is told.

(What it does about dead servers and engines is in ``tests/faults/``.)
"""

from __future__ import annotations

import dataclasses
import os
import signal
import uuid
from typing import Any

import asyncpg
import pytest
from pydantic import ValidationError
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from activities.reconcile import ReconcileInventory, ReconcileRuntime, keeping_reconcilers
from activities.reconciler_runs import ensure_reconciler, first_run_of
from mlc.contracts.reconcile import (
    Finding,
    GrantsInput,
    PlanInput,
    ReconcilerStatus,
    SettleInput,
    Settlement,
    reconciler_id,
)
from mlc.domain import (
    ApprovalGate,
    Deployment,
    DeploymentState,
    LifecycleSpec,
    Mode,
    Runtime,
    StageSpec,
    TestKind,
)
from mlc.store import deployments, reconcilers, runs, trail
from tests.conftest import FIXTURES, Stack
from tests.faults.harness import model_servers, wait_until
from tests.forged_reconciler import ContinuesAsNewOnce, ForgedReconciler
from tests.lifecycle_helpers import wait_for_gate

MODEL = FIXTURES / "models" / "weak-model"


async def test_a_forged_serving_row_in_a_protected_stage_is_failed_not_brought_up(stack: Stack) -> None:
    """Whoever can write deployment rows (the workers' role) cannot use the reconciler to
    get an unapproved snapshot serving in PROD: the restart is checked like a deploy."""
    await stack.add_local_runtimes(("DEV", "PROD"))
    snap = await stack.register(MODEL)
    spec = LifecycleSpec(stages=(StageSpec(name="DEV", tests=(TestKind.SMOKE,), gate=ApprovalGate()),))
    handle = await stack.start(snap, spec=spec)
    await wait_for_gate(handle, "DEV")  # a real run, with no approval at UAT
    run_id = (await handle.describe()).run_id
    forged = Deployment(
        id=f"weak-model-v1-prod-local-prod-{run_id[:8]}",
        model=snap.model,
        version=snap.version,
        runtime="local-prod",
        stage="PROD",
        mode=Mode.ONLINE,
        state=DeploymentState.SERVING,
        endpoint="http://127.0.0.1:9",
        workflow_id=handle.id,
        details={"run_id": run_id, "runtime_kind": "local"},
    )
    assert stack.worker_pool is not None
    await deployments.upsert_deployment(stack.worker_pool, forged)
    await ensure_reconciler(stack.client, stack.settings, stack.worker_pool, "local-prod")

    async def judged() -> Deployment | None:
        found = await deployments.read_deployment(stack.pool, forged.id)
        return found if found is not None and found.state is not DeploymentState.SERVING else None

    found = await wait_until(judged, what="the reconciler to judge the forged row", timeout=60)
    assert found.state is DeploymentState.FAILED
    assert "not restarted: PROD is protected" in found.details["error"], found.details
    assert forged.id not in model_servers(stack.settings.home)
    await handle.terminate()


async def test_only_the_runtimes_reconciler_may_reconcile_it(stack: Stack) -> None:
    assert stack.worker_pool is not None
    activities = ReconcileInventory(stack.worker_pool, stack.settings)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, workflow_type="ModelLifecycle", workflow_id="mlc-weak-model-v1")
    with pytest.raises(ApplicationError, match="only the reconciler of runtime local-dev"):
        await env.run(activities.plan_reconciliation, PlanInput(runtime="local-dev"))
    env.info = dataclasses.replace(
        env.info, workflow_type="RuntimeReconciler", workflow_id=reconciler_id("another-queue", "local-dev")
    )
    with pytest.raises(ApplicationError, match="only the reconciler"):
        await env.run(activities.plan_reconciliation, PlanInput(runtime="local-dev"))


def test_restart_policies() -> None:
    def limit(policy: str) -> int | None:
        return Runtime(name="r", stage="DEV", restart=policy).restart_limit

    assert (limit("no"), limit("always"), limit("on-failure"), limit("on-failure:7")) == (0, None, 3, 7)
    assert Runtime(name="r", stage="DEV").restart == "on-failure:3"
    for bad in ("sometimes", "on-failure:0", "on-failure:x", "always:3"):
        with pytest.raises(ValidationError, match="restart policy"):
            Runtime(name="r", stage="DEV", restart=bad)


async def test_a_crash_loop_is_restarted_up_to_the_policy_then_failed(stack: Stack) -> None:
    """``on-failure:2``: two restarts in a row; when the second does not come back either,
    the deployment is failed (the judge, fed findings through the recorded reconciler run;
    the server is really down, so the driver's probe confirms each)."""
    handle, deployment = await _serving(stack, restart="on-failure:2")
    env = await _as_the_reconciler(stack)
    judge = ReconcileInventory(_worker_pool(stack), stack.settings)
    await _kill_server(stack, deployment.id)

    async def settle(**finding: object) -> Settlement:
        found = Finding(deployment_id=deployment.id, **finding)  # type: ignore[arg-type]
        return await env.run(judge.settle_reconciliation, SettleInput(runtime="local-dev", findings=(found,)))

    down = {"healthy": False, "detail": "the model server is not running"}
    attempt_failed = {"healthy": False, "restarted": True, "detail": "exited during start"}
    first = await settle(**down)
    assert len(first.restart) == 1 and not first.failed
    retried = await settle(**attempt_failed)
    assert not retried.restart and not retried.failed, "with a restart left, the next round tries again"
    second = await settle(**down)
    assert len(second.restart) == 1 and not second.failed
    last = await settle(**attempt_failed)
    assert not last.restart and last.failed == (deployment.id,) and len(last.remove) == 1
    found = await deployments.read_deployment(stack.pool, deployment.id)
    assert found is not None and found.state is DeploymentState.FAILED
    assert "not running" in found.details["error"], found.details
    assert "after 2 restart(s) in a row; restart policy on-failure:2" in found.details["error"]
    await handle.terminate()


async def test_made_up_findings_change_nothing_and_endpoints_come_from_the_driver(stack: Stack) -> None:
    """Findings the runtime did not observe, even arriving through the real reconciler run:
    "unhealthy" for a server that answers and "restarted" where no restart was granted
    change nothing; after a granted restart the endpoint recorded is the driver's."""
    handle, deployment = await _serving(stack)
    env = await _as_the_reconciler(stack)
    judge = ReconcileInventory(_worker_pool(stack), stack.settings)

    async def settle(*findings: Finding) -> Settlement:
        return await env.run(judge.settle_reconciliation, SettleInput(runtime="local-dev", findings=findings))

    entries = len(await trail.read_entries(stack.pool))
    made_up = await settle(
        Finding(deployment_id=deployment.id, healthy=False, detail="made up: not answering"),
        Finding(deployment_id=deployment.id, healthy=True, restarted=True, endpoint=ATTACKER),
    )
    assert made_up == Settlement(), made_up
    assert await deployments.read_deployment(stack.pool, deployment.id) == deployment
    assert len(await trail.read_entries(stack.pool)) == entries

    await _kill_server(stack, deployment.id)
    granted = await settle(Finding(deployment_id=deployment.id, healthy=False, detail="made up"))
    assert len(granted.restart) == 1
    back = await env.run(
        ReconcileRuntime(stack.settings).restart_deployments, GrantsInput(grants=granted.restart)
    )
    (claimed,) = back.findings
    assert claimed.healthy and claimed.endpoint
    restarted = await settle(
        claimed.model_copy(update={"endpoint": ATTACKER, "details": {"run_id": "forged"}})
    )
    assert restarted.restarted == (deployment.id,)
    found = await deployments.read_deployment(stack.pool, deployment.id)
    assert found is not None and found.endpoint == claimed.endpoint != ATTACKER
    assert found.details["run_id"] == deployment.details["run_id"], "restart details add driver facts only"
    assert "not running" in found.details["last_failure"], "the failure recorded is the driver's probe"
    again = await settle(claimed)
    assert again == Settlement(), "a restart is accepted once, for the grant it answers"
    await handle.terminate()


async def test_a_forged_reconciler_gets_nothing_and_is_replaced(stack: Stack) -> None:
    """A workflow someone starts under the reconciler's type and id (after terminating the
    real one) is refused by the reconcile activities, changes nothing, and is terminated
    and replaced by the next ``ensure_reconciler``, which says so in the trail and tells people."""
    handle, deployment = await _serving(stack)
    workflow_id = reconciler_id(stack.task_queue, "local-dev")
    await stack.client.get_workflow_handle(workflow_id).terminate(reason="a model process did this")
    entries = await trail.read_entries(stack.pool)
    made_up = (
        Finding(deployment_id=deployment.id, healthy=True, restarted=True, endpoint=ATTACKER),
        Finding(deployment_id=deployment.id, healthy=False, detail="made up"),
    )
    calls = [
        {"activity": "plan_reconciliation", "payload": {"runtime": "local-dev"}, "queue": stack.task_queue},
        {
            "activity": "settle_reconciliation",
            "payload": SettleInput(runtime="local-dev", findings=made_up).model_dump(mode="json"),
            "queue": stack.task_queue,
        },
    ]
    queue = f"forged-{uuid.uuid4().hex[:8]}"
    async with Worker(stack.client, task_queue=queue, workflows=[ForgedReconciler]):
        started = await stack.client.start_workflow(
            "RuntimeReconciler", calls, id=workflow_id, task_queue=queue
        )
        forged = stack.client.get_workflow_handle(workflow_id, run_id=started.result_run_id)

        async def outcomes() -> list[str]:
            said: list[str] = await forged.query("outcomes")
            return said if len(said) == len(calls) else []

        said = await wait_until(outcomes, what="the forged reconciler's calls", timeout=60)
        assert all("only the reconciler a trusted worker started for runtime local-dev" in s for s in said), (
            said
        )
        assert await deployments.read_deployment(stack.pool, deployment.id) == deployment
        assert await trail.read_entries(stack.pool) == entries

        await ensure_reconciler(stack.client, stack.settings, _worker_pool(stack), "local-dev")
    assert (await forged.describe()).status is WorkflowExecutionStatus.TERMINATED
    current = await stack.client.get_workflow_handle(workflow_id).describe()
    assert current.status is WorkflowExecutionStatus.RUNNING and current.run_id != forged.run_id
    assert current.task_queue == stack.task_queue
    (replaced,) = await trail.read_entries(stack.pool, kinds=(trail.RECONCILER,))
    assert replaced.run_id == current.run_id and replaced.data()["impostor"]["run_id"] == forged.run_id
    notes = [r["message"] for r in await stack.pool.fetch("SELECT message FROM notifications")]
    assert any(f"run {forged.run_id} (RuntimeReconciler on task queue {queue})" in n for n in notes), notes
    await ensure_reconciler(stack.client, stack.settings, _worker_pool(stack), "local-dev")
    assert (await stack.client.get_workflow_handle(workflow_id).describe()).run_id == current.run_id, (
        "the recorded reconciler is kept"
    )
    await handle.terminate()


async def test_the_main_worker_replaces_an_idle_impostor_within_an_interval(stack: Stack) -> None:
    """An impostor that only holds the id (calling nothing) would switch self-healing off:
    the main worker's keeper replaces it within one interval."""
    handle, _ = await _serving(stack)
    workflow_id = reconciler_id(stack.task_queue, "local-dev")
    queue = f"forged-{uuid.uuid4().hex[:8]}"
    settings = dataclasses.replace(stack.settings, reconcile_seconds=0.5)
    async with (
        Worker(stack.client, task_queue=queue, workflows=[ForgedReconciler]),
        keeping_reconcilers(stack.client, settings, _worker_pool(stack)),
    ):
        idle = await stack.client.start_workflow(  # one call displaces the real one
            "RuntimeReconciler",
            [],
            id=workflow_id,
            task_queue=queue,
            id_conflict_policy=WorkflowIDConflictPolicy.TERMINATE_EXISTING,
        )

        async def replaced() -> list[trail.Entry]:
            return await trail.read_entries(stack.pool, kinds=(trail.RECONCILER,))

        (entry,) = await wait_until(replaced, what="the keeper to replace the impostor", timeout=30)
    assert entry.data()["impostor"]["run_id"] == idle.result_run_id
    current = await stack.client.get_workflow_handle(workflow_id).describe()
    assert current.run_id == entry.run_id and current.task_queue == stack.task_queue
    await stack.client.get_workflow_handle(workflow_id).terminate()
    await handle.terminate()


async def test_a_chain_is_known_by_its_first_run_across_continue_as_new(stack: Stack) -> None:
    """The reconciler continues as new every 100 rounds: its later runs are recognised by
    the first run id Temporal records in each run's history."""
    queue = f"chain-{uuid.uuid4().hex[:8]}"
    async with Worker(stack.client, task_queue=queue, workflows=[ContinuesAsNewOnce]):
        started = await stack.client.start_workflow("ContinuesAsNewOnce", False, id=queue, task_queue=queue)

        async def continued() -> str | None:
            run_id = (await stack.client.get_workflow_handle(queue).describe()).run_id
            return run_id if run_id != started.result_run_id else None

        second = await wait_until(continued, what="the run to continue as new")
        assert started.result_run_id is not None
        assert await first_run_of(stack.client, queue, second) == started.result_run_id
        assert await first_run_of(stack.client, queue, started.result_run_id) == started.result_run_id
        assert await first_run_of(stack.client, queue, "00000000-0000-0000-0000-000000000000") == ""
        await stack.client.get_workflow_handle(queue).terminate()


async def test_a_terminated_runs_deployments_are_retired_and_its_end_recorded(stack: Stack) -> None:
    """A run terminated at its gate runs no cleanup code: the runtime's reconciler sees in
    Temporal that it is closed, records its end and takes its deployment down."""
    await stack.add_local_runtimes(("DEV",))
    snap = await stack.register(MODEL)
    spec = LifecycleSpec(stages=(StageSpec(name="DEV", tests=(TestKind.SMOKE,), gate=ApprovalGate()),))
    handle = await stack.start(snap, spec=spec)
    await wait_for_gate(handle, "DEV")
    (deployment,) = await deployments.read_deployments(stack.pool)
    assert deployment.id in model_servers(stack.settings.home)
    await handle.terminate(reason="operator ended it")
    assert stack.worker_pool is not None
    await ensure_reconciler(stack.client, stack.settings, stack.worker_pool, "local-dev")

    async def retired() -> Deployment | None:
        found = await deployments.read_deployment(stack.pool, deployment.id)
        return found if found is not None and found.state is DeploymentState.RETIRED else None

    await wait_until(retired, what="the reconciler to retire the terminated run's deployment", timeout=60)
    await wait_until(
        lambda: deployment.id not in model_servers(stack.settings.home),
        what="the deployment's server to stop",
        timeout=30,
    )
    run = await runs.read_run(stack.pool, handle.id, (await handle.describe()).run_id)
    assert run is not None and run["ended_at"] is not None and run["state"] == "failed"
    assert "terminated" in run["reason"], run
    assert await runs.find_active_run(stack.pool, snap.model, snap.version) is None, "free for a new run"


ATTACKER = "http://127.0.0.1:9/attacker"


def _worker_pool(stack: Stack) -> asyncpg.Pool:
    assert stack.worker_pool is not None
    return stack.worker_pool


async def _serving(
    stack: Stack, *, restart: str = "on-failure:3"
) -> tuple[WorkflowHandle[Any, Any], Deployment]:
    """A run of the weak model waiting at its DEV gate; its deployment, serving on local-dev."""
    await stack.add_runtime(
        Runtime(name="local-dev", stage="DEV", task_queue=stack.task_queue, restart=restart)
    )
    snap = await stack.register(MODEL)
    spec = LifecycleSpec(stages=(StageSpec(name="DEV", tests=(TestKind.SMOKE,), gate=ApprovalGate()),))
    handle = await stack.start(snap, spec=spec)
    await wait_for_gate(handle, "DEV")
    (deployment,) = await deployments.read_deployments(stack.pool)
    return handle, deployment


async def _as_the_reconciler(stack: Stack) -> ActivityEnvironment:
    """Activities run as the recorded reconciler run of local-dev (once its first round is done)."""
    workflow_id = reconciler_id(stack.task_queue, "local-dev")
    reconciler = stack.client.get_workflow_handle(workflow_id)

    async def checked() -> bool:
        status: ReconcilerStatus | None = await reconciler.query("status", result_type=ReconcilerStatus)
        return status is not None and status.rounds > 0

    await wait_until(checked, what="the reconciler's first round", timeout=60)
    run_id = await reconcilers.read_first_run(stack.pool, workflow_id)
    assert run_id == (await reconciler.describe()).run_id
    env = ActivityEnvironment(client=stack.client)
    env.info = dataclasses.replace(
        env.info, workflow_type="RuntimeReconciler", workflow_id=workflow_id, workflow_run_id=run_id
    )
    return env


async def _kill_server(stack: Stack, deployment_id: str) -> None:
    pid = model_servers(stack.settings.home)[deployment_id]
    os.kill(pid, signal.SIGKILL)
    await wait_until(
        lambda: deployment_id not in model_servers(stack.settings.home), what="the server to die"
    )
