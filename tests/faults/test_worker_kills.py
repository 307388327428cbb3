"""``kill -9`` of the worker at the worst moments, then a fresh ``mlc worker``.

Each test ends with the lifecycle completed, one live deployment, no orphan process,
``mlc runtime cleanup`` finding nothing, the trail complete and ``mlc audit verify``
passing. The waits are Temporal's: an activity whose worker died is retried once its
heartbeat (deploy, tests) or start-to-close timeout (inventory) runs out.
"""

from __future__ import annotations

import asyncio

import pytest

from mlc.domain import ApprovalGate, LifecycleSpec, ModelSnapshot, StageSpec, TestKind
from tests.conftest import FIXTURES, Stack
from tests.faults.harness import WAIT_SECONDS, FaultStack, assert_consistent, assert_trail, model_servers
from tests.lifecycle_helpers import wait_for_gate

MODEL = FIXTURES / "models" / "weak-model"
"""Pure Python (no scikit-learn to import): its server is up in well under a second."""
ONE_STAGE = LifecycleSpec(stages=(StageSpec(name="DEV", tests=(TestKind.SMOKE,)),))
GATED = LifecycleSpec(stages=(StageSpec(name="DEV", tests=(TestKind.SMOKE,), gate=ApprovalGate()),))
LIVE = {("local-dev", "DEV"): 1}


async def _prepare(stack: Stack) -> ModelSnapshot:
    await stack.add_local_runtimes(("DEV",))
    return await stack.register(MODEL)


@pytest.mark.parametrize(
    ("activity", "when"),
    [("deploy_online", "after"), ("run_stage_tests", "before")],
    ids=["during-deploy", "during-stage-tests"],
)
async def test_worker_killed_during_an_activity(fault_stack: FaultStack, activity: str, when: str) -> None:
    fs = fault_stack
    snap = await _prepare(fs.stack)
    held = await fs.start_worker(hold=activity, when=when)
    handle = await fs.stack.start(snap, spec=ONE_STAGE)
    await fs.wait_held(activity)
    servers = model_servers(fs.home)
    assert len(servers) == 1, servers  # deploy_online started the server either way
    await fs.kill_worker(held)
    await fs.start_worker()

    await asyncio.wait_for(handle.result(), WAIT_SECONDS)
    assert model_servers(fs.home) == servers, "the retried deploy must adopt the server, not start another"
    await assert_consistent(fs, live=LIVE)
    await assert_trail(fs, handle, decisions=0)


async def test_worker_killed_while_a_gate_waits(fault_stack: FaultStack) -> None:
    fs = fault_stack
    snap = await _prepare(fs.stack)
    worker = await fs.start_worker()
    handle = await fs.stack.start(snap, spec=GATED)
    await wait_for_gate(handle, "DEV")
    servers = model_servers(fs.home)
    await fs.kill_worker(worker)
    await fs.start_worker()

    approved = await fs.stack.mlc("approve", f"{snap.model}@{snap.version}", "--stage", "DEV")
    assert approved.returncode == 0, approved.stderr
    await asyncio.wait_for(handle.result(), WAIT_SECONDS)
    assert model_servers(fs.home) == servers
    await assert_consistent(fs, live=LIVE)
    await assert_trail(fs, handle, decisions=1)


async def test_worker_killed_between_an_approval_and_its_audit_row(fault_stack: FaultStack) -> None:
    """The update is accepted, the trusted activity that verifies and records the decision
    has not written its row: the approval must be recorded exactly once, after the restart."""
    fs = fault_stack
    snap = await _prepare(fs.stack)
    held = await fs.start_worker(hold="verify_decision", when="before")
    handle = await fs.stack.start(snap, spec=GATED)
    await wait_for_gate(handle, "DEV")
    ref = f"{snap.model}@{snap.version}"
    approving = asyncio.create_task(fs.stack.mlc("approve", ref, "--stage", "DEV"))
    await fs.wait_held("verify_decision")
    await fs.kill_worker(held)
    await fs.start_worker()

    approved = await asyncio.wait_for(approving, WAIT_SECONDS)
    assert approved.returncode == 0, approved.stdout + approved.stderr + fs.worker_logs()
    await asyncio.wait_for(handle.result(), WAIT_SECONDS)
    await assert_consistent(fs, live=LIVE)
    await assert_trail(fs, handle, decisions=1)
