"""The standard lifecycle end to end on real Temporal, PostgreSQL and local runtimes."""

from __future__ import annotations

import json
import uuid

import pytest
from temporalio.client import WorkflowFailureError

from mlc.domain import Decision, DeploymentState, LifecycleState
from mlc.lifecycle_client import read_status
from mlc.store import audit, deployments, runs
from tests.conftest import APPROVER, FIXTURES, REGISTRAR, Stack, call_model
from tests.lifecycle_helpers import keep_history, start_like_ui, wait_for_gate


def wid() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


async def approve(stack: Stack, ref: str, stage: str, *, user: str = APPROVER) -> None:
    result = await stack.mlc("approve", ref, "--stage", stage, "--comment", f"ok {stage}", user=user)
    assert result.returncode == 0, result.stderr
    assert f"{stage} approved by {user}" in result.stdout


async def test_happy_path_reaches_prod_with_cli_approvals(stack: Stack, example_package) -> None:
    snap = await stack.register(example_package)
    await stack.add_local_runtimes()
    handle = await stack.start(snap)
    ref = f"{snap.model}@{snap.version}"
    for stage in ("DEV", "SIT", "UAT"):
        status = await wait_for_gate(handle, stage)
        report = next(r for r in status.reports if r.stage == stage)
        assert report.passed and report.results, report
        await approve(stack, ref, stage)
    result = await handle.result()
    await keep_history(handle, "ModelLifecycle", "happy_path")
    assert result.stages == ("DEV", "SIT", "UAT", "PROD")

    live = await deployments.read_deployments(stack.pool, model=snap.model)
    assert {(d.stage, d.version, d.state) for d in live} == {
        (s, snap.version, DeploymentState.SERVING) for s in ("DEV", "SIT", "UAT", "PROD")
    }
    prod = next(d for d in live if d.stage == "PROD")
    scored = await call_model(prod.endpoint, "/score", json=_sample(example_package))
    assert scored.status_code == 200 and "probability" in scored.json()

    decisions = await audit.read_decisions(stack.pool, snap.model, snap.version)
    assert [(d["stage"], d["decision"], d["approver"]) for d in decisions] == [
        (s, "approved", APPROVER) for s in ("DEV", "SIT", "UAT")
    ]
    assert all(d["evidence"]["results"] for d in decisions), "decisions keep their test evidence"
    metrics = [
        t
        for t in await audit.read_test_results(stack.pool, snap.model, snap.version)
        if t["test"] == "metrics"
    ]
    assert {t["stage"] for t in metrics} == {"SIT", "UAT"} and all(t["passed"] for t in metrics)
    assert metrics[0]["metrics"]["auc"] >= 0.8

    trail = json.loads((await stack.mlc("audit", "show", ref, "--json")).stdout)
    assert [(d["stage"], d["decision"], d["comment"]) for d in trail["decisions"]] == [
        ("DEV", "approved", "ok DEV"),
        ("SIT", "approved", "ok SIT"),
        ("UAT", "approved", "ok UAT"),
    ]
    assert {t["stage"] for t in trail["tests"]} == {"DEV", "SIT", "UAT", "PROD"}
    listing = await stack.mlc("deployments", "--json")
    assert listing.returncode == 0, listing.stderr
    assert '"stage": "PROD"' in listing.stdout
    run = (await runs.read_runs(stack.pool, model=snap.model))[0]
    assert run["state"] == "succeeded" and run["ended_at"] is not None
    verified = await stack.mlc("audit", "verify")
    assert verified.returncode == 0 and "audit trail verified" in verified.stdout, verified.stderr


async def test_rejection_at_uat_undeploys_uat_and_fails(stack: Stack, example_package) -> None:
    snap = await stack.register(example_package)
    await stack.add_local_runtimes()
    handle = await stack.start(snap)
    ref = f"{snap.model}@{snap.version}"
    for stage in ("DEV", "SIT"):
        await wait_for_gate(handle, stage)
        await approve(stack, ref, stage)
    await wait_for_gate(handle, "UAT")
    result = await stack.mlc("reject", ref, "--stage", "UAT", "--comment", "drift too high")
    assert result.returncode == 0, result.stderr
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    await keep_history(handle, "ModelLifecycle", "rejected_at_uat")
    assert "UAT gate rejected by alice: drift too high" in str(failure.value.cause)
    live = {d.stage for d in await deployments.read_deployments(stack.pool, model=snap.model)}
    assert live == {"DEV", "SIT"}
    status = await stack.mlc("status", ref, "--json")
    assert '"state": "failed"' in status.stdout


async def test_failing_metric_in_sit_stops_and_undeploys(stack: Stack) -> None:
    snap = await stack.register(FIXTURES / "models" / "weak-model")
    await stack.add_local_runtimes()
    handle = await stack.start(snap)
    await wait_for_gate(handle, "DEV")
    await approve(stack, f"{snap.model}@{snap.version}", "DEV")
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    message = str(failure.value.cause)
    assert "tests failed in SIT" in message and "auc" in message
    everything = await deployments.read_deployments(stack.pool, model=snap.model, live_only=False)
    sit = [d for d in everything if d.stage == "SIT"]
    assert sit and all(d.state is DeploymentState.RETIRED for d in sit)
    assert {d.stage for d in everything if d.state is DeploymentState.SERVING} == {"DEV"}


async def test_refused_decisions(stack: Stack, example_package) -> None:
    snap = await stack.register(example_package)
    await stack.add_local_runtimes(("DEV",))
    from mlc.domain import ApprovalGate, LifecycleSpec, StageSpec, TestKind

    spec = LifecycleSpec(stages=(StageSpec(name="DEV", tests=(TestKind.SMOKE,), gate=ApprovalGate()),))
    handle = await stack.start(snap, spec=spec)
    ref = f"{snap.model}@{snap.version}"
    await wait_for_gate(handle, "DEV")

    wrong_stage = await stack.mlc("approve", ref, "--stage", "UAT")
    assert wrong_stage.returncode == 4
    assert "waiting for a decision at DEV, not UAT" in wrong_stage.stderr
    assert "Traceback" not in wrong_stage.stderr

    stranger = await stack.mlc("approve", ref, "--stage", "DEV", user="mallory")
    assert stranger.returncode == 4
    assert "is not registered" in stranger.stderr, "an unregistered key cannot decide"
    no_role = await stack.mlc("approve", ref, "--stage", "DEV", user=REGISTRAR)
    assert no_role.returncode == 4
    assert "registrar may not decide at DEV: the stage policy allows role:approver" in " ".join(
        no_role.stderr.split()
    )

    await approve(stack, ref, "DEV")
    await handle.result()
    finished = await stack.mlc("approve", ref, "--stage", "DEV")
    assert finished.returncode == 4
    assert "already finished" in finished.stderr

    decisions = await audit.read_decisions(stack.pool, snap.model, snap.version)
    assert [(d["decision"], d["approver"]) for d in decisions] == [(Decision.APPROVED.value, APPROVER)]


async def test_no_runtime_fails_at_once_naming_tag_and_stage(stack: Stack, example_package) -> None:
    snap = await stack.register(example_package)
    await stack.add_local_runtimes(("DEV",), tag="some-other-service")
    handle = await stack.start(snap)
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    message = str(failure.value.cause)
    assert "no runtime serves service tag cc-fraud in stage DEV" in message
    history = [e async for e in handle.fetch_history_events()]
    attempts = [
        e.activity_task_started_event_attributes.attempt
        for e in history
        if e.HasField("activity_task_started_event_attributes")
    ]
    assert max(attempts) == 1, "a missing runtime is not retried"


async def test_malformed_input_fails_the_run_readably(stack: Stack) -> None:
    handle = await start_like_ui(
        stack.client, {"model": "cc-fraud", "versoin": 1}, workflow_id=wid(), task_queue=stack.task_queue
    )
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    text = str(failure.value.cause)
    assert "version" in text and "Field required" in text


async def test_one_snapshot_runs_one_lifecycle_at_a_time(stack: Stack, example_package) -> None:
    snap = await stack.register(example_package)
    await stack.add_local_runtimes()
    body = {"model": snap.model, "version": snap.version}
    first = await start_like_ui(stack.client, body, workflow_id=wid(), task_queue=stack.task_queue)
    await wait_for_gate(first, "DEV")
    second = await start_like_ui(stack.client, body, workflow_id=wid(), task_queue=stack.task_queue)
    with pytest.raises(WorkflowFailureError) as failure:
        await second.result()
    assert "already has a running lifecycle" in str(failure.value.cause)
    assert (await read_status(first)).state is LifecycleState.AWAITING_APPROVAL
    await first.terminate("test over")


def _sample(package) -> dict:
    from mlc.manifest import load_manifest

    return dict(load_manifest(package).samples[0].input)
