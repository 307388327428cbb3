"""One-step rollback: `mlc rollback` puts the previous version back behind PROD's endpoint.

Real Temporal, PostgreSQL, model servers and nginx gateways (local runtimes with a
gateway). PROD stays protected (admitted by UAT), so the rollback's run is admitted by its
verified, signed rollback decision alone. Warm: the previous version still runs in standby
and answers again within seconds. Cold: it was retired, so it is redeployed from its
snapshot and smoke-tested first. Refused: a signer without the approver role, a version
that never served the stage, a replayed statement; nothing changes then.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from cli.rollbacks import roll_back
from mlc.contracts.lifecycle import SignedDecision
from mlc.domain import (
    ApprovalGate,
    Decision,
    DeploymentState,
    LifecycleSpec,
    ModelRef,
    ModelSnapshot,
    StageSpec,
    TestKind,
)
from mlc.errors import RefusedError
from mlc.lifecycle_client import send_decision, sign_decision
from mlc.statements import Envelope
from mlc.store import deployments, runs, traffic, trail
from tests.conftest import APPROVER, Stack
from tests.lifecycle_helpers import keep_history, wait_for_gate

REASON = "error rate doubled after v2"


def uat_prod(grace: timedelta) -> LifecycleSpec:
    """UAT (smoke, gate) then PROD (smoke, no gate): PROD is admitted by the UAT approval."""
    return LifecycleSpec(
        stages=(
            StageSpec(name="UAT", tests=(TestKind.SMOKE,), gate=ApprovalGate(), grace=grace),
            StageSpec(name="PROD", tests=(TestKind.SMOKE,), grace=grace),
        )
    )


async def promote(stack: Stack, snap: ModelSnapshot, spec: LifecycleSpec) -> None:
    """Run ``snap`` through UAT (approved by alice) into PROD."""
    handle = await stack.start(snap, spec=spec)
    await wait_for_gate(handle, "UAT")
    ref = ModelRef(model=snap.model, version=snap.version)
    _, envelope = await sign_decision(
        stack.client, stack.pool, stack.signers[APPROVER], ref, stage="UAT", decision=Decision.APPROVED
    )
    await send_decision(handle, ref, SignedDecision(envelope=envelope), approve=True)
    await handle.result()


async def prod_endpoint(stack: Stack, model: str) -> str:
    (table,) = await traffic.read_traffic(stack.pool, model=model, stage="PROD")
    return table.endpoint


async def answering(endpoint: str) -> int:
    """The version answering a stable endpoint (its model server's ``/health``)."""
    import httpx

    async with httpx.AsyncClient() as http:
        answer = await http.get(f"{endpoint}/health", timeout=10)
    assert answer.status_code == 200, f"{endpoint} answered {answer.status_code}: {answer.text[:200]}"
    return int(answer.json()["version"])


async def prod_deployment(stack: Stack, snap: ModelSnapshot) -> str:
    found = await deployments.read_deployments(stack.pool, model=snap.model, stage="PROD", live_only=False)
    return next(d.id for d in found if d.version == snap.version)


async def wait_retired(stack: Stack, deployment_id: str, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        found = await deployments.read_deployment(stack.pool, deployment_id)
        if found is not None and found.state is DeploymentState.RETIRED:
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"{deployment_id} was not retired")


async def rollback_decisions(stack: Stack, model: str) -> list[dict[str, object]]:
    entries = await trail.read_entries(stack.pool, kinds=(trail.DECISION,), model=model)
    return [e.data() for e in entries if e.data().get("decision") == "rollback"]


async def test_rollback_to_a_warm_version(stack: Stack, example_package: Path, tmp_path: Path) -> None:
    await stack.add_local_runtimes(("UAT", "PROD"), gateway=True)
    v1, v2 = await stack.register_versions(example_package, tmp_path, 2)
    spec = uat_prod(timedelta(hours=1))
    await promote(stack, v1, spec)
    await promote(stack, v2, spec)
    endpoint = await prod_endpoint(stack, v1.model)
    assert await answering(endpoint) == v2.version
    before = await trail.read_entries(stack.pool, kinds=(trail.TRAFFIC,), model=v1.model)

    # a principal without the approver role is refused, and nothing changes
    await stack.add_principal("bob")
    refused = await stack.mlc("rollback", v1.model, "--stage", "PROD", "--reason", "I think so", user="bob")
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert "bob may not roll cc-fraud back in PROD" in refused.stderr, refused.stderr
    assert await answering(endpoint) == v2.version
    assert await trail.read_entries(stack.pool, kinds=(trail.TRAFFIC,), model=v1.model) == before
    assert await rollback_decisions(stack, v1.model) == []

    # alice rolls back: v1 is still warm (standby), so the endpoint answers with it within seconds
    done = await stack.mlc("rollback", v1.model, "--stage", "PROD", "--reason", REASON, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert (result["version"], result["replaced"], result["signer"]) == (v1.version, v2.version, APPROVER)
    ((rolled),) = result["runtimes"]
    assert rolled["warm"] is True and rolled["endpoint"] == endpoint
    assert result["seconds"] < 10, f"a warm rollback takes seconds, not {result['seconds']}"
    assert await answering(endpoint) == v1.version

    # the decision, with signer and reason, is in the audit trail; the change in the history
    (decision,) = await rollback_decisions(stack, v1.model)
    assert (decision["approver"], decision["comment"], decision["stage"]) == (APPROVER, REASON, "PROD")
    assert (decision["version"], decision["replaces"]) == (v1.version, v2.version)
    shown = await stack.mlc("history", v1.model, "--stage", "PROD", "--json")
    assert shown.returncode == 0, shown.stderr
    last = json.loads(shown.stdout)[-1]
    assert last["versions"] == f"v{v1.version} 100%"
    assert (last["cause"], last["actor"]) == (f"rollback by {APPROVER}: {REASON}", APPROVER)
    audit = await stack.mlc("audit", "show", f"{v1.model}@{v1.version}", "--json")
    assert any(d["decision"] == "rollback" for d in json.loads(audit.stdout)["decisions"]), audit.stdout
    verified = await stack.mlc("audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # v2 goes to standby, as after a promotion; the rollback's run has ended
    standby = await deployments.read_deployment(stack.pool, await prod_deployment(stack, v2))
    assert standby is not None and standby.state is DeploymentState.SERVING
    assert standby.details.get("retire_after"), "v2 stays warm for the grace"
    run = await runs.read_run(stack.pool, result["workflow_id"], result["run_id"])
    assert run is not None and run["lifecycle"] == "Rollback" and run["ended_at"] is not None
    assert run["started_by"] == APPROVER and run["state"] == "succeeded"
    await keep_history(stack.client.get_workflow_handle(result["workflow_id"]), "Rollback", "warm")

    # the same signed statement counts once
    statement = (await trail.read_entries(stack.pool, kinds=(trail.DECISION,), model=v1.model))[-1].signed()
    assert isinstance(statement, Envelope)
    with pytest.raises(RefusedError, match="replayed statement"):
        await roll_back(stack.client, statement, task_queue=stack.task_queue)
    assert await answering(endpoint) == v1.version


async def test_rollback_to_a_cold_version(stack: Stack, example_package: Path, tmp_path: Path) -> None:
    await stack.add_local_runtimes(("UAT", "PROD"), gateway=True)
    v1, v2, v3 = await stack.register_versions(example_package, tmp_path, 3)
    spec = uat_prod(timedelta(0))  # what stops answering is retired at once
    await promote(stack, v1, spec)
    await promote(stack, v2, spec)
    old = await prod_deployment(stack, v1)
    await wait_retired(stack, old)
    endpoint = await prod_endpoint(stack, v1.model)
    assert await answering(endpoint) == v2.version

    # a version that never served PROD is refused
    never = await stack.mlc(
        "rollback", v1.model, "--stage", "PROD", "--to", str(v3.version), "--reason", "try v3"
    )
    assert never.returncode == 4, never.stdout + never.stderr
    assert f"cc-fraud@{v3.version} never served PROD" in never.stderr, never.stderr
    assert await rollback_decisions(stack, v1.model) == []

    # v1 is cold: redeployed from its snapshot, smoke-tested, then routed
    done = await stack.mlc(
        "rollback", v1.model, "--stage", "PROD", "--to", str(v1.version), "--reason", REASON, "--json"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    ((rolled),) = result["runtimes"]
    assert rolled["warm"] is False and rolled["version"] == v1.version
    assert rolled["deployment_id"] != old, "a new deployment, made by the rollback's run"
    assert await answering(endpoint) == v1.version
    fresh = await deployments.read_deployment(stack.pool, rolled["deployment_id"])
    assert fresh is not None and fresh.state is DeploymentState.SERVING
    assert fresh.workflow_id == result["workflow_id"] and fresh.details["run_id"] == result["run_id"]
    reports = await trail.read_entries(
        stack.pool, kinds=(trail.TEST_REPORT,), workflow_id=result["workflow_id"], run_id=result["run_id"]
    )
    assert [r.data()["report"]["results"][0]["passed"] for r in reports] == [True], "smoke-tested first"
    (decision,) = await rollback_decisions(stack, v1.model)
    assert decision["cold"] == ["local-prod"] and decision["approver"] == APPROVER
    table = await stack.mlc("rollback", v1.model, "--stage", "PROD", "--reason", "back to v2")
    assert table.returncode == 0 and "v2 answers again (was v1)" in table.stdout, table.stdout + table.stderr
    await keep_history(stack.client.get_workflow_handle(result["workflow_id"]), "Rollback", "cold")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--stage", "PROD"), 2, "Missing option '--reason'"),
        (("--reason", "x"), 2, "Missing option '--stage'"),
        (("--stage", "PROD", "--reason", "x", "--to", "0"), 2, "Invalid value for '--to'"),
        (("--stage", "PROD", "--reason", "  "), 1, "a rollback needs a reason"),
        (("--stage", "PROD", "--reason", "x"), 5, "no inventory database"),
    ],
    ids=["no-reason", "no-stage", "bad-version", "empty-reason", "no-servers"],
)
def test_rollback_usage_errors(args: tuple[str, ...], code: int, message: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MLC_DATABASE_URL", "TEMPORAL_ADDRESS")}
    done = subprocess.run(
        [sys.executable, "-m", "mlc", "rollback", "cc-fraud", *args],
        env={**env, "MLC_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == code, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_previous_version_is_taken_per_runtime() -> None:
    """A plain rollback puts back, on every runtime of the stage, the version that answered
    there before the current one; runtimes that disagree need --to."""
    from activities.rollback import previous_version
    from mlc.errors import RefusedError

    def routes(*shares: tuple[int, int]) -> list[dict[str, object]]:
        return [{"deployment_id": f"d{v}", "version": v, "weight": w} for v, w in shares]

    lockstep = [
        ("prod-a", routes((1, 100))),
        ("prod-b", routes((1, 100))),
        ("prod-a", routes((2, 100))),
        ("prod-b", routes((2, 100))),
    ]
    assert previous_version(lockstep, what="m in PROD") == 1
    # a canary on one runtime only: its steps do not make v1 "current" elsewhere
    canary_on_a = [*lockstep, ("prod-a", routes((2, 75), (3, 25))), ("prod-a", routes((2, 100)))]
    assert previous_version(canary_on_a, what="m in PROD") == 1
    apart = [*lockstep, ("prod-b", routes((3, 100)))]
    with pytest.raises(RefusedError, match="prod-a: v1, prod-b: v2"):
        previous_version(apart, what="m in PROD")
    with pytest.raises(RefusedError, match="nothing to roll back to"):
        previous_version([("prod-a", routes((1, 100)))], what="m in PROD")
