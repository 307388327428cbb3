"""Signed runtime evidence, end to end on real Temporal and PostgreSQL.

A Temporal client polling a runtime's task queue (as model code that imports
``temporalio`` can) answers a deploy with a made-up endpoint, or stage tests with a
made-up pass: both are refused, recorded as refused and never shown as passing evidence.
Evidence whose signature or report is altered fails ``mlc audit verify``; runtime
evidence keys rotate and revoke like people's keys, and an auditor verifies the evidence
offline from an export.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from temporalio import activity
from temporalio.client import WorkflowFailureError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from activities.reconcile import ReconcileInventory
from activities.runtime import RuntimeActivities
from mlc.contracts.reconcile import Finding, ReconcilerStatus, SettleInput, Settlement, reconciler_id
from mlc.contracts.runtime import (
    OnlineDeployResult,
    RunStageTestsInput,
    RunStageTestsResult,
    RuntimeActionInput,
)
from mlc.contracts.traffic import ObserveTrafficInput, TrafficObservation
from mlc.domain import (
    ApprovalGate,
    LifecycleSpec,
    Rollout,
    RolloutStrategy,
    Runtime,
    StageSpec,
    TestKind,
    TestResult,
)
from mlc.errors import RefusedError
from mlc.statements import Envelope
from mlc.store import deployments, reconcilers, trail
from mlc.trust import evidence
from mlc.trust import governance as g
from mlc.trust.audit import verify_entries
from mlc.trust.keys import key_id, public_text
from mlc.trust.signer import Signer
from tests.conftest import ADMIN, Stack, gateway_settings
from tests.faults.harness import wait_until
from tests.lifecycle_helpers import keep_history, wait_for_gate
from workers.catalog import runtime_activities
from workers.worker import build_runtime_worker

DEV_GATE = LifecycleSpec(stages=(StageSpec(name="DEV", tests=(TestKind.SMOKE,), gate=ApprovalGate()),))


def forged_pass(request: RunStageTestsInput, signed: Envelope | None = None) -> RunStageTestsResult:
    """What a forger answers: every requested test passed."""
    return RunStageTestsResult(
        results=tuple(
            TestResult(test=kind, deployment_id=request.deployment.id, passed=True, summary="all good")
            for kind in request.tests
        ),
        evidence=signed,
    )


async def run_with_forger(stack: Stack, example_package: Path, *activities: Any) -> tuple[Any, str]:
    """A DEV run on a runtime whose task queue only the forger's worker polls; its end."""
    queue = f"isolated-{uuid.uuid4().hex[:8]}"
    await stack.add_runtime(Runtime(name="isolated-dev", stage="DEV", task_queue=queue))
    snap = await stack.register(example_package)
    async with Worker(stack.client, task_queue=queue, activities=list(activities)):
        handle = await stack.start(snap, spec=DEV_GATE)
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    return handle, f"{snap.model}@{snap.version}"


async def test_forged_test_report_from_a_temporal_client_is_refused(
    stack: Stack, example_package: Path
) -> None:
    real = RuntimeActivities(stack.settings)
    stranger = Ed25519PrivateKey.generate()

    @activity.defn(name="run_stage_tests")
    async def forged_tests(request: RunStageTestsInput) -> RunStageTestsResult:
        info = activity.info()
        # signed well, with every field right, by a key no admin registered for the runtime
        signed = evidence.sign_evidence(
            stranger,
            kind="stage_tests",
            runtime="isolated-dev",
            stage=request.stage,
            deployment_id=request.deployment.id,
            workflow_id=info.workflow_id or "",
            run_id=info.workflow_run_id or "",
            snapshot_sha256=request.snapshot.sha256,
            results=list(forged_pass(request).results),
        )
        return forged_pass(request, signed)

    handle, ref = await run_with_forger(
        stack, example_package, real.deploy_online, real.undeploy, forged_tests
    )

    status = json.loads((await stack.mlc("status", ref, "--json")).stdout)
    assert status["state"] == "failed" and "tests failed in DEV" in status["reason"], status
    shown = [r for report in status["reports"] for r in report["results"]]
    assert shown and not any(r["passed"] for r in shown), shown
    assert all(r["summary"].startswith("refused: ") for r in shown), shown
    assert any("no registered evidence key" in note for note in status["refused"]), status["refused"]
    shown_text = " ".join((await stack.mlc("status", ref)).stdout.split())
    assert "refused evidence: the stage_tests result is signed by" in shown_text, shown_text

    reports = await trail.read_entries(stack.pool, kinds=(trail.TEST_REPORT,), workflow_id=handle.id)
    assert reports, "the refused report is recorded"
    for entry in reports:
        body = entry.data()
        assert body["evidence"] == [] and body["refused"], body
        assert not any(r["passed"] for r in body["report"]["results"]), body
    verified = json.loads((await stack.mlc("audit", "verify", "--json")).stdout)
    assert verified["ok"], verified


async def test_forged_deploy_result_is_refused_and_never_recorded(
    stack: Stack, example_package: Path
) -> None:
    real = RuntimeActivities(stack.settings)

    @activity.defn(name="deploy_online")
    async def forged_deploy(request: RuntimeActionInput) -> OnlineDeployResult:
        return OnlineDeployResult(endpoint="http://127.0.0.1:9/attacker", details={"pid": 1})

    handle, ref = await run_with_forger(stack, example_package, forged_deploy, real.undeploy)

    status = json.loads((await stack.mlc("status", ref, "--json")).stdout)
    assert "refused" in status["reason"] and "not signed by a runtime's evidence key" in status["reason"], (
        status
    )
    assert not status["reports"], "nothing was tested on a refused deploy"
    found = await deployments.read_deployments(stack.pool, live_only=False, model=ref.split("@")[0])
    assert found and all(d.endpoint != "http://127.0.0.1:9/attacker" for d in found), found
    assert all(d.state.value == "failed" for d in found), found
    entries = await trail.read_entries(stack.pool, kinds=(trail.DEPLOYMENT,), workflow_id=handle.id)
    assert any("refused" in e.data() for e in entries), "the refusal is in the trail"
    assert not any("attacker" in e.body for e in entries), "the made-up endpoint is recorded nowhere"
    verified = json.loads((await stack.mlc("audit", "verify", "--json")).stdout)
    assert verified["ok"], verified


def rechained(entries: list[trail.Entry], seq: int, body: dict[str, Any]) -> list[trail.Entry]:
    """``entries`` with entry ``seq``'s body replaced and every hash after it recomputed, as
    someone rewriting the whole chain would do: only the signatures can catch it then."""
    out: list[trail.Entry] = []
    previous = trail.GENESIS
    for entry in entries:
        changed = replace(entry, body=json.dumps(body, sort_keys=True)) if entry.seq == seq else entry
        changed = replace(changed, prev_hash=previous)
        changed = replace(changed, hash=changed.expected_hash())
        out.append(changed)
        previous = changed.hash
    return out


async def test_real_runs_are_signed_and_altered_evidence_fails_audit_verify(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    await stack.add_local_runtimes(("DEV",))
    snap = await stack.register(example_package)
    handle = await stack.start(snap, spec=DEV_GATE)
    status = await wait_for_gate(handle, "DEV")
    assert status.reports[0].passed and not status.refused, status

    entries = await trail.read_entries(stack.pool)
    report = next(e for e in entries if e.kind == trail.TEST_REPORT)
    served = next(e for e in entries if e.kind == trail.DEPLOYMENT and e.data().get("evidence"))
    claim = evidence.evidence_of(Envelope.model_validate(report.data()["evidence"][0]))
    assert claim.runtime == "local-dev" and claim.snapshot_sha256 == snap.sha256 and claim.run_id
    deployed = evidence.evidence_of(Envelope.model_validate(served.data()["evidence"]))
    assert deployed.kind == "deploy" and deployed.results["endpoint"] == served.data()["endpoint"]
    root = stack.settings.trust_root
    assert verify_entries(entries, trust_root=root, author_role="lifecycle-author").ok

    body = report.data()
    sig = body["evidence"][0]["signatures"][0]
    sig["sig"] = ("B" if sig["sig"][0] == "A" else "A") + sig["sig"][1:]
    broken = verify_entries(
        rechained(entries, report.seq, body), trust_root=root, author_role="lifecycle-author"
    )
    assert not broken.ok and "bad evidence signature" in broken.problems[0], broken.problems

    body = report.data()
    body["report"]["results"][0]["summary"] = "better than it was"
    broken = verify_entries(
        rechained(entries, report.seq, body), trust_root=root, author_role="lifecycle-author"
    )
    assert not broken.ok and "is signed by no runtime" in broken.problems[0], broken.problems

    body = served.data()
    body["endpoint"] = "http://127.0.0.1:9/elsewhere"
    broken = verify_entries(
        rechained(entries, served.seq, body), trust_root=root, author_role="lifecycle-author"
    )
    assert not broken.ok and "but runtime local-dev signed" in broken.problems[0], broken.problems

    ref = f"{snap.model}@{snap.version}"  # approvals are signed on the recorded, verified report
    assert (await stack.mlc("approve", ref, "--stage", "DEV")).returncode == 0
    await handle.result()
    await keep_history(handle, "ModelLifecycle", "signed_evidence")

    async with stack.pool.acquire() as conn:  # in the database: the chain breaks, verify says where
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(
            'UPDATE audit_log SET body = replace(body, \'"sig":"\', \'"sig":"A\') WHERE seq = $1', report.seq
        )
        await conn.execute("SET session_replication_role = DEFAULT")
    failed = await stack.mlc("audit", "verify")
    assert failed.returncode == 4 and f"entry {report.seq} (test_report" in failed.stdout, failed.stdout


async def test_evidence_keys_rotate_and_revoke_like_peoples_keys(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    await stack.add_local_runtimes(("DEV",))
    old = key_id(evidence.evidence_key(stack.settings.home, "local-dev").public_key())
    revoked = await stack.mlc("runtime", "key", "revoke", "local-dev", old, user=ADMIN)
    assert revoked.returncode == 0, revoked.stderr
    snap = await stack.register(example_package)
    handle = await stack.start(snap, spec=DEV_GATE)
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    status = json.loads((await stack.mlc("status", f"{snap.model}@{snap.version}", "--json")).stdout)
    assert f"evidence key {old} of runtime local-dev has been revoked" in status["reason"], status

    evidence.evidence_key_path(stack.settings.home, "local-dev").unlink()  # the worker's new key
    line = (await stack.mlc("runtime", "key", "show", "local-dev")).stdout.strip()
    assert line.startswith("ssh-ed25519 ")
    added = await stack.mlc("runtime", "key", "add", "local-dev", line, user=ADMIN)
    assert added.returncode == 0, added.stderr
    denied = await stack.mlc("runtime", "key", "add", "local-dev", line)  # not an admin
    assert denied.returncode != 0 and "needs role admin" in denied.stderr, denied.stderr

    handle = await stack.start(snap, spec=DEV_GATE)
    status2 = await wait_for_gate(handle, "DEV")
    assert status2.reports[0].passed, status2
    await handle.terminate()

    keys = json.loads((await stack.mlc("runtime", "key", "list", "--json")).stdout)
    assert {(k["keyid"], k["revoked"]) for k in keys if k["runtime"] == "local-dev"} == {
        (old, True),
        (key_id(evidence.evidence_key(stack.settings.home, "local-dev").public_key()), False),
    }
    bundle = tmp_path / "trail.json"
    assert (await stack.mlc("audit", "export", "--output", str(bundle))).returncode == 0
    exported = json.loads(bundle.read_text())
    assert exported["evidence_keys"][old] == {
        "runtime": "local-dev",
        "public_key": exported["evidence_keys"][old]["public_key"],
        "revoked": True,
    }
    offline = await stack.mlc("audit", "verify", "--bundle", str(bundle), "--json")
    checked = json.loads(offline.stdout)
    assert checked["ok"] and checked["evidence"] >= 2, checked  # evidence signed before the revocation holds


def test_evidence_keys_in_governance_need_an_admin_and_belong_to_one_runtime() -> None:
    root = Signer("root", Ed25519PrivateKey.generate())
    state = g.Governance(pinned_root=root.key_id)
    state.apply(root.governance(g.INIT, g.registration_args("root", root.key.public_key())))
    worker = Ed25519PrivateKey.generate()
    line = public_text(worker.public_key())
    runtime = Runtime(name="r1", stage="DEV").model_dump(mode="json")
    state.apply(root.governance(g.RUNTIME_ADD, {"runtime": runtime, "evidence_key": line}))
    kid = key_id(worker.public_key())
    assert state.evidence_keys[kid].runtime == "r1"
    with pytest.raises(RefusedError, match="already registered"):
        state.apply(root.governance(g.KEY_ADD, {"principal": "bob", "public_key": line}))
    with pytest.raises(RefusedError, match="no runtime 'r2'"):
        state.apply(root.governance(g.RUNTIME_KEY_ADD, {"runtime": "r2", "public_key": line}))
    bob = Signer("bob", Ed25519PrivateKey.generate())
    state.apply(root.governance(g.KEY_ADD, g.registration_args("bob", bob.key.public_key())))
    with pytest.raises(RefusedError, match="bob may not runtime.key.revoke"):
        state.apply(bob.governance(g.RUNTIME_KEY_REVOKE, {"runtime": "r1", "keyid": kid}))

    signed = evidence.sign_evidence(
        worker,
        kind="deploy",
        runtime="r1",
        stage="DEV",
        deployment_id="d1",
        workflow_id="w",
        run_id="r",
        snapshot_sha256="a" * 64,
        results={"endpoint": "http://127.0.0.1:1"},
    )
    check = {"kind": "deploy", "workflow_id": "w", "run_id": "r"}
    assert evidence.check_evidence(signed, state, **check, runtime="r1").results["endpoint"]
    with pytest.raises(RefusedError, match="another"):
        evidence.check_evidence(signed, state, kind="deploy", workflow_id="w", run_id="another")
    with pytest.raises(RefusedError, match="signed by runtime r1's key"):
        evidence.check_evidence(signed, state, **check, runtime="r9")
    state.apply(root.governance(g.RUNTIME_KEY_REVOKE, {"runtime": "r1", "keyid": kid}))
    with pytest.raises(RefusedError, match="has been revoked"):
        evidence.check_evidence(signed, state, **check)
    assert datetime.now(UTC) >= evidence.evidence_of(signed).issued_at


CANARY = LifecycleSpec(
    stages=(
        StageSpec(
            name="DEV",
            tests=(TestKind.SMOKE,),
            rollout=Rollout(strategy=RolloutStrategy.CANARY, steps=(25,), window=timedelta(seconds=1)),
        ),
    )
)


async def test_a_canary_is_not_judged_on_a_forged_observation(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    queue = f"isolated-{uuid.uuid4().hex[:8]}"
    await stack.add_runtime(Runtime(name="gw-dev", stage="DEV", task_queue=queue, gateway=gateway_settings()))
    copies = []
    for name in ("v1", "v2"):
        copy = tmp_path / name
        shutil.copytree(example_package, copy)
        (copy / "NOTES.md").write_text(name)
        copies.append(await stack.register(copy))
    v1, v2 = copies
    async with build_runtime_worker(stack.client, stack.settings, queue):
        await (await stack.start(v1, spec=CANARY)).result()  # nothing to compare with: all at once

    real = RuntimeActivities(stack.settings)

    @activity.defn(name="observe_traffic")
    async def flattering(request: ObserveTrafficInput) -> TrafficObservation:
        seen = await real.observe_traffic(request)  # genuinely signed, then improved upon
        better = tuple(r.model_copy(update={"requests": r.requests + 1000, "errors": 0}) for r in seen.routes)
        return seen.model_copy(update={"routes": better})

    served = [
        a for a in runtime_activities(stack.settings) if getattr(a, "__name__", "") != "observe_traffic"
    ]
    async with Worker(stack.client, task_queue=queue, activities=[*served, flattering]):
        handle = await stack.start(v2, spec=CANARY)
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
    message = str(failure.value.cause)
    assert "the traffic observed in DEV is refused" in message, message
    assert "is not what runtime gw-dev signed" in message, message
    shown = json.loads((await stack.mlc("history", v1.model, "--stage", "DEV", "--json")).stdout)
    assert [r["versions"] for r in shown] == [
        f"v{v1.version} 100%",
        f"v{v2.version} 25%, v{v1.version} 75%",
        f"v{v1.version} 100%",
    ], shown
    assert shown[2]["cause"].startswith("canary stopped at 25%: "), shown[2]


async def test_an_observation_signed_by_another_stages_runtime_is_refused_and_fails_audit(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    queue = f"isolated-{uuid.uuid4().hex[:8]}"
    await stack.add_runtime(Runtime(name="gw-dev", stage="DEV", task_queue=queue, gateway=gateway_settings()))
    other = await stack.add_runtime(
        Runtime(name="gw-prd", stage="PROD", task_queue=f"{queue}-prd", gateway=gateway_settings())
    )
    copies = []
    for name in ("v1", "v2"):
        copy = tmp_path / name
        shutil.copytree(example_package, copy)
        (copy / "NOTES.md").write_text(name)
        copies.append(await stack.register(copy))
    v1, v2 = copies
    async with build_runtime_worker(stack.client, stack.settings, queue):
        await (await stack.start(v1, spec=CANARY)).result()

    real = RuntimeActivities(stack.settings)
    forged: list[Envelope] = []

    @activity.defn(name="observe_traffic")
    async def resigned(request: ObserveTrafficInput) -> TrafficObservation:
        """The real numbers, signed again by PROD's runtime key claiming stage DEV."""
        seen = await real.observe_traffic(request)
        claim = evidence.evidence_of(seen.evidence)  # type: ignore[arg-type]
        signed = evidence.sign_evidence(
            evidence.evidence_key(stack.settings.home, other.name),
            kind="traffic_observation",
            runtime=other.name,
            stage="DEV",
            deployment_id=claim.deployment_id,
            workflow_id=claim.workflow_id,
            run_id=claim.run_id,
            snapshot_sha256=claim.snapshot_sha256,
            results=seen.model_dump(mode="json", exclude={"evidence"}),
        )
        forged.append(signed)
        return seen.model_copy(update={"evidence": signed})

    served = [
        a for a in runtime_activities(stack.settings) if getattr(a, "__name__", "") != "observe_traffic"
    ]
    async with Worker(stack.client, task_queue=queue, activities=[*served, resigned]):
        handle = await stack.start(v2, spec=CANARY)
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
    message = str(failure.value.cause)
    assert "the traffic observed in DEV is refused" in message, message
    assert "signed by runtime gw-prd, which is no runtime of stage DEV" in message, message

    entries = await trail.read_entries(stack.pool)  # in a stored report, audit verify says so too
    report = next(e for e in entries if e.kind == trail.TEST_REPORT and e.workflow_id == handle.id)
    body = report.data()
    body["evidence"].append(forged[0].to_json())
    root = stack.settings.trust_root
    assert verify_entries(entries, trust_root=root, author_role="lifecycle-author").ok
    broken = verify_entries(
        rechained(entries, report.seq, body), trust_root=root, author_role="lifecycle-author"
    )
    assert not broken.ok and "which is no runtime of stage DEV" in broken.problems[0], broken.problems


async def test_the_reconciler_acts_only_on_findings_their_runtime_signed(
    stack: Stack, example_package: Path
) -> None:
    """On a runtime served by its own worker the reconciler cannot probe through the driver
    itself: a finding counts only when that runtime's evidence key signed exactly it."""
    queue = f"isolated-{uuid.uuid4().hex[:8]}"
    await stack.add_runtime(Runtime(name="isolated-dev", stage="DEV", task_queue=queue))
    snap = await stack.register(example_package)
    async with build_runtime_worker(stack.client, stack.settings, queue):
        handle = await stack.start(snap, spec=DEV_GATE)
        await wait_for_gate(handle, "DEV")
        (deployment,) = await deployments.read_deployments(stack.pool, model=snap.model)
        workflow_id = reconciler_id(stack.task_queue, "isolated-dev")
        reconciler = stack.client.get_workflow_handle(workflow_id)

        async def checked() -> bool:
            status = await reconciler.query("status", result_type=ReconcilerStatus)
            return status is not None and status.rounds > 0

        await wait_until(checked, what="the reconciler's first round", timeout=60)
    run_id = await reconcilers.read_first_run(stack.pool, workflow_id)
    assert run_id is not None
    env = ActivityEnvironment(client=stack.client)
    env.info = replace(
        env.info, workflow_type="RuntimeReconciler", workflow_id=workflow_id, workflow_run_id=run_id
    )
    assert stack.worker_pool is not None
    judge = ReconcileInventory(stack.worker_pool, stack.settings)

    async def settle(finding: Finding) -> Settlement:
        return await env.run(
            judge.settle_reconciliation, SettleInput(runtime="isolated-dev", findings=(finding,))
        )

    down = Finding(deployment_id=deployment.id, healthy=False, detail="made up: not answering")
    assert await settle(down) == Settlement(), "an unsigned finding changes nothing"
    key = evidence.evidence_key(stack.settings.home, "isolated-dev")
    facts = down.model_dump(mode="json", exclude={"evidence"})
    sign = {"kind": "probe", "runtime": "isolated-dev", "stage": "DEV", "deployment_id": deployment.id}
    other_run = evidence.sign_evidence(
        key, **sign, workflow_id=workflow_id, run_id="another-run", snapshot_sha256=None, results=facts
    )
    assert await settle(down.model_copy(update={"evidence": other_run})) == Settlement()
    genuine = evidence.sign_evidence(
        key, **sign, workflow_id=workflow_id, run_id=run_id, snapshot_sha256=None, results=facts
    )
    altered = down.model_copy(update={"evidence": genuine, "detail": "something else"})
    assert await settle(altered) == Settlement(), "a finding other than the one signed changes nothing"
    found = await deployments.read_deployment(stack.pool, deployment.id)
    assert found is not None and found.state.value == "serving"
    granted = await settle(down.model_copy(update={"evidence": genuine}))
    assert len(granted.restart) == 1, "the runtime's own signed finding counts"
    await handle.terminate()
