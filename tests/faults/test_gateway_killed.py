"""A runtime's gateway killed (both nginx tiers, ``kill -9``): the runtime's reconciler
applies the recorded routes again within its interval (1 s here), which starts the
gateway afresh, and consumers find the model at the same stable endpoint."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx

from activities.runtimes.gateway import GATEWAYS_DIR
from mlc.domain import LifecycleSpec, Runtime, StageSpec, TestKind
from mlc.store import traffic
from tests.conftest import FIXTURES, gateway_settings
from tests.faults.harness import WAIT_SECONDS, FaultStack, wait_until

MODEL = FIXTURES / "models" / "weak-model"
ONE_STAGE = LifecycleSpec(stages=(StageSpec(name="DEV", tests=(TestKind.SMOKE,)),))


async def _answers(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            return (await http.get(url)).status_code == 200
    except httpx.TransportError:
        return False


async def test_killed_gateway_comes_back_on_its_endpoint(fault_stack: FaultStack) -> None:
    fs = fault_stack
    await fs.stack.add_runtime(
        Runtime(name="local-dev", stage="DEV", task_queue=fs.stack.task_queue, gateway=gateway_settings())
    )
    snap = await fs.stack.register(MODEL)
    await fs.start_worker()
    handle = await fs.stack.start(snap, spec=ONE_STAGE)
    await asyncio.wait_for(handle.result(), WAIT_SECONDS)
    table = await traffic.read_one(fs.stack.pool, "local-dev", snap.model)
    assert table is not None and table.routes, "the promotion routed the stable endpoint"
    health = f"{table.endpoint}/health"
    assert await _answers(health)

    folder = fs.stack.settings.runtime_dir / GATEWAYS_DIR / "local-dev"
    pids = [json.loads(f.read_text())["pid"] for f in folder.glob("*.json") if "pid" in f.read_text()]
    assert len(pids) == 2, f"an edge and a routing nginx master: {sorted(folder.iterdir())}"
    for pid in pids:
        os.killpg(pid, signal.SIGKILL)  # the masters lead their own sessions, workers included
    await wait_until(lambda: _down(health), what="the killed gateway to stop answering", timeout=10)

    await wait_until(lambda: _answers(health), what="the reconciler to bring the gateway back", timeout=60)
    again = await traffic.read_one(fs.stack.pool, "local-dev", snap.model)
    assert again is not None and again.endpoint == table.endpoint and again.routes == table.routes


async def _down(url: str) -> bool:
    return not await _answers(url)
