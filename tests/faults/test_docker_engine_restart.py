"""A Docker engine restarted while a model container serves.

The shared engine is used by other tests (and other people), so this test runs a second
``dockerd`` of its own (own socket, data and exec roots) and restarts that one. Its
container has docker restart policy ``no``, so the engine does not bring it back: the
runtime's reconciler must (same container, same endpoint), and while the engine is down
it must not mark anything failed, because it cannot know.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlc import processes
from mlc.domain import (
    DeploymentState,
    DockerSettings,
    LifecycleSpec,
    Runtime,
    RuntimeKind,
    StageSpec,
    TestKind,
)
from mlc.store import deployments, trail
from tests.conftest import DOCKER_BASE_IMAGE, FIXTURES, call_model, missing
from tests.faults.harness import WAIT_SECONDS, FaultStack, assert_consistent, wait_until

MODEL = FIXTURES / "models" / "weak-model"
ONE_STAGE = LifecycleSpec(stages=(StageSpec(name="DEV", tests=(TestKind.SMOKE,)),))


class OwnEngine:
    """A ``dockerd`` of this test only, restartable on the same state."""

    def __init__(self) -> None:
        # unix socket paths are limited to ~108 bytes: keep the root short
        self.root = Path(tempfile.mkdtemp(prefix="mlc-dockerd-", dir="/tmp"))
        self.url = f"unix://{self.root}/docker.sock"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start dockerd and wait until it answers."""
        import docker

        args = [
            "dockerd", "--host", self.url, "--data-root", str(self.root / "data"),
            "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"),
            "--bridge=none", "--iptables=false", "--ip-masq=false", "--shutdown-timeout", "5",
        ]  # fmt: skip
        with (self.root / "dockerd.log").open("ab") as log:
            self._process = processes.spawn(args, log=log)
        deadline = time.monotonic() + 60
        while True:
            assert self._process.poll() is None, (self.root / "dockerd.log").read_text()[-3000:]
            try:
                client = docker.DockerClient(base_url=self.url, version="auto")
                client.ping()
                client.close()
                return
            except docker.errors.DockerException:
                assert time.monotonic() < deadline, "the test's dockerd did not answer within 60 s"
                time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM dockerd (it stops its containers first) and wait for it to exit."""
        if self._process is not None:
            processes.stop(self._process.pid, signum=signal.SIGTERM, timeout=60, child=self._process)
            self._process = None

    def client(self) -> Any:
        """A docker-py client of this engine."""
        import docker

        return docker.DockerClient(base_url=self.url, version="auto")

    def remove(self) -> None:
        """Stop it, unmount what it left mounted and delete its folders."""
        self.stop()
        with open("/proc/mounts") as mounts:
            inside = [line.split()[1] for line in mounts if line.split()[1].startswith(str(self.root))]
        for mount in sorted(inside, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def own_engine(docker_engine: Any) -> Iterator[OwnEngine]:
    """A second engine with the base image loaded from the shared one."""
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        missing("a second dockerd needs the dockerd binary and root")
    engine = OwnEngine()
    try:
        engine.start()
        client = engine.client()
        client.images.load(b"".join(docker_engine.images.get(DOCKER_BASE_IMAGE).save(named=True)))
        client.close()
        yield engine
    finally:
        engine.remove()


async def test_engine_restarted_while_a_container_serves(
    own_engine: OwnEngine, fault_stack: FaultStack
) -> None:
    fs = fault_stack
    settings = DockerSettings(
        base_url=own_engine.url,
        base_image=DOCKER_BASE_IMAGE,
        network_mode="host",
        memory="512m",
        restart_policy="no",
    )
    await fs.stack.add_runtime(
        Runtime(
            name="docker-dev",
            kind=RuntimeKind.DOCKER,
            stage="DEV",
            task_queue=fs.stack.task_queue,
            docker=settings,
        )
    )
    snap = await fs.stack.register(MODEL)
    await fs.start_worker()
    handle = await fs.stack.start(snap, spec=ONE_STAGE)
    await asyncio.wait_for(handle.result(), WAIT_SECONDS)
    (before,) = await deployments.read_deployments(fs.stack.pool)

    own_engine.stop()
    await asyncio.sleep(3)  # reconciler rounds meet a dead engine: nothing may be judged
    down = await deployments.read_deployment(fs.stack.pool, before.id)
    assert down is not None and down.state is DeploymentState.SERVING and "restarts" not in down.details
    own_engine.start()

    async def restarted() -> bool:
        found = await deployments.read_deployment(fs.stack.pool, before.id)
        return found is not None and "restarted_at" in found.details

    await wait_until(restarted, what="the reconciler to restart the container", timeout=90)
    after = await deployments.read_deployment(fs.stack.pool, before.id)
    assert after is not None and after.state is DeploymentState.SERVING
    assert after.endpoint == before.endpoint
    assert after.details["container_id"] == before.details["container_id"], (
        "the same container, started again"
    )
    assert (await call_model(after.endpoint, "/health")).status_code == 200
    events = [
        e.data().get("event") for e in await trail.read_entries(fs.stack.pool, kinds=(trail.DEPLOYMENT,))
    ]
    assert events.count("restarted") == 1, events
    await assert_consistent(fs, live={("docker-dev", "DEV"): 1})
