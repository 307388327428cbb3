"""A lifecycle across kinds: DEV on a local runtime, SIT/UAT/PROD in Docker containers,
PROD's activities served by a separate `mlc worker --runtime` process (as next to a
remote engine)."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowFailureError

from activities.runtimes.docker import spares
from mlc.domain import DockerSettings, Runtime, RuntimeKind
from mlc.store import deployments, runtimes
from tests.conftest import DOCKER_BASE_IMAGE, FIXTURES, Stack, call_model
from tests.lifecycle_helpers import start_like_ui, wait_for_gate


async def test_local_dev_then_docker_stages_reach_prod(
    stack: Stack, example_package: Path, docker_engine: Any
) -> None:
    snap = await stack.register(example_package)
    await stack.add_local_runtimes(("DEV",))
    engine_queue = f"{stack.task_queue}-prod-engine"
    for stage in ("SIT", "UAT", "PROD"):
        await stack.add_runtime(
            Runtime(
                name=f"docker-{stage.lower()}",
                kind=RuntimeKind.DOCKER,
                stage=stage,
                service_tags=("cc-fraud",),
                task_queue=engine_queue if stage == "PROD" else stack.task_queue,
                docker=DockerSettings(base_image=DOCKER_BASE_IMAGE, network_mode="host", memory="512m"),
            ),
        )
    engine_worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mlc",
        "worker",
        "--runtime",
        "docker-prod",
        env=stack.cli_env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        handle = await start_like_ui(
            stack.client,
            {"model": snap.model, "version": snap.version},
            workflow_id=f"docker-{uuid.uuid4().hex[:8]}",
            task_queue=stack.task_queue,
        )
        ref = f"{snap.model}@{snap.version}"
        for stage in ("DEV", "SIT", "UAT"):
            status = await wait_for_gate(handle, stage)
            assert all(r.passed for r in status.reports), status.reports
            approved = await stack.mlc("approve", ref, "--stage", stage)
            assert approved.returncode == 0, approved.stderr
        await handle.result()
    finally:
        engine_worker.terminate()
        _, err = await engine_worker.communicate()
    assert engine_worker.returncode in (0, -15), err.decode()[-2000:]

    live = {d.stage: d for d in await deployments.read_deployments(stack.pool, model=snap.model)}
    assert set(live) == {"DEV", "SIT", "UAT", "PROD"}
    assert live["DEV"].details["runtime_kind"] == "local"
    for stage in ("SIT", "UAT", "PROD"):
        container = docker_engine.containers.get(live[stage].details["container_id"])
        assert container.status == "running"
        assert container.labels["mlc.deployment-id"] == live[stage].id
        assert container.attrs["HostConfig"]["NetworkMode"] == "none"
        assert (await call_model(live[stage].endpoint, "/health")).status_code == 200
    for deployment in live.values():
        if deployment.details.get("container_id"):
            docker_engine.containers.get(deployment.details["container_id"]).remove(force=True)
    for runtime in await runtimes.read_runtimes(stack.pool):
        if runtime.kind is RuntimeKind.DOCKER:  # the warm spares each deploy left
            await spares.drop_spares(stack.settings, runtime)


async def test_container_crashing_at_start_fails_its_stage_with_the_log(
    stack: Stack, docker_engine: Any
) -> None:
    snap = await stack.register(FIXTURES / "models" / "crash-model")
    await stack.add_runtime(
        Runtime(
            name="docker-dev",
            kind=RuntimeKind.DOCKER,
            stage="DEV",
            task_queue=stack.task_queue,
            docker=DockerSettings(
                base_image=DOCKER_BASE_IMAGE, network_mode="host", health_timeout_seconds=30
            ),
        ),
    )
    handle = await start_like_ui(
        stack.client,
        {"model": snap.model, "version": snap.version},
        workflow_id=f"crash-{uuid.uuid4().hex[:8]}",
        task_queue=stack.task_queue,
    )
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    message = str(failure.value.cause)
    assert "to runtime docker-dev in DEV failed" in message
    assert "fails on purpose" in message, "the container's log tail is in the error"
    (deployment,) = await deployments.read_deployments(stack.pool, model=snap.model, live_only=False)
    assert deployment.state.value == "failed"
    assert (
        docker_engine.containers.list(all=True, filters={"label": f"mlc.deployment-id={deployment.id}"}) == []
    )
