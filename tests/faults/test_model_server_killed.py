"""A model server killed while it serves: the runtime's reconciler notices within its
interval (1 s here) and restarts it on the same endpoint, and the model's stable endpoint
on the runtime's gateway answers again within that round; or, when the runtime says
``--restart no``, marks the deployment failed with the server's last log lines and
tells the lifecycle's followers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import httpx

from mlc import endpoints
from mlc.domain import DeploymentState, LifecycleSpec, Runtime, StageSpec, TestKind
from mlc.store import deployments, runtimes, trail
from tests.conftest import FIXTURES, gateway_settings
from tests.faults.harness import WAIT_SECONDS, FaultStack, assert_consistent, model_servers, wait_until
from tests.lifecycle_helpers import keep_history

MODEL = FIXTURES / "models" / "weak-model"
ROUND_SECONDS = 1.0
"""The reconcile interval of the fault stack's workers (``MLC_RECONCILE_SECONDS``)."""
ONE_STAGE = LifecycleSpec(stages=(StageSpec(name="DEV", tests=(TestKind.SMOKE,)),))


async def _serving(fs: FaultStack, restart: str) -> tuple[str, int, str]:
    """Run a one-stage lifecycle to completion on a runtime with a gateway; return its
    deployment id, server pid and endpoint."""
    await fs.stack.add_runtime(
        Runtime(
            name="local-dev",
            stage="DEV",
            task_queue=fs.stack.task_queue,
            restart=restart,
            gateway=gateway_settings(),
        )
    )
    snap = await fs.stack.register(MODEL)
    await fs.start_worker()
    handle = await fs.stack.start(snap, spec=ONE_STAGE)
    await asyncio.wait_for(handle.result(), WAIT_SECONDS)
    (deployment,) = await deployments.read_deployments(fs.stack.pool)
    assert deployment.endpoint is not None
    return deployment.id, model_servers(fs.home)[deployment.id], deployment.endpoint


async def test_killed_server_is_restarted_on_its_endpoint(fault_stack: FaultStack) -> None:
    fs = fault_stack
    deployment_id, pid, endpoint = await _serving(fs, "on-failure:3")
    runtime = await runtimes.read_runtime(fs.stack.pool, "local-dev")
    assert runtime.gateway is not None
    stable = runtime.gateway.endpoint("weak-model")
    async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
        assert (await http.get(f"{stable}/health")).status_code == 200
        os.kill(pid, signal.SIGKILL)

        async def restarted() -> bool:
            found = await deployments.read_deployment(fs.stack.pool, deployment_id)
            return found is not None and "restarted_at" in found.details

        await wait_until(restarted, what="the reconciler to restart the server", timeout=60)
        # The round that restarted it also pointed the gateway at the new server: the
        # stable endpoint answers before another round could have repaired it.
        answered = False
        deadline = time.monotonic() + ROUND_SECONDS + 0.5
        while not answered and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                answered = (await http.get(f"{stable}/health")).status_code == 200
            await asyncio.sleep(0.05)
        assert answered, f"the stable endpoint {stable} does not answer after the restart"
        sample = {"amount": 12.5, "hour": 14, "merchant_risk": 0.05, "distance_from_home": 2.0}
        sample |= {"foreign": False, "card_present": True, "velocity_24h": 1}
        scored = await http.post(f"{stable}/score", json=sample)
        assert scored.json()["is_fraud"] == 0
        assert scored.headers["X-MLC-Deployment"] == deployment_id
    found = await deployments.read_deployment(fs.stack.pool, deployment_id)
    assert found is not None and found.state is DeploymentState.SERVING
    assert found.endpoint == endpoint, "the restarted server keeps its endpoint (its socket)"
    assert found.details["restarts"] == 1 and "not running" in found.details["last_failure"]
    assert model_servers(fs.home)[deployment_id] != pid
    assert (await endpoints.get(endpoint, "/health", timeout=5)).status_code == 200
    events = [
        e.data().get("event") for e in await trail.read_entries(fs.stack.pool, kinds=(trail.DEPLOYMENT,))
    ]
    assert events.count("restarted") == 1, events
    notes = await fs.stack.pool.fetch("SELECT message FROM notifications WHERE message LIKE '%restarted%'")
    assert len(notes) == 1 and "weak-model@1 in DEV" in notes[0]["message"], notes
    await assert_consistent(fs, live={("local-dev", "DEV"): 1})
    reconciler = fs.stack.client.get_workflow_handle(f"reconcile/{fs.stack.task_queue}/local-dev")
    await keep_history(reconciler, "RuntimeReconciler", "server_restarted")


async def test_killed_server_is_marked_failed_when_the_runtime_does_not_restart(
    fault_stack: FaultStack,
) -> None:
    fs = fault_stack
    deployment_id, pid, _ = await _serving(fs, "no")
    os.kill(pid, signal.SIGKILL)

    async def failed() -> bool:
        found = await deployments.read_deployment(fs.stack.pool, deployment_id)
        return found is not None and found.state is DeploymentState.FAILED

    await wait_until(failed, what="the reconciler to mark the deployment failed", timeout=60)
    found = await deployments.read_deployment(fs.stack.pool, deployment_id)
    assert found is not None
    assert "not running" in found.details["error"] and "restart policy no" in found.details["error"]
    assert found.details["failed_by"] == "reconciler"
    assert found.details["log_tail"], "the server's last log lines are kept with the deployment"
    notes = [r["message"] for r in await fs.stack.pool.fetch("SELECT message FROM notifications")]
    assert any("failed while serving" in n for n in notes), notes
    await wait_until(
        lambda: not (fs.home / "runtimes" / "local-dev" / deployment_id).exists(), what="removal"
    )
    await assert_consistent(fs, live={})
