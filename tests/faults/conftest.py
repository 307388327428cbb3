"""Fixtures of the fault tests: a stack of real, killable processes per test."""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from activities.runtimes.base import CleanupRequest
from activities.runtimes.registry import driver_for
from activities.runtimes.registry import remove_gateway as stop_gateway
from cli.stack.dev_postgres import DevPostgres
from mlc.config import Settings
from mlc.store import connect, runtimes
from mlc.store.db import enable_worker_login
from tests.conftest import make_database, trusted_stack
from tests.faults.harness import FaultStack, TemporalServer, connect_client, leftover_processes


@pytest.fixture
async def fault_stack(tmp_path: Path) -> AsyncIterator[FaultStack]:
    """Temporal, PostgreSQL and a trusted inventory of this test's own; workers are started
    by the test. On teardown everything is stopped and nothing of it may be left running."""
    temporal = TemporalServer(tmp_path)
    temporal.start()
    postgres = DevPostgres(tmp_path / "pg", tmp_path / "pg.log")
    fs: FaultStack | None = None
    try:
        database = await make_database(postgres.start())
        pool = await connect(database)
        queue = f"faults-{uuid.uuid4().hex[:8]}"
        settings = replace(
            Settings.from_env(home=tmp_path / "home"),
            database_url=database,
            temporal_address=temporal.address,
            task_queue=queue,
        )
        client = await connect_client(temporal.address)
        stack = await trusted_stack(client, settings, pool, task_queue=queue, keys=tmp_path / "keys")
        fs = FaultStack(
            stack=stack,
            temporal=temporal,
            postgres=postgres,
            owner_dsn=database,
            worker_dsn=await enable_worker_login(pool, database),
        )
        yield fs
    finally:
        if fs is not None:
            await fs.stop_workers()
            for runtime in await runtimes.read_runtimes(fs.stack.pool):
                await driver_for(runtime, fs.stack.settings).cleanup(CleanupRequest(runtime=runtime))
                await stop_gateway(fs.stack.settings, runtime)  # its nginx tiers outlive cleanup
            await fs.stack.pool.close()
        temporal.kill(signal.SIGTERM)
        postgres.stop()
    assert leftover_processes(str(tmp_path)) == []
