"""The runtime reconciler within the trust model: it can only restart or fail what the
inventory admitted, and only the runtime's own reconciler workflow may drive it.

(What it does about dead servers and engines is in ``tests/faults/``.)
"""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.reconcile import ReconcileInventory
from mlc.contracts.reconcile import (
    Finding,
    PlanInput,
    SettleInput,
    Settlement,
    ensure_reconciler,
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
from mlc.store import deployments, runs
from tests.conftest import FIXTURES, Stack
from tests.faults.harness import model_servers, wait_until
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
    await ensure_reconciler(stack.client, stack.settings, "local-prod")

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
    the deployment is failed (the judge, fed findings as the runtime would report them)."""
    await stack.add_runtime(
        Runtime(name="local-dev", stage="DEV", task_queue=stack.task_queue, restart="on-failure:2")
    )
    snap = await stack.register(MODEL)
    spec = LifecycleSpec(stages=(StageSpec(name="DEV", tests=(TestKind.SMOKE,), gate=ApprovalGate()),))
    handle = await stack.start(snap, spec=spec)
    await wait_for_gate(handle, "DEV")
    (deployment,) = await deployments.read_deployments(stack.pool)
    assert stack.worker_pool is not None
    judge = ReconcileInventory(stack.worker_pool, stack.settings)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info, workflow_type="RuntimeReconciler", workflow_id=reconciler_id(stack.task_queue, "local-dev")
    )

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
    assert "after 2 restart(s) in a row; restart policy on-failure:2" in found.details["error"]
    await handle.terminate()


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
    await ensure_reconciler(stack.client, stack.settings, "local-dev")

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
