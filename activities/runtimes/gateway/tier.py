"""What both gateway tiers share: the files, the nginx life cycle and the reload protocol."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import httpx

from activities.runtimes.base import Heartbeat
from activities.runtimes.gateway.nginx import (
    STATUS_PATH,
    NginxPaths,
    render_edge,
    render_generation,
    render_routes_main,
)
from activities.runtimes.gateway.port import holder as port_holder
from activities.runtimes.gateway.port import taken as port_taken
from mlc import endpoints, processes
from mlc.config import Settings
from mlc.domain import GatewaySettings, Runtime, check_name
from mlc.errors import DeploymentFailedError, RefusedError

GATEWAYS_DIR = "_gateways"
"""Under ``runtime_dir``; runtime names cannot start with ``_``, so it names no runtime."""
STATE_FILE = "gateway.json"
PROBE_FILE = "probe.json"
"""In the gateway's folder (root's, 0600): the key and proof of its status check (see
:func:`activities.runtimes.gateway.nginx.render_generation`)."""
READY_TIMEOUT_SECONDS = 30.0
"""How long a start or reload may take before the gateway counts as failed."""
LOG_ROTATE_BYTES = 64 * 1024 * 1024
"""An access or mirror log past this is renamed ``.1`` (replacing the older) and reopened."""
STOP_TIMEOUT_SECONDS = 10.0
WAIT_BEAT_SECONDS = 5.0
"""How often a change waiting for the gateway's lock says so (well inside a heartbeat timeout)."""

_UNSAFE_PATH = re.compile(r"[\s;{}'\"\\$#]")


def gateway_settings(runtime: Runtime) -> GatewaySettings:
    """The runtime's gateway settings.

    Raises:
        RefusedError: the runtime has none (saying how to give it one).
    """
    if runtime.gateway is None:
        raise RefusedError(
            f"runtime {runtime.name} has no gateway, so its models have no stable endpoint to "
            "route: give the runtime gateway settings (a port, e.g. `mlc runtime add ... "
            "--gateway-port 8700`), then route traffic again"
        )
    return runtime.gateway


def gateway_root(settings: Settings, runtime: Runtime) -> Path:
    """``<runtime_dir>/_gateways/<runtime>``: the gateway's files on the worker's host."""
    root = settings.runtime_dir / GATEWAYS_DIR / check_name(runtime.name, "runtime name")
    if _UNSAFE_PATH.search(str(root.resolve())):
        raise RefusedError(
            f"the gateway folder {root} holds characters nginx configuration cannot take "
            "(spaces, quotes, ';', braces, '$', '#'): set MLC_HOME to a plain path"
        )
    return root


Tier = Literal["routes", "edge"]
TIERS: tuple[Tier, ...] = ("routes", "edge")
"""Started in this order: the edge passes everything to the routing tier's socket."""
MAIN_FILES: dict[Tier, str] = {"routes": "nginx.conf", "edge": "edge.conf"}


class Gateway(abc.ABC):
    """The proxy of one runtime: its files, its two nginx tiers, its reloads.

    Two nginx masters, because a reload closes the idle keep-alive connections of the old
    workers, and a consumer that sent a request on one at that moment would see it reset.
    So consumers connect to the **edge** tier, whose configuration never changes with
    traffic; it passes requests over pooled connections to the **routing** tier (a unix
    socket), which holds the routes and reloads on every change. When an old routing
    worker closes a pooled connection the edge just sent on, the edge sends the request
    again on a fresh one: the consumer sees nothing.
    """

    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.config = gateway_settings(runtime)
        self.root = gateway_root(settings, runtime).resolve()
        self.conf = self.root / "conf"
        self.logs = self.root / "logs"
        self._changed: set[Tier] = set()

    # --- what each kind provides -------------------------------------------------------

    @property
    @abc.abstractmethod
    def paths(self) -> NginxPaths:
        """Where nginx sees its files."""

    @abc.abstractmethod
    def worker_user(self) -> str | None:
        """``USER GROUP`` of nginx's worker processes (None: the master's own user)."""

    @abc.abstractmethod
    def edge_listen(self) -> str:
        """What the edge tier listens on."""

    @abc.abstractmethod
    async def running(self, tier: Tier) -> bool:
        """True when the tier's process or container is up."""

    @abc.abstractmethod
    async def start(self, tier: Tier, heartbeat: Heartbeat) -> None:
        """Start the tier on the current files (it is not running)."""

    @abc.abstractmethod
    async def test(self, tier: Tier) -> str | None:
        """``nginx -t`` of the tier's files: None when valid, else nginx's complaint."""

    @abc.abstractmethod
    async def signal(self, tier: Tier, signum: signal.Signals) -> None:
        """Send ``signum`` to the tier's master (HUP reloads, USR1 reopens logs)."""

    @abc.abstractmethod
    def details(self) -> dict[str, Any]:
        """Facts for the result: pids or containers, config folder."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop both tiers (the files stay)."""

    def backend_address(self, deployment_id: str, address: str) -> str:
        """The address nginx connects to for a backend at ``address`` (``host:port``, or
        ``unix:SOCKET`` of a local server, which only a local gateway can reach).

        Raises:
            RefusedError: a socket behind a gateway that runs elsewhere.
        """
        if address.startswith(endpoints.UNIX_PREFIX):
            raise RefusedError(
                f"deployment {deployment_id} answers on a unix socket of the worker's host, which the "
                f"gateway of runtime {self.runtime.name} ({self.runtime.kind.value}) cannot reach"
            )
        return address

    # --- shared behaviour -------------------------------------------------------------

    def main_config(self, tier: Tier) -> str:
        """The tier's main file for the runtime's current settings."""
        if tier == "edge":
            return render_edge(
                runtime=self.runtime.name,
                listen=self.edge_listen(),
                paths=self.paths,
                user=self.worker_user(),
            )
        return render_routes_main(runtime=self.runtime.name, paths=self.paths, user=self.worker_user())

    @property
    def status_url(self) -> str:
        """The generation marker's URL through the edge, reachable from the worker."""
        host = self.config.host
        if host in ("0.0.0.0", "::", "[::]"):
            host = "127.0.0.1"
        return f"http://{listen_host(host)}:{self.config.port}{STATUS_PATH}"

    @contextlib.asynccontextmanager
    async def locked(self, waiting: Callable[[], None] | None = None) -> AsyncIterator[None]:
        """Hold the gateway's lock: one configuration change at a time, in this process (an
        asyncio lock per event loop and gateway, so waiters hold no thread) and across
        workers on this host (a file lock). ``waiting`` is called every
        :data:`WAIT_BEAT_SECONDS` until it is held (an activity heartbeats: it waits its
        turn, it is not stuck)."""
        lock = _locks.setdefault(asyncio.get_running_loop(), {}).setdefault(self.root, asyncio.Lock())
        beat = asyncio.create_task(_every(WAIT_BEAT_SECONDS, waiting)) if waiting is not None else None
        try:
            async with lock, processes.file_lock(self.root / ".lock"):
                if beat is not None:
                    beat.cancel()
                yield
        finally:
            if beat is not None:
                beat.cancel()

    def _prepare(self) -> None:
        for folder in (self.conf / "http", self.conf / "models", self.logs):
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o755)
        # Root's alone: model processes of this host must not read the access logs and
        # captured answers, nor replace what canaries and shadows are judged on (nginx opens
        # its files as root; a container mounts its folders whatever the parents' modes).
        os.chmod(self.root.parent, 0o711)
        os.chmod(self.root, 0o700)

    def _write(self, path: Path, text: str) -> None:
        """Replace ``path`` atomically (temp file in the same folder, then rename)."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        tmp.replace(path)

    def live_generation_file(self) -> str | None:
        """The generation written in ``generation.conf`` (None when there is none)."""
        try:
            text = (self.conf / "generation.conf").read_text()
        except FileNotFoundError:
            return None
        match = re.search(r'"generation": "([0-9a-f]+)"', text)
        return match.group(1) if match else None

    def probe_secrets(self, *, create: bool = False) -> tuple[str, str] | None:
        """The key and proof of the gateway's status check (made with ``create`` when
        missing; None when there are none, or this user may not read them)."""
        path = self.root / PROBE_FILE
        try:
            found = json.loads(path.read_text())
            return str(found["key"]), str(found["proof"])
        except PermissionError:
            return None
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            if not create:
                return None
        made = secrets.token_hex(16), secrets.token_hex(16)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"key": made[0], "proof": made[1]}, out)
        tmp.replace(path)
        return made

    def _generation_file(self, generation: str) -> str:
        key, proof = self.probe_secrets(create=True) or ("", "")
        return render_generation(self.runtime.name, generation, key=key, proof=proof)

    async def served_generation(self) -> str | None:
        """The generation this gateway answers on a fresh connection: None when nothing
        answers, or something that cannot give the gateway's proof (another program
        holding its port)."""
        found = self.probe_secrets()
        if found is None:
            return None
        key, proof = found
        try:
            async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
                response = await client.get(f"{self.status_url}/{key}", headers={"Connection": "close"})
            answer = response.json() if response.status_code == 200 else None
            if isinstance(answer, dict) and secrets.compare_digest(str(answer.get("proof")), proof):
                return str(answer.get("generation"))
        except (httpx.HTTPError, ValueError):
            pass
        return None

    async def port_problem(self) -> str | None:
        """Why the gateway's port is not its own: another program holds it (None: free, or
        the edge tier runs, which holds it)."""
        if await self.running("edge"):
            return None
        host = listen_host(self.config.host)
        if not await asyncio.to_thread(port_taken, host, self.config.port):
            return None
        holder = await asyncio.to_thread(port_holder, self.config.port)
        return (
            f"port {self.config.port} of the gateway of runtime {self.runtime.name} is held by "
            f"{holder or 'another program'}, not by the gateway: stop it, or give the runtime "
            f"another port (`mlc runtime add {self.runtime.name} ... --gateway-port PORT --replace`)"
        )

    async def health(self) -> str | None:
        """None when the gateway answers with its proof, else why it is down."""
        if await self.served_generation() is not None:
            return None
        if self.probe_secrets() is None and (self.root / PROBE_FILE).exists():
            return "its files are not readable by this user"
        problem = await self.port_problem()
        if problem is not None:
            return problem
        return "not running" if not await self.running("edge") else f"not answering at {self.status_url}"

    async def wait_generation(self, generation: str, heartbeat: Heartbeat, what: str) -> None:
        """Return once the gateway serves ``generation``; raise with its error logs if not."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            if await self.served_generation() == generation:
                return
            down = [t for t in TIERS if not await self.running(t)]
            if time.monotonic() > deadline or down:
                state = f" ({' and '.join(down)} tier not running)" if down else ""
                held = await self.port_problem()
                if held is not None:
                    raise DeploymentFailedError(
                        f"the gateway of runtime {self.runtime.name} did not {what}: {held}"
                    )
                raise DeploymentFailedError(
                    f"the gateway of runtime {self.runtime.name} did not {what} at "
                    f"{self.status_url} within {READY_TIMEOUT_SECONDS:.0f} s{state}; last lines of "
                    f"its error logs:\n{self.error_tail()}"
                )
            heartbeat(f"waiting for the gateway of {self.runtime.name} to {what}")
            await asyncio.sleep(0.05)

    def error_tail(self, lines: int = 20) -> str:
        """The last lines of both tiers' error logs."""
        parts = []
        for name in ("error.log", "edge.error.log"):
            with contextlib.suppress(FileNotFoundError):
                tail = (self.logs / name).read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"{name}:\n" + "\n".join(tail))
        return "\n".join(parts) or "(no error log written)"

    async def ensure(self, heartbeat: Heartbeat) -> bool:
        """Make both tiers run on the runtime's current settings; True when one was started.

        Running tiers are kept (a worker restart does not touch them); a main file is
        rewritten when the settings changed, and the next apply reloads it.
        """
        self._prepare()
        for tier in TIERS:
            path = self.conf / MAIN_FILES[tier]
            main = self.main_config(tier)
            if not path.exists() or path.read_text() != main:
                self._write(path, main)
                self._changed.add(tier)
        if self.live_generation_file() is None:
            self._write(self.conf / "generation.conf", self._generation_file(uuid.uuid4().hex))
        elif self.probe_secrets() is None:  # files written before the gateway had a proof
            generation = self.live_generation_file()
            assert generation is not None
            self._write(self.conf / "generation.conf", self._generation_file(generation))
            if await self.running("routes"):
                await self.signal("routes", signal.SIGHUP)
        started = False
        held = await self.port_problem()
        if held is not None:
            raise DeploymentFailedError(held)
        for tier in TIERS:
            if await self.running(tier):
                continue
            problem = await self.test(tier)
            if problem is not None:
                raise DeploymentFailedError(
                    f"the gateway configuration of runtime {self.runtime.name} in {self.conf} is "
                    f"not valid ({tier} tier):\n{problem}"
                )
            await self.start(tier, heartbeat)
            self._changed.discard(tier)
            started = True
        if started:
            generation = self.live_generation_file()
            assert generation is not None
            await self.wait_generation(generation, heartbeat, "start")
        return started

    async def apply(self, files: dict[Path, str], heartbeat: Heartbeat) -> str:
        """Write ``files`` into the routing tier and reload it; return the generation now live.

        Nothing is reloaded when the files are unchanged and the gateway already serves
        the written generation (an activity retry). When ``nginx -t`` refuses the new
        files, the previous ones are put back and DeploymentFailedError names the problem.
        """
        generation = self.live_generation_file()
        unchanged = all(p.exists() and p.read_text() == text for p, text in files.items())
        if (
            unchanged
            and not self._changed
            and generation is not None
            and await self.served_generation() == generation
        ):
            return generation
        generation = uuid.uuid4().hex
        files = {**files, self.conf / "generation.conf": self._generation_file(generation)}
        previous = {p: p.read_text() if p.exists() else None for p in files}
        for path, text in files.items():
            self._write(path, text)
        problem = await self.test("routes")
        if problem is not None:
            for path, old in previous.items():
                if old is None:
                    path.unlink(missing_ok=True)
                else:
                    self._write(path, old)
            raise DeploymentFailedError(
                f"the new gateway configuration of runtime {self.runtime.name} was refused by "
                f"nginx and the previous one is kept:\n{problem}"
            )
        if "edge" in self._changed:  # new gateway settings (rare): the edge reloads too
            await self.signal("edge", signal.SIGHUP)
        await self.signal("routes", signal.SIGHUP)
        self._changed.clear()
        await self.wait_generation(generation, heartbeat, "reload")
        await self.rotate_logs()
        return generation

    async def rotate_logs(self) -> None:
        """Rename logs past :data:`LOG_ROTATE_BYTES` to ``.1`` and have nginx reopen them."""
        rotated = False
        for log in self.logs.glob("*.log"):
            with contextlib.suppress(FileNotFoundError):
                if log.stat().st_size > LOG_ROTATE_BYTES:
                    log.replace(log.with_name(log.name + ".1"))
                    rotated = True
        if rotated:
            for tier in TIERS:
                await self.signal(tier, signal.SIGUSR1)

    def log_lines(self, name: str) -> list[str]:
        """Lines of ``logs/NAME`` and of its rotated ``.1``, oldest first."""
        lines: list[str] = []
        for path in (self.logs / f"{name}.1", self.logs / name):
            with contextlib.suppress(FileNotFoundError):
                lines.extend(path.read_text(errors="replace").splitlines())
        return lines


_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Path, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)
"""Per event loop, one per gateway folder: see :meth:`Gateway.locked`."""


async def _every(seconds: float, call: Callable[[], None]) -> None:
    """Call ``call`` now and every ``seconds`` until cancelled."""
    while True:
        call()
        await asyncio.sleep(seconds)


def listen_host(host: str) -> str:
    """``host`` as nginx's ``listen`` takes it (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
