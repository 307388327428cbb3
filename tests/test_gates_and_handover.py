"""Approval gates that expire (time-skipping server) and the PROD handover."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from temporalio.client import WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from cli import admin
from mlc.contracts.lifecycle import StartLifecycleInput
from mlc.domain import ApprovalGate, DeploymentState, LifecycleSpec, StageSpec, TestKind
from mlc.store import audit, connect, deployments, runs, traffic
from mlc.trust.policy import StagePolicy
from tests.conftest import ADMIN, FIXTURES, Stack, call_model
from tests.lifecycle_helpers import start_like_ui, wait_for, wait_for_gate
from workers.client import ensure_search_attributes
from workers.worker import build_main_worker

ONE_GATE = LifecycleSpec(
    stages=(StageSpec(name="UAT", tests=(TestKind.SMOKE,), gate=ApprovalGate(timeout=timedelta(days=3))),)
)


async def test_gate_expires_on_time_skipping_server(stack: Stack, example_package: Path) -> None:
    snap = await stack.register(example_package)
    await stack.add_local_runtimes(("UAT",))
    server = str(
        Path(
            shutil.which("temporal-test-server")
            or Path(__import__("sys").executable).parent / "temporal-test-server"
        )
    )
    async with await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=server, data_converter=pydantic_data_converter
    ) as env:
        await ensure_search_attributes(env.client)
        pool = await connect(stack.settings.database_url)
        # The runtime's reconciler would wake every 30 s of the skipped 3 days: check less often.
        settings = replace(stack.settings, reconcile_seconds=timedelta(days=30).total_seconds())
        try:
            async with build_main_worker(env.client, settings, pool, task_queue=stack.task_queue):
                handle = await start_like_ui(
                    env.client,
                    {"model": snap.model, "version": snap.version, "spec": ONE_GATE.model_dump(mode="json")},
                    workflow_id=f"expire-{uuid.uuid4().hex[:8]}",
                    task_queue=stack.task_queue,
                )
                with pytest.raises(WorkflowFailureError) as failure:
                    await handle.result()
        finally:
            await pool.close()
    assert "UAT gate expired by system" in str(failure.value.cause)
    decisions = await audit.read_decisions(stack.pool, snap.model, snap.version)
    assert [d["decision"] for d in decisions] == ["expired"]
    uat = await deployments.read_deployments(stack.pool, model=snap.model, live_only=False)
    assert uat and all(d.state is DeploymentState.RETIRED for d in uat), "expired gate undeploys"


@pytest.mark.parametrize("gateway", [False, True], ids=["direct", "stable-endpoint"])
async def test_prod_handover_keeps_old_version_serving_until_new_is_healthy(
    stack: Stack, example_package: Path, tmp_path: Path, gateway: bool
) -> None:
    """Without a gateway consumers follow the new deployment's endpoint and the old one is
    retired; with one, the stable endpoint stays the same and the old one stays warm."""
    await stack.add_local_runtimes(("PROD",), gateway=gateway)
    # PROD-only runs: unprotect PROD (by default it is admitted only by approvals at UAT).
    await admin.set_policy(stack.pool, stack.settings, stack.signers[ADMIN], StagePolicy(stage="PROD"))
    v1 = await stack.register(example_package)
    prod_only = LifecycleSpec(stages=(StageSpec(name="PROD", tests=(TestKind.SMOKE,)),))
    first = await start_like_ui(
        stack.client,
        {"model": v1.model, "version": v1.version, "spec": prod_only.model_dump(mode="json")},
        workflow_id=f"v1-{uuid.uuid4().hex[:8]}",
        task_queue=stack.task_queue,
    )
    await first.result()
    (old,) = await deployments.read_deployments(stack.pool, model=v1.model, stage="PROD")

    changed = tmp_path / "cc-fraud-v2"
    shutil.copytree(example_package, changed)
    (changed / "NOTES.md").write_text("v2: same model, new snapshot\n")
    v2 = await stack.register(changed)
    assert v2.version == v1.version + 1
    gated = LifecycleSpec(stages=(StageSpec(name="PROD", tests=(TestKind.SMOKE,), gate=ApprovalGate()),))
    second = await start_like_ui(
        stack.client,
        {"model": v2.model, "version": v2.version, "spec": gated.model_dump(mode="json")},
        workflow_id=f"v2-{uuid.uuid4().hex[:8]}",
        task_queue=stack.task_queue,
    )
    status = await wait_for_gate(second, "PROD")
    assert status.reports[0].passed, "v2 is deployed, healthy and tested"
    live = await deployments.read_deployments(stack.pool, model=v1.model, stage="PROD")
    assert {d.version for d in live} == {v1.version, v2.version}, "both serve during the handover"
    assert (await call_model(old.endpoint, "/health")).status_code == 200

    stable = [t.endpoint for t in await traffic.read_traffic(stack.pool, model=v1.model)]
    assert len(stable) == (1 if gateway else 0)

    approved = await stack.mlc("approve", f"{v2.model}@{v2.version}", "--stage", "PROD")
    assert approved.returncode == 0, approved.stderr
    await second.result()
    if gateway:  # the same address answers with v2; v1 stays warm for the stage's grace
        assert [t.endpoint for t in await traffic.read_traffic(stack.pool, model=v1.model)] == stable
        live = await deployments.read_deployments(stack.pool, model=v1.model, stage="PROD")
        assert {d.version for d in live} == {v1.version, v2.version}
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"{stable[0]}/health")
            assert answer.status_code == 200 and answer.json()["version"] == str(v2.version)
        assert (await call_model(old.endpoint, "/health")).status_code == 200
        return
    (new,) = await deployments.read_deployments(stack.pool, model=v1.model, stage="PROD")
    assert new.version == v2.version and new.state is DeploymentState.SERVING
    with pytest.raises(httpx.TransportError):
        await call_model(old.endpoint, "/health", timeout=2)
    assert (await call_model(new.endpoint, "/health")).status_code == 200


async def test_a_decide_signal_that_does_not_decode_is_listed_as_refused(stack: Stack) -> None:
    """The old unsigned form of the ``decide`` signal (here sent with the start, before the
    run begins), or no input at all: ignored, as a signal cannot be refused to its sender,
    and shown under ``refused`` rather than dropped."""
    await stack.add_local_runtimes(("DEV",))
    snap = await stack.register(FIXTURES / "models" / "weak-model")
    spec = LifecycleSpec(stages=(StageSpec(name="DEV", tests=(TestKind.SMOKE,), gate=ApprovalGate()),))
    handle = await stack.client.start_workflow(
        "ModelLifecycle",
        StartLifecycleInput(model=snap.model, version=snap.version, spec=spec),
        id=f"mlc-{snap.model}-v{snap.version}",
        task_queue=stack.task_queue,
        start_signal="decide",
        start_signal_args=[{"approver": "alice", "stage": "DEV", "decision": "approved"}],
    )
    await wait_for_gate(handle, "DEV")
    await handle.signal("decide")
    status = await wait_for(handle, lambda s: len(s.refused) == 2, what="both signals refused")
    assert "the decide signal's input is not a signed statement" in status.refused[0], status.refused
    assert "envelope: Field required" in status.refused[0], status.refused
    assert "takes one signed statement as its input, not 0" in status.refused[1], status.refused
    assert status.pending_gate is not None and status.decisions == ()
    await handle.terminate()


async def test_in_flight_names_the_runs_that_began_and_have_not_ended(
    stack: Stack, example_package: Path
) -> None:
    """What a promotion asks in one query: which other runs still own their deployments."""
    snap = await stack.register(example_package)
    for workflow_id in ("ended", "running"):
        await runs.start_run(
            stack.pool,
            workflow_id=workflow_id,
            run_id=f"{workflow_id}-run",
            model=snap.model,
            version=snap.version,
            lifecycle="ModelLifecycle",
        )
        if workflow_id == "ended":
            await runs.update_run(
                stack.pool,
                workflow_id="ended",
                run_id="ended-run",
                state="succeeded",
                stage="DEV",
                ended=True,
            )
    asked = [("ended", "ended-run"), ("running", "running-run"), ("never", "began"), ("running", "other-run")]
    assert await runs.in_flight(stack.pool, asked) == {("running", "running-run")}
    assert await runs.in_flight(stack.pool, []) == set()
