"""A runtime's gateway: one nginx in front of its online deployments, giving stable endpoints.

Consumers call ``http://HOST:PORT/models/MODEL/score`` (the runtime's
:class:`~mlc.domain.GatewaySettings`) and never change it; which deployments answer, with
which share, and which one sees a mirrored copy is the model's routes, applied here.

Files live on the worker's host in ``<runtime_dir>/_gateways/<runtime>/`` (beside the
runtime folders, so a runtime's cleanup, which removes every folder of
``<runtime_dir>/<runtime>/`` not kept, never touches them): ``conf/`` (the main
``nginx.conf``, ``generation.conf`` and each model's two files, see
:mod:`activities.runtimes.gateway_nginx`), ``logs/`` (access, mirror and error logs) and
``gateway.json`` (the local master's pid).

- **local** runtimes run nginx as a detached process (its workers as ``nobody`` when the
  worker is root), found again from ``gateway.json``: a worker restart keeps the endpoint.
- **docker** runtimes run it as the container ``mlc-gateway-<runtime>`` of an image made
  from the host's nginx (:mod:`activities.runtimes.gateway_docker`), ``conf/`` mounted
  read-only and ``logs/`` read-write, hardened like model containers. With
  ``network_mode: host`` it listens on ``gateway.host:port`` of the engine's host; with a
  bridge network it publishes ``gateway.port`` on ``gateway.host`` (only host mode is
  tested here). Either way it reaches the model containers, which have no network, on
  their unix sockets: the runtime's sockets folder (``<runtime_dir>/_sockets/<runtime>``)
  is mounted read-only at ``/run/mlc-models``. The gateway stays a container rather than
  moving to the host: it runs as ``docker.user``, the owner of the models' 0700 socket
  folders, so it opens them without root, and it needs nothing installed on the host
  but the nginx binary its image is made of.

A traffic change writes the model's files (temp file, then rename), checks the whole
configuration with ``nginx -t`` (restoring the previous files if it fails), then reloads
gracefully (SIGHUP): new connections get the new routes while the old workers finish the
requests they hold, and the old deployments stay up until the caller retires them. It
returns only once the gateway serves the new configuration's generation marker.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import grp
import hashlib
import json
import os
import pwd
import re
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import docker.errors
import httpx

from activities.runtimes.base import Heartbeat, check_deployment_id
from activities.runtimes.gateway_docker import ensure_gateway_image, nginx_binary
from activities.runtimes.gateway_nginx import (
    LOG_FLUSH_SECONDS,
    ROUTES_SOCKET,
    STATUS_PATH,
    Backend,
    NginxPaths,
    compare,
    endpoint_parts,
    parse_log,
    render_edge,
    render_generation,
    render_model,
    render_routes_main,
    route_stats,
)
from mlc import endpoints, isolation, processes
from mlc.config import Settings
from mlc.contracts.traffic import RouteStats, RouteTrafficResult, ShadowComparison, TrafficObservation
from mlc.domain import GatewaySettings, Runtime, RuntimeKind, TrafficRoute, check_name, check_routes
from mlc.errors import DeploymentFailedError, NotFoundError, RefusedError
from mlc.serving.capture import CAPTURE_FILE, CAPTURE_MAX_BYTES, read_answers

if TYPE_CHECKING:
    from activities.runtimes.base import RuntimeDriver

GATEWAYS_DIR = "_gateways"
"""Under ``runtime_dir``; runtime names cannot start with ``_``, so it names no runtime."""
STATE_FILE = "gateway.json"
READY_TIMEOUT_SECONDS = 30.0
"""How long a start or reload may take before the gateway counts as failed."""
LOG_ROTATE_BYTES = 64 * 1024 * 1024
"""An access or mirror log past this is renamed ``.1`` (replacing the older) and reopened."""
STOP_TIMEOUT_SECONDS = 10.0

BACKENDS_DIR = "backends"
"""In a local gateway's scratch folder: links to the sockets of the servers it routes to."""

_CONTAINER_CONF = "/etc/mlc-gateway"
_CONTAINER_LOGS = "/var/log/mlc-gateway"
_CONTAINER_RUN = "/run/mlc-gateway"
_CONTAINER_SOCKETS = "/run/mlc-models"
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
_MAIN_FILES: dict[Tier, str] = {"routes": "nginx.conf", "edge": "edge.conf"}


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
        return f"http://{_listen_host(host)}:{self.config.port}{STATUS_PATH}"

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Hold the gateway's file lock: one configuration change at a time, across workers."""
        async with processes.file_lock(self.root / ".lock"):
            yield

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

    async def served_generation(self) -> str | None:
        """The generation the gateway answers on a fresh connection (None: no answer)."""
        try:
            async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
                response = await client.get(self.status_url, headers={"Connection": "close"})
            if response.status_code == 200:
                return str(response.json().get("generation"))
        except (httpx.HTTPError, ValueError):
            pass
        return None

    async def wait_generation(self, generation: str, heartbeat: Heartbeat, what: str) -> None:
        """Return once the gateway serves ``generation``; raise with its error logs if not."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            if await self.served_generation() == generation:
                return
            down = [t for t in TIERS if not await self.running(t)]
            if time.monotonic() > deadline or down:
                state = f" ({' and '.join(down)} tier not running)" if down else ""
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
            path = self.conf / _MAIN_FILES[tier]
            main = self.main_config(tier)
            if not path.exists() or path.read_text() != main:
                self._write(path, main)
                self._changed.add(tier)
        if self.live_generation_file() is None:
            self._write(self.conf / "generation.conf", render_generation(self.runtime.name, uuid.uuid4().hex))
        started = False
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
        files = {**files, self.conf / "generation.conf": render_generation(self.runtime.name, generation)}
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


class LocalGateway(Gateway):
    """Both tiers as detached nginx processes of the worker's host."""

    def _state_path(self, tier: Tier) -> Path:
        return self.root / f"{tier}.json"

    def worker_user(self) -> str | None:
        """``nobody GROUP`` when the worker runs as root, else None (workers run as it)."""
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam("nobody")
        except KeyError:
            return None
        return f"nobody {grp.getgrgid(entry.pw_gid).gr_name}"

    def _scratch(self) -> Path:
        """Request-body buffers and the tier socket: ``root/run``, or a folder of root's with a
        random name in the system temp dir when workers drop to ``nobody`` (who may not
        traverse ``MLC_HOME``), recorded in ``root/scratch`` (see
        :func:`mlc.isolation.private_temp_folder`: nobody can take its name first)."""
        if self.worker_user() is None:
            return self.root / "run"
        return isolation.private_temp_folder(self.root / "scratch", prefix="mlc-gateway-")

    @property
    def paths(self) -> NginxPaths:
        """Host paths."""
        scratch = str(self._scratch())
        return NginxPaths(
            conf=str(self.conf), logs=str(self.logs), temp=scratch, pid=str(self.root), run=scratch
        )

    def edge_listen(self) -> str:
        """The gateway's address."""
        return f"{_listen_host(self.config.host)}:{self.config.port}"

    def _prepare(self) -> None:
        super()._prepare()
        scratch = self._scratch()
        # A real folder of ours (checked), searchable by nginx's workers' group only: the
        # tier socket and the links to model sockets in it are no one else's way in (a
        # model could otherwise reach other models through them: unix sockets do not
        # depend on its network namespace).
        group = self._worker_gid()
        if group is not None:
            os.chown(scratch, os.geteuid(), group)
        os.chmod(scratch, 0o755 if group is None else 0o710)

    def _pid(self, tier: Tier) -> int | None:
        """The tier's live master: the one recorded in its state file or, failing that, in
        nginx's own pid file (a worker killed between spawning a master and recording it
        leaves one that still holds the port: it is adopted, not started twice)."""
        for pid in (self._recorded_pid(tier), self._nginx_pid(tier)):
            command = processes.command_line(pid) if pid > 0 else ""
            if pid > 0 and processes.alive(pid) and str(self.conf / _MAIN_FILES[tier]) in command:
                return pid
        return None

    def _recorded_pid(self, tier: Tier) -> int:
        try:
            return int(json.loads(self._state_path(tier).read_text()).get("pid", 0))
        except (FileNotFoundError, json.JSONDecodeError, ValueError, AttributeError):
            return 0

    def _nginx_pid(self, tier: Tier) -> int:
        try:
            return int((self.root / f"{tier}.pid").read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    async def running(self, tier: Tier) -> bool:
        """The recorded master is alive and runs this tier's file."""
        return self._pid(tier) is not None

    def backend_address(self, deployment_id: str, address: str) -> str:
        """``unix:LINK``: a hard link, in the gateway's scratch folder, to the server's socket.

        The socket sits in the deployment's folder (0700, the model user's), under folders
        nginx's workers (``nobody``) may not search, and its path may be longer than a
        socket address holds; a link to the same socket (a socket is found by its inode)
        in ``backends/`` (root's, searchable by the workers' group only, so no model
        reaches another's socket there) is neither. The link is made from the socket the
        driver checked (:meth:`LocalDriver.socket_user`), opened without following links;
        its name holds the socket's inode, so a server started again (a new socket) is a
        new address: the configuration is written again and reloaded (see :func:`route`).

        Raises:
            DeploymentFailedError: the socket is gone, or cannot be linked there.
        """
        if not address.startswith(endpoints.UNIX_PREFIX):
            return address
        sock = Path(address[len(endpoints.UNIX_PREFIX) :])
        folder = self._scratch() / BACKENDS_DIR
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
        group = self._worker_gid()
        os.chown(folder, os.geteuid(), os.getegid() if group is None else group, follow_symlinks=False)
        os.chmod(folder, 0o700 if group is None else 0o710)
        key = hashlib.sha256(deployment_id.encode()).hexdigest()[:16]
        try:
            fd = os.open(sock, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise DeploymentFailedError(
                f"deployment {deployment_id}: its socket {sock} is gone ({exc.strerror})"
            ) from None
        try:
            info = os.fstat(fd)
            link = folder / f"{key}-{info.st_ino}.sock"
            for old in folder.glob(f"{key}-*.sock"):
                if old != link:
                    old.unlink(missing_ok=True)
            if not _same_file(link, info):
                link.unlink(missing_ok=True)
                _link(fd, sock, link)
        finally:
            os.close(fd)
        return f"{endpoints.UNIX_PREFIX}{link}"

    def _worker_gid(self) -> int | None:
        """The group of nginx's workers when they are not the worker's own user."""
        user = self.worker_user()
        return None if user is None else grp.getgrnam(user.split()[1]).gr_gid

    def _command(self, tier: Tier, *extra: str) -> list[str]:
        error_log = self.logs / ("error.log" if tier == "routes" else "edge.error.log")
        return [
            str(nginx_binary()), "-p", f"{self.root}/", "-c", str(self.conf / _MAIN_FILES[tier]),
            "-e", str(error_log), *extra,
        ]  # fmt: skip

    async def start(self, tier: Tier, heartbeat: Heartbeat) -> None:
        """Spawn the master detached (its own session); it dies with the worker only when
        the settings say servers do (``mlc dev``)."""
        if tier == "routes":
            (self._scratch() / ROUTES_SOCKET).unlink(missing_ok=True)  # left by a killed master
        with (self.logs / f"{tier}.out").open("ab") as log:
            process = processes.spawn(
                self._command(tier),
                log=log,
                die_with_parent=self.settings.servers_die_with_worker,
                cwd=self.root,
            )
        _children[process.pid] = process
        state = {"pid": process.pid, "started_at": time.time()}
        self._write(self._state_path(tier), json.dumps(state))

    async def test(self, tier: Tier) -> str | None:
        """``nginx -t`` of the tier's files as written."""
        result = await asyncio.to_thread(
            subprocess.run, self._command(tier, "-t", "-q"), capture_output=True, text=True, check=False
        )
        return None if result.returncode == 0 else (result.stderr or result.stdout).strip()

    async def signal(self, tier: Tier, signum: signal.Signals) -> None:
        """Signal the tier's master; one that died meanwhile is an error quoting its log."""
        pid = self._pid(tier)
        if pid is None:
            raise DeploymentFailedError(
                f"the gateway of runtime {self.runtime.name} ({tier} tier) is not running; last "
                f"lines of its error logs:\n{self.error_tail()}"
            )
        os.kill(pid, signum)

    def details(self) -> dict[str, Any]:
        """Both masters' pids and the configuration folder."""
        return {
            "pid": self._pid("edge"),
            "routes_pid": self._pid("routes"),
            "config": str(self.conf),
            "logs": str(self.logs),
        }

    async def stop(self) -> None:
        """Stop both masters gracefully (QUIT: workers finish their requests)."""
        for tier in reversed(TIERS):
            pid = self._pid(tier)
            if pid is not None:
                await asyncio.to_thread(
                    processes.stop,
                    pid,
                    signum=signal.SIGQUIT,
                    timeout=STOP_TIMEOUT_SECONDS,
                    child=_children.pop(pid, None),
                )
            self._state_path(tier).unlink(missing_ok=True)


_children: dict[int, subprocess.Popen[bytes]] = {}
"""nginx masters this process started, kept so their exit is reaped."""


def _link(fd: int, sock: Path, link: Path) -> None:
    """Hard-link the socket opened as ``fd`` (found at ``sock``) to ``link``: from the handle
    as root; by its name otherwise (a worker that is not root gives models no user of their
    own: the socket is the worker's own).

    Raises:
        DeploymentFailedError: the two are on different filesystems, or the link failed.
    """
    try:
        if os.geteuid() == 0:
            isolation.link_fd(fd, link)
        else:
            os.link(sock, link, follow_symlinks=False)
    except OSError as exc:
        hint = (
            ": the gateway's scratch folder and MLC_HOME must be on one filesystem (set TMPDIR to a "
            "folder on MLC_HOME's)"
            if exc.errno == errno.EXDEV
            else ""
        )
        raise DeploymentFailedError(f"cannot link {sock} to {link} ({exc.strerror}){hint}") from None


def _same_file(path: Path, info: os.stat_result) -> bool:
    """Whether ``path`` (not followed) is the file ``info`` describes."""
    try:
        mine = os.lstat(path)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (info.st_dev, info.st_ino)


def _listen_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class DockerGateway(Gateway):
    """Both tiers as containers on the runtime's engine: ``mlc-gateway-<runtime>`` (edge)
    and ``mlc-gateway-<runtime>-routes``, sharing the socket folder ``run/``."""

    LABEL = "mlc.gateway-runtime"
    """Not ``mlc.runtime``: the driver's cleanup removes that runtime's unkept containers."""

    def name(self, tier: Tier) -> str:
        """The tier's container name."""
        return f"mlc-gateway-{self.runtime.name}" + ("-routes" if tier == "routes" else "")

    @property
    def paths(self) -> NginxPaths:
        """Mount points inside the containers; temp files and pids in their tmpfs ``/tmp``."""
        return NginxPaths(
            conf=_CONTAINER_CONF, logs=_CONTAINER_LOGS, temp="/tmp", pid="/tmp", run=_CONTAINER_RUN
        )

    def worker_user(self) -> str | None:
        """None: the containers run as ``docker.user`` already."""
        return None

    def backend_address(self, deployment_id: str, address: str) -> str:
        """A model container's socket as the gateway's containers see it: the runtime's
        sockets folder is mounted at a short path (a socket's name holds 107 bytes).

        Raises:
            RefusedError: a socket outside the runtime's sockets folder.
        """
        from activities.runtimes.docker import sockets_root

        root = f"{endpoints.UNIX_PREFIX}{sockets_root(self.settings, self.runtime)}/"
        if address.startswith(root):
            return f"{endpoints.UNIX_PREFIX}{_CONTAINER_SOCKETS}/{address.removeprefix(root)}"
        return super().backend_address(deployment_id, address)

    def _network(self) -> str:
        from activities.runtimes.docker_engine import docker_settings

        return docker_settings(self.runtime).network_mode

    def edge_listen(self) -> str:
        """Host network: the gateway's address; else every address of the container's own
        network, published on ``gateway.host:port``."""
        host = _listen_host(self.config.host) if self._network() == "host" else "0.0.0.0"
        return f"{host}:{self.config.port}"

    def _prepare(self) -> None:
        from activities.runtimes.docker_engine import docker_settings

        super()._prepare()
        uid, _, gid = docker_settings(self.runtime).user.partition(":")
        for folder in (self.logs, self.root / "run"):
            folder.mkdir(parents=True, exist_ok=True)
            if uid.isdigit() and (not gid or gid.isdigit()):  # the containers' user writes here
                os.chown(folder, int(uid), int(gid or uid), follow_symlinks=False)
                os.chmod(folder, 0o700)
            else:  # a user name: only the engine knows its uid
                os.chmod(folder, 0o1777)

    def _wanted(self, tier: Tier) -> str:
        # "uds": gateways started before model sockets were mounted are replaced
        return f"{tier} {self._network()} {self.config.host}:{self.config.port} uds"

    async def _container(self, tier: Tier) -> Any:
        from activities.runtimes.docker_engine import connect

        async with connect(self.runtime, "find the gateway containers") as client:
            try:
                return await asyncio.to_thread(client.containers.get, self.name(tier))
            except docker.errors.NotFound:
                return None

    async def running(self, tier: Tier) -> bool:
        """The tier's container runs with the runtime's current settings."""
        container = await self._container(tier)
        if container is None or container.status != "running":
            return False
        return bool(container.labels.get("mlc.gateway-settings") == self._wanted(tier))

    async def start(self, tier: Tier, heartbeat: Heartbeat) -> None:
        """Build the image if needed, remove a stale container, run the tier's."""
        from activities.runtimes.docker import sockets_root
        from activities.runtimes.docker_engine import connect, docker_settings, run_with_heartbeats

        settings = docker_settings(self.runtime)
        if tier == "routes":
            (self.root / "run" / ROUTES_SOCKET).unlink(missing_ok=True)
        async with connect(self.runtime, f"start the gateway's {tier} container") as client:
            image = await run_with_heartbeats(
                lambda _progress: ensure_gateway_image(client),
                heartbeat,
                first_note=f"building the gateway image of runtime {self.runtime.name}",
            )
            with contextlib.suppress(docker.errors.NotFound):
                old = await asyncio.to_thread(client.containers.get, self.name(tier))
                await asyncio.to_thread(old.remove, force=True)
            options: dict[str, Any] = {"network_mode": settings.network_mode}
            if tier == "edge" and settings.network_mode != "host":
                options["ports"] = {f"{self.config.port}/tcp": (self.config.host, self.config.port)}
            sockets = sockets_root(self.settings, self.runtime)
            sockets.mkdir(parents=True, exist_ok=True)
            volumes = {
                str(self.conf): {"bind": _CONTAINER_CONF, "mode": "ro"},
                str(self.logs): {"bind": _CONTAINER_LOGS, "mode": "rw"},
                str(self.root / "run"): {"bind": _CONTAINER_RUN, "mode": "rw"},
                str(sockets): {"bind": _CONTAINER_SOCKETS, "mode": "ro"},  # the models' sockets
            }
            error_log = "error.log" if tier == "routes" else "edge.error.log"
            await asyncio.to_thread(
                client.containers.run,
                image,
                [
                    "-p",
                    "/tmp/",
                    "-c",
                    f"{_CONTAINER_CONF}/{_MAIN_FILES[tier]}",
                    "-e",
                    f"{_CONTAINER_LOGS}/{error_log}",
                ],
                name=self.name(tier),
                labels={self.LABEL: self.runtime.name, "mlc.gateway-settings": self._wanted(tier)},
                detach=True,
                restart_policy={"Name": "unless-stopped"},
                user=settings.user,
                read_only=True,
                tmpfs={"/tmp": "rw,nosuid,nodev,size=256m"},
                security_opt=["no-new-privileges"],
                cap_drop=["ALL"],
                volumes=volumes,
                **options,
            )

    async def test(self, tier: Tier) -> str | None:
        """``nginx -t`` inside the tier's running container; before it runs, None: a
        container whose nginx refuses its files exits, and the start reports its log."""
        container = await self._container(tier)
        if container is None or container.status != "running":
            return None
        command = [
            "/usr/sbin/nginx", "-t", "-q", "-p", "/tmp/", "-c", f"{_CONTAINER_CONF}/{_MAIN_FILES[tier]}",
            "-e", "stderr",
        ]  # fmt: skip
        code, output = await asyncio.to_thread(container.exec_run, command)
        return None if code == 0 else bytes(output).decode(errors="replace").strip()

    async def signal(self, tier: Tier, signum: signal.Signals) -> None:
        """``docker kill --signal`` to the tier's nginx master (its pid 1)."""
        container = await self._container(tier)
        if container is None or container.status != "running":
            raise DeploymentFailedError(
                f"the gateway container {self.name(tier)} of runtime {self.runtime.name} is not running"
            )
        await asyncio.to_thread(container.kill, signum.name)

    def details(self) -> dict[str, Any]:
        """The containers and the configuration folder."""
        return {
            "container_name": self.name("edge"),
            "routes_container_name": self.name("routes"),
            "config": str(self.conf),
            "logs": str(self.logs),
        }

    async def stop(self) -> None:
        """Remove both containers."""
        for tier in reversed(TIERS):
            container = await self._container(tier)
            if container is not None:
                await asyncio.to_thread(container.remove, force=True)


def gateway_for(settings: Settings, runtime: Runtime) -> Gateway:
    """The gateway of ``runtime`` (local process or docker container by its kind)."""
    if runtime.kind is RuntimeKind.LOCAL:
        return LocalGateway(settings, runtime)
    if runtime.kind is RuntimeKind.DOCKER:
        return DockerGateway(settings, runtime)
    raise RefusedError(f"runtime {runtime.name} ({runtime.kind.value}) has no gateway driver")


def _model_files(gateway: Gateway, model: str) -> tuple[Path, Path]:
    return gateway.conf / "http" / f"{model}.conf", gateway.conf / "models" / f"{model}.conf"


async def route(
    driver: RuntimeDriver,
    runtime: Runtime,
    model: str,
    routes: Sequence[TrafficRoute],
    heartbeat: Heartbeat,
    *,
    repair: bool = False,
    as_of: datetime | None = None,
) -> RouteTrafficResult:
    """Make ``routes`` answer ``model``'s stable endpoint on ``runtime``; return once live.

    Each change leaves ``routes/MODEL.json`` (its routes and ``as_of``, when they were
    decided). With ``repair`` (the reconciler's call, ``as_of`` when the inventory recorded
    its table) a gateway that is down is started again, and the routes are replaced only
    when they differ from the table and the table is newer: a lifecycle that moved traffic
    after the reconciler read the table keeps its change, and a table recorded without
    its change applied (hostile workflow code skipping the route step) wins.

    Each route's deployment is located by ``driver`` (never taken from a payload); a
    route to a deployment that does not run is refused.

    Raises:
        RefusedError: no gateway settings, a bad model name, routes or deployment id.
        NotFoundError: a routed deployment has no live server on the runtime.
        DeploymentFailedError: nginx is missing, refused the configuration, or did not
            start or reload in time (with its error log).
    """
    config = gateway_settings(runtime)
    check_name(model, "model name")
    try:
        check_routes(tuple(routes))
    except ValueError as exc:
        raise RefusedError(f"routes of model {model} on runtime {runtime.name}: {exc}") from None
    for item in routes:
        check_deployment_id(item.deployment_id)
    gateway = gateway_for(driver.settings, runtime)
    async with gateway.locked():
        started = await gateway.ensure(heartbeat)
        http_path, server_path = _model_files(gateway, model)
        applied_path = gateway.root / "routes" / f"{model}.json"
        files = http_path.exists() and server_path.exists()
        held = _held(applied_path) if repair and files else None
        if repair and files and held is None:  # written before routes were recorded: kept
            return _routed(gateway, config, model, started, [])
        if held is not None and _keeps(held, routes, as_of):
            # The routes it holds stay; written again only when a backend's address changed
            # (a server started again by the reconciler answers on a new socket or port).
            routes, decided = held[0], held[1]
            try:
                backends = await _backends(driver, gateway, runtime, routes)
            except (NotFoundError, DeploymentFailedError):
                backends = None  # a routed deployment is down: keep what the gateway has
            if backends is None or held[2] == _addresses(backends):
                return _routed(gateway, config, model, started, backends or [])
        else:
            backends = await _backends(driver, gateway, runtime, routes)
            decided = as_of or datetime.now(UTC)
        http, server = render_model(
            runtime=runtime.name, model=model, backends=backends, logs=gateway.paths.logs
        )
        generation = await gateway.apply({http_path: http, server_path: server}, heartbeat)
        applied_path.parent.mkdir(mode=0o700, exist_ok=True)
        applied = {
            "as_of": decided.isoformat(),
            "routes": [r.model_dump(mode="json") for r in routes],
            "upstreams": _addresses(backends),
        }
        gateway._write(applied_path, json.dumps(applied))
    return _routed(gateway, config, model, started, backends, generation)


async def _backends(
    driver: RuntimeDriver, gateway: Gateway, runtime: Runtime, routes: Sequence[TrafficRoute]
) -> list[Backend]:
    """The routes that get traffic, each located by the driver (which checks a socket's
    owner) and at the address the gateway reaches it by."""
    backends = []
    for item in routes:
        if item.shadow or item.weight > 0:
            endpoint = await driver.locate(runtime, item.deployment_id)
            address, prefix = endpoint_parts(endpoint)
            address = await asyncio.to_thread(gateway.backend_address, item.deployment_id, address)
            backends.append(Backend(route=item, address=address, prefix=prefix))
    return backends


def _addresses(backends: Sequence[Backend]) -> dict[str, str]:
    return {b.route.deployment_id: b.address + b.prefix for b in backends}


def _routed(
    gateway: Gateway,
    config: GatewaySettings,
    model: str,
    started: bool,
    backends: Sequence[Backend],
    generation: str | None = None,
) -> RouteTrafficResult:
    """What :func:`route` answers: the stable endpoint and the gateway's facts."""
    return RouteTrafficResult(
        endpoint=config.endpoint(model),
        details={
            **gateway.details(),
            "generation": generation or gateway.live_generation_file(),
            "started": started,
            "upstreams": {b.route.deployment_id: b.address for b in backends},
        },
    )


Held = tuple[tuple[TrafficRoute, ...], datetime, dict[str, str] | None]
"""Routes a gateway holds, when they were decided, and the addresses they were written with."""


def _held(applied_path: Path) -> Held | None:
    """What ``routes/MODEL.json`` says the gateway holds (None: nothing readable, as
    files written before routes were recorded)."""
    try:
        applied = json.loads(applied_path.read_text())
        routes = tuple(TrafficRoute.model_validate(r) for r in applied["routes"])
        decided = datetime.fromisoformat(applied["as_of"])
        upstreams = applied.get("upstreams")
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return routes, decided, dict(upstreams) if isinstance(upstreams, dict) else None


def _keeps(held: Held, routes: Sequence[TrafficRoute], as_of: datetime | None) -> bool:
    """A repair keeps the routes the gateway holds: they are the same, or decided later
    than ``as_of``."""
    return list(held[0]) == list(routes) or as_of is None or held[1] >= as_of


async def observe(
    driver: RuntimeDriver,
    runtime: Runtime,
    model: str,
    routes: Sequence[TrafficRoute],
    since: datetime,
    until: datetime,
) -> TrafficObservation:
    """What the gateway saw for ``routes`` of ``model`` in ``[since, until]``.

    Answering routes' stats come from the access log (live requests only); the shadow's
    from the mirror log (mirrored requests); with a shadow, both versions' captured
    answers to the same requests are compared.
    """
    config = gateway_settings(runtime)
    check_name(model, "model name")
    for item in routes:
        check_deployment_id(item.deployment_id)
    gateway = gateway_for(driver.settings, runtime)
    pending = until.timestamp() + LOG_FLUSH_SECONDS + 0.2 - time.time()
    if pending > 0:  # entries of the window's last second may still sit in nginx's log buffer
        await asyncio.sleep(min(pending, LOG_FLUSH_SECONDS + 0.2))
    live = parse_log(gateway.log_lines(f"{model}.access.log"), since, until)
    stats: list[RouteStats] = [route_stats(r, live) for r in routes if not r.shadow]
    comparison: ShadowComparison | None = None
    shadow = next((r for r in routes if r.shadow), None)
    answering = [r for r in routes if not r.shadow and r.weight > 0]
    if shadow is not None:
        mirrored = parse_log(gateway.log_lines(f"{model}.mirror.log"), since, until)
        stats.append(route_stats(shadow, mirrored))
        if answering:
            primary = max(answering, key=lambda r: r.weight)
            ids = {str(e.get("id")) for e in live if e.get("route") == primary.deployment_id}
            start = since.timestamp() - 1.0  # answers are recorded a moment before the log line
            primary_answers = await read_captures(driver, runtime, primary.deployment_id, since=start)
            shadow_answers = await read_captures(driver, runtime, shadow.deployment_id, since=start)
            comparison = compare(
                primary_id=primary.deployment_id,
                shadow_id=shadow.deployment_id,
                primary={k: v for k, v in primary_answers.items() if k in ids},
                shadow=shadow_answers,
                shadow_errors=sum(1 for e in mirrored if int(e.get("status", 0)) >= 500),
            )
    return TrafficObservation(
        endpoint=config.endpoint(model), since=since, until=until, routes=tuple(stats), shadow=comparison
    )


async def read_captures(
    driver: RuntimeDriver, runtime: Runtime, deployment_id: str, *, since: float
) -> dict[str, Any]:
    """Request id -> answer the deployment's server recorded (see :mod:`mlc.serving.capture`)."""
    if runtime.kind is RuntimeKind.LOCAL:
        from activities.runtimes.local import TMP_DIR

        folder = driver.workdir(runtime, deployment_id) / TMP_DIR
        lines: list[str] = []
        for path in (folder / f"{CAPTURE_FILE}.1", folder / CAPTURE_FILE):
            # the model's user owns the file: read it only if it is a plain file, bounded
            text = isolation.read_tail(path, limit=2 * CAPTURE_MAX_BYTES)
            lines.extend(text.splitlines() if text else ())
        return read_answers(lines, since=since)
    from activities.runtimes.docker import running_online
    from activities.runtimes.docker_engine import connect

    async with connect(runtime, f"read the answers recorded by {deployment_id}") as client:
        found = await asyncio.to_thread(running_online, client, runtime, deployment_id)
        if not found:
            return {}
        command = ["sh", "-c", f"cat /tmp/{CAPTURE_FILE}.1 /tmp/{CAPTURE_FILE} 2>/dev/null; true"]
        _, output = await asyncio.to_thread(found[0].exec_run, command, stderr=False)
    return read_answers(bytes(output).splitlines(), since=since)


async def remove(settings: Settings, runtime: Runtime) -> None:
    """Stop the runtime's gateway (process or container); its files stay for inspection."""
    if runtime.gateway is not None:
        await gateway_for(settings, runtime).stop()
