"""Restarts of the servers under a running lifecycle: Temporal (same SQLite file) and
PostgreSQL, each while a deploy's result is on its way; the worker and the clients
reconnect by themselves and the run completes."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

from mlc.domain import ApprovalGate, LifecycleSpec, StageSpec, TestKind
from tests.conftest import FIXTURES
from tests.faults.harness import WAIT_SECONDS, FaultStack, assert_consistent, assert_trail
from tests.lifecycle_helpers import wait_for_gate

MODEL = FIXTURES / "models" / "weak-model"
GATED = LifecycleSpec(stages=(StageSpec(name="DEV", tests=(TestKind.SMOKE,), gate=ApprovalGate()),))
HOLD_SECONDS = 2.0
DOWN_SECONDS = 4.0
"""The deploy's result is held for HOLD_SECONDS and the server is down for DOWN_SECONDS
from the hold's start, so the result (and the writes after it) meet a dead server."""


async def _run_with_restart(fs: FaultStack, restart: Callable[[], Awaitable[None]]) -> None:
    await fs.stack.add_local_runtimes(("DEV",))
    snap = await fs.stack.register(MODEL)
    await fs.start_worker(hold="deploy_online", when="after", seconds=HOLD_SECONDS)
    handle = await fs.stack.start(snap, spec=GATED)
    await fs.wait_held("deploy_online")
    await restart()
    await wait_for_gate(handle, "DEV")
    approved = await fs.stack.mlc("approve", f"{snap.model}@{snap.version}", "--stage", "DEV")
    assert approved.returncode == 0, approved.stdout + approved.stderr + fs.worker_logs()
    await asyncio.wait_for(handle.result(), WAIT_SECONDS)
    await assert_consistent(fs, live={("local-dev", "DEV"): 1})
    await assert_trail(fs, handle, decisions=1)


async def test_temporal_server_killed_and_restarted_mid_run(fault_stack: FaultStack) -> None:
    fs = fault_stack

    async def restart() -> None:
        fs.temporal.kill(signal.SIGKILL)
        await asyncio.sleep(DOWN_SECONDS)
        fs.temporal.start()

    await _run_with_restart(fs, restart)


async def test_postgres_restarted_mid_run(fault_stack: FaultStack) -> None:
    fs = fault_stack

    async def restart() -> None:
        fs.postgres.stop()
        await asyncio.sleep(DOWN_SECONDS)
        fs.postgres.start()  # same data folder, same socket: the DSNs in use stay valid

    await _run_with_restart(fs, restart)
