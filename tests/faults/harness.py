"""Real processes for fault tests, and the checks every fault test ends with.

Each test gets its own Temporal dev server (on a SQLite file, so it can be killed and
restarted with its state), its own PostgreSQL (restartable, same socket), its own
``MLC_HOME`` and ``mlc worker`` processes started from the real CLI. Nothing is shared
with the rest of the suite, so killing any of them disturbs no other test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.runtimes.base import ProbeRequest
from activities.runtimes.registry import driver_for
from cli.stack.dev_postgres import DevPostgres
from cli.stack.devstack import port_open, temporal_cli
from mlc import processes
from mlc.domain import DeploymentState, RuntimeKind
from mlc.names import SEARCH_ATTRIBUTES
from mlc.store import deployments, runtimes, trail
from tests.conftest import Stack

WAIT_SECONDS = 150.0
"""Upper bound of any single wait in a fault test (the activity timeouts are 20-60 s)."""
PROJECT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TemporalServer:
    """``temporal server start-dev`` on a SQLite file: kill it, start it again, same state."""

    def __init__(self, folder: Path) -> None:
        self.db = folder / "temporal.db"
        self.log = folder / "temporal.log"
        self.port = free_port()
        self._process: Any = None

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it (the same port and file every time) and wait for its port."""
        args = [temporal_cli(), "server", "start-dev", "--headless", "--ip", "127.0.0.1"]
        args += ["--port", str(self.port), "--db-filename", str(self.db), "--log-level", "error"]
        for name, kind in SEARCH_ATTRIBUTES.items():
            args += ["--search-attribute", f"{name}={kind}"]
        with self.log.open("ab") as log:
            self._process = processes.spawn(args, log=log)
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", self.port):
            assert self._process.poll() is None, f"Temporal exited: {self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "Temporal did not open its port in 30 s"
            time.sleep(0.05)

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Stop it with ``signum`` and wait until it is gone."""
        if self._process is not None:
            processes.stop(self._process.pid, signum=signum, child=self._process)
            self._process = None


@dataclass
class FaultStack:
    """A test's own servers and workers (see the module docstring)."""

    stack: Stack
    temporal: TemporalServer
    postgres: DevPostgres
    owner_dsn: str
    worker_dsn: str
    workers: list[asyncio.subprocess.Process] = field(default_factory=list)

    @property
    def home(self) -> Path:
        """The test's ``MLC_HOME``."""
        return self.stack.settings.home

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of ``mlc`` processes of this stack (workers included)."""
        return {
            **self.stack.cli_env,
            "MLC_WORKER_DATABASE_URL": self.worker_dsn,
            "MLC_TRUST_ROOT": self.stack.settings.trust_root or "",
            "MLC_RECONCILE_SECONDS": "1",
            "PYTHONPATH": str(PROJECT),
            **extra,
        }

    async def start_worker(
        self, *, hold: str | None = None, when: str = "before", seconds: float = 3600.0
    ) -> asyncio.subprocess.Process:
        """Start ``mlc worker`` (or, with ``hold``, the same worker holding that activity)."""
        marker = self.marker(hold) if hold else None
        module = ["-m", "tests.faults.paused_worker"] if hold else ["-m", "mlc", "worker"]
        extra = (
            {
                "MLC_FAULT_ACTIVITY": hold,
                "MLC_FAULT_WHEN": when,
                "MLC_FAULT_MARKER": str(marker),
                "MLC_FAULT_SECONDS": str(seconds),
            }
            if hold
            else {}
        )
        log = (self.home / f"worker-{len(self.workers)}.log").open("ab")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *module, env=self.env(**extra), cwd=PROJECT, stdout=log, stderr=log
        )
        log.close()
        self.workers.append(proc)
        return proc

    def marker(self, activity: str) -> Path:
        """The file a held worker writes when it starts holding ``activity``."""
        return self.home / f"held-{activity}.json"

    async def wait_held(self, activity: str) -> None:
        """Wait until a held worker is holding ``activity``."""
        await wait_until(lambda: self.marker(activity).exists(), what=f"the worker to hold {activity}")

    async def kill_worker(self, proc: asyncio.subprocess.Process) -> None:
        """``kill -9`` the worker and reap it."""
        proc.kill()
        await proc.wait()

    async def stop_workers(self) -> None:
        """SIGTERM every live worker (a graceful stop) and reap them."""
        for proc in self.workers:
            if proc.returncode is None:
                proc.terminate()
        for proc in self.workers:
            try:
                await asyncio.wait_for(proc.wait(), timeout=30)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    def worker_logs(self) -> str:
        """Every worker's log, for assertion messages."""
        return "\n".join(
            p.read_text(errors="replace")[-3000:] for p in sorted(self.home.glob("worker-*.log"))
        )


async def wait_until(predicate: Any, *, what: str, timeout: float = WAIT_SECONDS) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)


async def connect_client(address: str) -> Client:
    """A Temporal client with the project's data converter."""
    return await Client.connect(address, data_converter=pydantic_data_converter)


def model_servers(home: Path) -> dict[str, int]:
    """Live model-server processes under ``home``: deployment id -> pid (for deployments in
    a runtime's shared model host, the host's pid: one per deployment linked in it)."""
    found = {}
    for pid in processes.find_processes(f"--package {home}/runtimes/"):
        package = processes.command_line(pid).split("--package ", 1)[1].split(" ", 1)[0]
        found[Path(package).parent.name] = pid
    for pid in processes.find_processes(f"--models-dir {home}/runtimes/"):
        models = Path(processes.command_line(pid).split("--models-dir ", 1)[1].split(" ", 1)[0])
        for link in models.iterdir() if models.is_dir() else ():
            if link.is_symlink():
                found[link.name] = pid
    return found


async def assert_consistent(fs: FaultStack, *, live: dict[tuple[str, str], int]) -> None:
    """What every fault test ends with: the inventory agrees with what runs.

    - live deployments per (runtime, stage) are exactly ``live``, all ``serving`` and
      healthy as their runtime's driver sees them;
    - every model server under the home and every container of the test's runtimes
      belongs to one of them (no orphans), and ``mlc runtime cleanup`` finds nothing;
    - ``mlc audit verify`` passes.
    """
    pool, settings = fs.stack.pool, fs.stack.settings
    found = await deployments.read_deployments(pool)
    assert Counter((d.runtime, d.stage) for d in found) == Counter(live), found
    for d in found:
        assert d.state is DeploymentState.SERVING, d
        runtime = await runtimes.read_runtime(pool, d.runtime)
        probe = await driver_for(runtime, settings).probe(ProbeRequest(deployment_id=d.id, runtime=runtime))
        assert probe.healthy, (d, probe)
    local = {d.id for d in found if d.details.get("runtime_kind") == RuntimeKind.LOCAL.value}
    assert set(model_servers(fs.home)) == local, (model_servers(fs.home), local)
    for runtime in await runtimes.read_runtimes(pool):
        cleaned = await fs.stack.mlc("runtime", "cleanup", runtime.name, "--json")
        assert cleaned.returncode == 0, cleaned.stderr
        assert json.loads(cleaned.stdout)[0]["removed"] == [], cleaned.stdout
    verified = await fs.stack.mlc("audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def assert_trail(fs: FaultStack, handle: WorkflowHandle[Any, Any], *, decisions: int) -> None:
    """The run's trail is complete: started and ended once, every decision recorded once."""
    run_id = (await handle.describe()).run_id
    entries = await trail.read_entries(fs.stack.pool, workflow_id=handle.id, run_id=run_id)
    events = Counter(e.data().get("event") for e in entries if e.kind == trail.RUN)
    assert events["started"] == 1 and events["ended"] == 1, events
    recorded = [e for e in entries if e.kind == trail.DECISION]
    assert len(recorded) == decisions, [e.data() for e in recorded]
    assert len({e.nonce for e in recorded}) == decisions
    assert any(e.kind == trail.TEST_REPORT for e in entries)
    assert any(e.kind == trail.DEPLOYMENT for e in entries)


def leftover_processes(marker: str) -> list[str]:
    """Command lines of live processes mentioning ``marker`` (a test's tmp folder)."""
    return [processes.command_line(pid) for pid in processes.find_processes(marker)]


def environ_without_servers() -> dict[str, str]:
    """This process's environment minus anything pointing ``mlc`` at other servers."""
    drop = (
        "MLC_DATABASE_URL",
        "MLC_WORKER_DATABASE_URL",
        "TEMPORAL_ADDRESS",
        "MLC_HOME",
        "MLC_TRUST_ROOT",
        "MLC_API_URL",
    )
    return {k: v for k, v in os.environ.items() if k not in drop}
