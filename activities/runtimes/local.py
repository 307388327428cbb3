"""The local runtime: model servers and batch jobs as processes on the worker's host.

Each deployment owns ``<runtime_dir>/<runtime>/<deployment id>/``: the unpacked package,
``server.log``, ``server.sock`` (the server's unix socket: local servers listen on no TCP
port, see :mod:`mlc.endpoints`) and ``deployment.json`` (pid and socket). That file is what makes deploys
idempotent across activity retries and worker restarts: a live, healthy server found
there is reused instead of started twice.

Online deployments of runtimes that share hosts (:meth:`mlc.domain.Runtime.shares_hosts`:
by default every stage but PROD) are served by one model-host process per runtime
(``python -m mlc.serving serve-many``, :mod:`mlc.serving.multi`), recorded in
``<runtime_dir>/<runtime>/.host/``: ``host.json`` (pid and socket), ``host.sock``, ``host.log``, and
``models/`` with a link ``<deployment id>`` to each hosted deployment's package and its
identity ``<deployment id>.json``. Such a deployment's endpoint is
``unix:<runtime_dir>/<runtime>/.host/host.sock/models/<deployment id>``; its folder keeps
``deployment.json`` (``"host": true``) and the package. The host starts on the first deploy
(forked from the forkserver), is started again on its socket when found dead, is restarted
without each deployment that leaves it (the model's code ran in its process: whatever
that left running ends with the host's user), and stops when its last deployment is
removed. A model the host refuses (409: requirements it does not meet)
gets a dedicated process instead. Models hosted together share one process and, when
the worker is root, one user (the host's): a crash or a hostile model reaches the other
models of the same host, which is why PROD keeps a process and a user per deployment.

Model code is untrusted, so its processes get an allow-listed environment (see
:func:`child_env`): nothing of the worker's database URL, Temporal settings or secrets.
When the worker is root they also run as the deployment's own unprivileged user, which
owns the deployment folder (0700) and can reach nothing else of ``MLC_HOME`` (see
:mod:`mlc.isolation`); the runtime then reads and writes in that folder only through
helpers that follow no link the model may have planted there. Servers, hosts and batch
jobs then also run in a network namespace of their own: nothing of the host's network
(Temporal, PostgreSQL, other models) is reachable from model code, and no port can be
squatted. Whatever talks to a server (gateway, stage tests, probes) first checks that its
socket belongs to the deployment's user (:meth:`LocalDriver.socket_user`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx

import mlc
from activities.runtimes.base import (
    BatchJobRequest,
    BatchJobResult,
    CleanupRequest,
    CleanupResult,
    Heartbeat,
    OnlineDeployRequest,
    OnlineDeployResult,
    ProbeRequest,
    ProbeResult,
    RuntimeDriver,
    StreamingDeployRequest,
    StreamingDeployResult,
    UndeployRequest,
    ask_health,
)
from mlc import endpoints, isolation, processes
from mlc.artifacts import ArtifactStore
from mlc.config import Settings
from mlc.domain import ModelNetwork, ModelSnapshot, Runtime
from mlc.errors import DeploymentFailedError, NotFoundError
from mlc.evaluation import test_dataset
from mlc.isolation import ModelUser
from mlc.manifest import load_manifest
from mlc.serving.app import SHA256_ENV, VERSION_ENV
from mlc.serving.capture import CAPTURE_FILE
from mlc.serving.forkserver import TITLE_ROOM, ForkClient
from mlc.serving.limits import LIMIT_ENVS
from mlc.serving.microbatch import BATCHING_ENVS
from mlc.serving.multi import MEMORY_BUDGET_ENV

HOST = "127.0.0.1"
HEALTH_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0
HEARTBEAT_INTERVAL_SECONDS = 1.0
LOG_TAIL_LINES = 20
OUTPUT_DRAIN_SECONDS = 5.0
"""After a batch job exits: how long its summary may take to arrive through a pipe that
something it left running (as the worker's own user) still holds open."""

SERVER_MARKER = "mlc.serving"
"""In every model server's command line: a recorded pid is ours only while it still says so."""
STATE_FILE = "deployment.json"
SERVER_LOG = "server.log"
BATCH_LOG = "batch.log"
BATCH_SUMMARY = "batch-summary.json"
"""A forked batch job's standard output (its summary line), in its deployment folder."""
PACKAGE_DIR = "package"
TMP_DIR = "tmp"
HOST_DIR = ".host"
LOCKS_DIR = "_locks"
"""``<runtime_dir>/_locks``: root's file locks (a runtime's shared host: one start or stop at a time)."""
STAGING_DIR = "_staging"
"""``<runtime_dir>/_staging``: root-only, where packages are unpacked before being renamed
into a deployment folder (no runtime can be named ``_staging``)."""
"""The runtime's shared model host, beside its deployment folders (not a deployment id)."""
HOST_STATE = "host.json"
HOST_SOCKET = "host.sock"
"""The shared host's unix socket, in its folder."""
SERVER_SOCKET = "server.sock"
"""A dedicated server's unix socket, in its deployment folder."""
HOST_LOG = "host.log"
MODELS_DIR = "models"

INHERITED_ENV = (
    "PATH", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH", MEMORY_BUDGET_ENV, *LIMIT_ENVS, *BATCHING_ENVS,
)  # fmt: skip
"""Worker variables a model process may see: locale, time zone, where programs and
libraries are, and the model server's own limits and batching. ``LC_*`` is passed as well."""

logger = logging.getLogger(__name__)

_children: dict[int, subprocess.Popen[bytes]] = {}
"""Servers this process started, kept so exits are reaped (no zombies look alive)."""

FORKSERVER_ENV = "MLC_LOCAL_FORKSERVER"
"""``0`` turns the forkserver off: every model server is then a fresh interpreter."""
_forkserver: tuple[subprocess.Popen[bytes], ForkClient] | None = None
_host_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)
"""Per event loop, one per runtime: deploys and undeploys that start or stop its host take turns."""


@contextlib.asynccontextmanager
async def _host_turn(settings: Settings, runtime: Runtime) -> AsyncIterator[None]:
    """Deploys and undeploys that start or stop the runtime's host take turns: in this
    process (an asyncio lock per event loop) and across workers on this host (a file lock
    of root's beside the runtimes' folders: not in the host's folder, which its models own)."""
    locks = _host_locks.setdefault(asyncio.get_running_loop(), {})
    async with locks.setdefault(runtime.name, asyncio.Lock()):
        async with processes.file_lock(settings.runtime_dir / LOCKS_DIR / f"{runtime.name}.host"):
            yield


def _fork_client() -> ForkClient | None:
    """This worker's forkserver when it is ready; the first call starts it in the background.

    Deploys before it is ready (about a second of imports) spawn as before, so nothing
    waits for it. It runs with the model processes' allow-listed environment, never the
    worker's: its memory is what every forked server starts from.
    """
    global _forkserver
    if os.environ.get(FORKSERVER_ENV, "1") == "0":
        return None
    if _forkserver is not None and _forkserver[0].poll() is None:
        return _forkserver[1] if _forkserver[1].ready() else None
    folder = Path(tempfile.mkdtemp(prefix="mlc-forkserver-"))
    env = {k: v for k, v in os.environ.items() if k in INHERITED_ENV or k.startswith("LC_")}
    with (folder / "forkserver.log").open("ab") as log:
        process = processes.spawn(
            [
                sys.executable,
                "-m",
                "mlc.serving",
                "forkserver",
                "--socket",
                str(folder / "socket"),
                "--title-room",
                "." * TITLE_ROOM,
            ],  # fmt: skip
            log=log,
            cwd=folder,
            env={**env, "HOME": str(folder)},
        )
    _forkserver = (process, ForkClient(folder / "socket"))
    return None


class LocalDriver(RuntimeDriver):
    """Runs ``python -m mlc.serving`` with this interpreter, serving on a unix socket."""

    async def deploy_online(self, request: OnlineDeployRequest, heartbeat: Heartbeat) -> OnlineDeployResult:
        """Reuse the deployment's live server, or unpack and start one (or join the runtime's
        shared host), then wait for health.

        Raises:
            DeploymentFailedError: the server exited or stayed unhealthy; carries its log tail.
        """
        workdir = self.workdir(request.runtime, request.deployment_id)
        state = self._state(request.runtime, workdir)
        if state is not None:
            if state.get("sha256") == request.snapshot.sha256 and _alive(int(state["pid"])):
                try:
                    if state.get("host"):
                        hosted = await self._wait_hosted(request, state, workdir, heartbeat)
                        if hosted is not None:
                            return hosted
                    else:
                        return await _wait_healthy(request, state, workdir, heartbeat)
                except DeploymentFailedError:
                    pass  # it died or hung since it was recorded (and is stopped now): replace it
            shares = request.runtime.shares_hosts(request.stage)
            if state.get("host") and not shares:
                await self._leave_host(request.runtime, workdir, fresh=True)
            elif state.get("host") and state.get("sha256") != request.snapshot.sha256:
                await self._leave_host(request.runtime, workdir, fresh=False)  # the old code's processes end
            elif not state.get("host"):
                await _stop(int(state["pid"]))
                if shares:  # into the host: its folder becomes the host user's
                    await asyncio.to_thread(self._forget_folder, request.runtime, workdir)
        return await self._deploy(request, workdir, heartbeat)

    async def _deploy(
        self, request: OnlineDeployRequest, workdir: Path, heartbeat: Heartbeat
    ) -> OnlineDeployResult:
        """Join the runtime's shared host when it shares them and the host takes the model,
        else start a dedicated server."""
        if request.runtime.shares_hosts(request.stage):
            hosted = await self._deploy_hosted(request, workdir, heartbeat)
            if hosted is not None:
                return hosted
            await self._leave_host(request.runtime, workdir, fresh=True)  # refused: its own process
        state = await self._launch(request, workdir)
        return await _wait_healthy(request, state, workdir, heartbeat)

    async def restart(self, request: OnlineDeployRequest, heartbeat: Heartbeat) -> OnlineDeployResult:
        """Stop what is left of the deployment's server and start it again, on the same
        socket in its folder, so the endpoint stays the same. A hosted deployment brings
        its host back when it is dead."""
        workdir = self.workdir(request.runtime, request.deployment_id)
        state = self._state(request.runtime, workdir)
        if state is not None:
            if state.get("host"):
                if request.runtime.shares_hosts(request.stage):
                    hosted = await self._deploy_hosted(request, workdir, heartbeat)
                    if hosted is not None:
                        return hosted
                await self._leave_host(request.runtime, workdir, fresh=True)
            else:
                await _stop(int(state["pid"]))
        return await self._deploy(request, workdir, heartbeat)

    async def probe(self, request: ProbeRequest) -> ProbeResult:
        """The recorded server's process is alive and ``/health`` answers 200 (three tries);
        for a hosted deployment, the host's process and ``/models/<id>/health``."""
        workdir = self.workdir(request.runtime, request.deployment_id)
        state = self._state(request.runtime, workdir)
        if state is None:
            return ProbeResult(healthy=False, detail=f"no model server is recorded in {workdir}")
        pid, endpoint = int(state["pid"]), _endpoint(state)
        log = self._host_dir(request.runtime) / HOST_LOG if state.get("host") else workdir / SERVER_LOG
        what = "the shared model host" if state.get("host") else "the model server"
        answer = await ask_health(endpoint) if _alive(pid) else "no answer"
        if answer is None:
            return ProbeResult(healthy=True, endpoint=endpoint)
        running = _alive(pid)  # again: it may have been dying while we asked
        detail = (
            f"{what} (pid {pid}) runs but {endpoint}/health gave {answer}"
            if running
            else f"{what} (pid {pid}) is not running{_exit_code(pid)}"
        )
        return ProbeResult(healthy=False, detail=detail, log_tail=_tail(log), endpoint=endpoint)

    # --- the runtime's shared model host ---------------------------------------------

    def _host_dir(self, runtime: Runtime) -> Path:
        return (self.settings.runtime_dir / runtime.name).resolve() / HOST_DIR

    def _state(self, runtime: Runtime, workdir: Path) -> dict[str, Any] | None:
        """The deployment's record; a hosted one with its host's current pid and address."""
        state = _read_state(workdir)
        if state is not None and state.get("host"):
            host = _read_state(self._host_dir(runtime), HOST_STATE)
            if host is not None:
                address: dict[str, Any] = {k: host[k] for k in ("port", "socket") if k in host}
                state = {k: v for k, v in state.items() if k not in ("port", "socket")}
                state = {**state, "pid": host["pid"], **address}
        return state

    async def _deploy_hosted(
        self, request: OnlineDeployRequest, workdir: Path, heartbeat: Heartbeat
    ) -> OnlineDeployResult | None:
        """Put the deployment into the runtime's host (starting it when needed) and wait
        until it answers; None when the host refuses the model (it needs its own process)."""
        runtime = request.runtime
        async with _host_turn(self.settings, runtime):
            user = await asyncio.to_thread(self._prepare_host, runtime)
            await asyncio.to_thread(self._prepare_hosted, request, workdir, user)
            host = await self._ensure_host(runtime, user, heartbeat)
        state = {
            "pid": host["pid"],
            "socket": host["socket"],
            "path": f"/{MODELS_DIR}/{request.deployment_id}",
            "host": True,
            "sha256": request.snapshot.sha256,
            "model": str(request.snapshot.ref),
            "started_at": time.time(),
        }
        isolation.write_file(workdir / STATE_FILE, json.dumps(state))
        return await self._wait_hosted(request, state, workdir, heartbeat)

    def _prepare_host(self, runtime: Runtime) -> ModelUser | None:
        """The host's folder (its user's, 0700) with ``tmp`` and ``models``; return its user.

        As root the host gets one user of its own, like a deployment, which owns every
        hosted deployment's folder; it reaches the runtime's folder (where they are)."""
        host_dir = self._host_dir(runtime)
        user = self.model_user(runtime, host_dir)
        if user is not None:
            self.settings.runtime_dir.mkdir(parents=True, exist_ok=True)
            isolation.lock_home(self.settings.home, self.settings.runtime_dir)
            python = (sys.prefix, sys.base_prefix, Path(sys.executable).resolve().parent)
            reach = tuple(str(p) for p in (*python, _project_root(), host_dir.parent))
            user = _networked(runtime, replace(user, reach=reach))
        isolation.prepare_folder(host_dir, user)
        isolation.private_folder(host_dir / TMP_DIR, user)
        isolation.private_folder(host_dir / MODELS_DIR, user)
        return user

    def _prepare_hosted(self, request: OnlineDeployRequest, workdir: Path, user: ModelUser | None) -> None:
        """The deployment's folder (the host user's), its package unpacked afresh when it is
        another snapshot, and its link and identity in the host's ``models``."""
        models = self._host_dir(request.runtime) / MODELS_DIR
        link = models / request.deployment_id
        isolation.clear_for_root(link)  # the host notices the model is gone
        isolation.prepare_folder(workdir, user)
        isolation.private_folder(workdir / TMP_DIR, user)
        package = self._unpack(request.snapshot, workdir)  # new files for another snapshot
        with contextlib.suppress(OSError):  # a new stamp: the host loads it afresh, keeping no old failure
            os.utime(package / "manifest.yaml", follow_symlinks=False)
        identity = {
            "version": str(request.snapshot.version),
            "sha256": request.snapshot.sha256,
            "capture": str(workdir / TMP_DIR / CAPTURE_FILE),  # where the gateway reads its answers
        }
        isolation.clear_for_root(models / f"{request.deployment_id}.json")
        isolation.write_file(models / f"{request.deployment_id}.json", json.dumps(identity), mode=0o644)
        os.symlink(package, link)

    async def _ensure_host(
        self, runtime: Runtime, user: ModelUser | None, heartbeat: Heartbeat
    ) -> dict[str, Any]:
        """The live host's record, after starting it (on its socket) if needed.

        Raises:
            DeploymentFailedError: it exited or did not answer ``/health``; carries its log tail.
        """
        host_dir = self._host_dir(runtime)
        state = _read_state(host_dir, HOST_STATE)
        if state is not None and _alive(int(state["pid"])):
            return state
        await asyncio.to_thread(isolation.kill_user, user)  # what a dead host's models left running
        sock = host_dir / HOST_SOCKET
        env = _host_env(host_dir)
        argv = ["serve-many", "--models-dir", str(host_dir / MODELS_DIR), "--uds", str(sock)]
        pid = self._start_process(argv, cwd=host_dir, env=env, log=host_dir / HOST_LOG, user=user)
        state = {"pid": pid, "socket": str(sock), "started_at": time.time()}
        isolation.write_file(host_dir / HOST_STATE, json.dumps(state))
        endpoint = _endpoint(state)
        deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
        while True:
            if not _alive(pid):
                log = host_dir / HOST_LOG
                raise DeploymentFailedError(
                    f"the shared model host of runtime {runtime.name} exited during start"
                    f"{_exit_code(pid)}; last lines of {log}:\n{_tail(log)}"
                )
            with contextlib.suppress(httpx.TransportError):
                if (await endpoints.get(endpoint, "/health", timeout=2.0)).status_code == 200:
                    return state
            if time.monotonic() > deadline:
                await _stop(pid)
                raise DeploymentFailedError(
                    f"the shared model host of runtime {runtime.name} did not answer {endpoint}/health "
                    f"within {HEALTH_TIMEOUT_SECONDS:.0f} s and was stopped; last lines of "
                    f"{host_dir / HOST_LOG}:\n{_tail(host_dir / HOST_LOG)}"
                )
            heartbeat(f"waiting for the shared model host at {endpoint}")
            await asyncio.sleep(0.02)

    async def _wait_hosted(
        self, request: OnlineDeployRequest, state: dict[str, Any], workdir: Path, heartbeat: Heartbeat
    ) -> OnlineDeployResult | None:
        """Poll the hosted model's ``/health`` (its first request loads it) until it answers
        200; None on 409 (the host does not meet its requirements).

        Raises:
            DeploymentFailedError: the model failed to load, or the host died or hung; the
                model is taken out of the host.
        """
        pid, endpoint = int(state["pid"]), _endpoint(state)
        log = self._host_dir(request.runtime) / HOST_LOG
        where = (
            f"model {request.snapshot.ref} (deployment {request.deployment_id}, runtime "
            f"{request.runtime.name}) in the runtime's shared model host (pid {pid})"
        )
        deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
        problem = None
        while problem is None:
            if not _alive(pid):
                problem = f"{where}: the host exited{_exit_code(pid)}"
            else:
                try:
                    response = await endpoints.get(endpoint, "/health", timeout=HEALTH_TIMEOUT_SECONDS)
                    if response.status_code == 200:
                        return OnlineDeployResult(
                            endpoint=endpoint, details={"pid": pid, "log": str(log), "host": True}
                        )
                    if response.status_code == 409:
                        return None
                    problem = (
                        f"{where} is not in the host any more"
                        if response.status_code == 404
                        else f"{where} could not be loaded: {_error_of(response)}"
                    )
                except httpx.TransportError:
                    pass
            if problem is not None and (moved := await self._restarted(request.runtime, workdir, pid)):
                pid, endpoint, problem = int(moved["pid"]), _endpoint(moved), None
                continue  # another model left the host, which was restarted: ask the new one
            if problem is None and time.monotonic() > deadline:
                problem = (
                    f"{where} did not become healthy at {endpoint} within {HEALTH_TIMEOUT_SECONDS:.0f} s"
                )
            heartbeat(f"waiting for {endpoint}/health")
            await asyncio.sleep(0.02)
        await self._leave_host(request.runtime, workdir, fresh=False)
        with contextlib.suppress(FileNotFoundError):
            (workdir / STATE_FILE).unlink()  # nothing to reuse: the next deploy puts it in again
        raise DeploymentFailedError(f"{problem}; last lines of {log}:\n{_tail(log)}")

    async def _restarted(self, runtime: Runtime, workdir: Path, pid: int) -> dict[str, Any] | None:
        """The deployment's record with its host's new pid when the host ``pid`` was
        restarted since (a model left it: its answers while stopping do not count), waiting
        for a restart under way; else None."""
        async with _host_turn(self.settings, runtime):
            moved = self._state(runtime, workdir)
        if moved is not None and int(moved["pid"]) != pid and _alive(int(moved["pid"])):
            return moved
        return None

    async def _leave_host(self, runtime: Runtime, workdir: Path, *, fresh: bool) -> None:
        """Take the deployment out of the runtime's host (its link and identity); with
        ``fresh`` also its folder, which belongs to the host's user. The model's code ran in
        the host's process, so whatever it left running is the host user's: the host ends
        with every process of its user and starts again without the model (see
        :meth:`_release_host`)."""
        models = self._host_dir(runtime) / MODELS_DIR
        for path in (models / workdir.name, models / f"{workdir.name}.json"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if fresh:
            await asyncio.to_thread(self._forget_folder, runtime, workdir)
        await self._release_host(runtime, restart=True)

    def _forget_folder(self, runtime: Runtime, workdir: Path) -> None:
        """Remove the deployment's folder, first killing what its user still runs unless
        that user is the host's (the host's restart ends those)."""
        user = isolation.user_of(workdir)
        if user is not None and user != isolation.user_of(self._host_dir(runtime)):
            isolation.kill_user(user)
            _forget_network(runtime, user)
        shutil.rmtree(workdir, True)

    async def _release_host(self, runtime: Runtime, *, restart: bool = False) -> None:
        """Stop the runtime's host with every process of its user (its cgroup, its uid) and
        remove its folder when no deployment is linked in it any more.

        With ``restart`` (a model just left it) and deployments still linked, the running
        host is stopped the same way and started again on its socket: one process and one
        user serve every hosted model, so a model leaving cannot be killed alone, and a
        restart is what ends whatever its code left behind (a ``setsid`` daemon). The models
        that stay load again on their next request. A dead host is only cleared of its
        user's leftovers: the reconciler brings it back.
        """
        host_dir = self._host_dir(runtime)
        async with _host_turn(self.settings, runtime):
            state = _read_state(host_dir, HOST_STATE)
            models = host_dir / MODELS_DIR
            hosting = models.is_dir() and any(p.is_symlink() for p in models.iterdir())
            if hosting and not restart:
                return
            running = state is not None and _alive(int(state["pid"]))
            if state is not None:
                await _stop(int(state["pid"]))
            user = isolation.user_of(host_dir)  # None once its folder is gone
            await asyncio.to_thread(isolation.kill_user, user)
            if not hosting:
                await asyncio.to_thread(_forget_network, runtime, user)
                await asyncio.to_thread(shutil.rmtree, host_dir, True)
            elif running:
                prepared = await asyncio.to_thread(self._prepare_host, runtime)
                try:
                    await self._ensure_host(runtime, prepared, lambda note: None)
                except DeploymentFailedError as exc:  # the model left; the others' probes will say
                    logger.warning("the shared host of runtime %s did not start again: %s", runtime.name, exc)

    def _start_process(
        self, argv: list[str], *, cwd: Path, env: dict[str, str], log: Path, user: ModelUser | None
    ) -> int:
        """Run ``python -m mlc.serving ARGV`` detached (as ``user``): forked from the warm
        forkserver when it is ready, else spawned. Returns its pid."""
        forks = _fork_client()
        pid = None
        if forks is not None:  # a warm fork: no interpreter start, server and libraries imported
            pid = forks.fork(
                argv,
                cwd=cwd,
                env=env,
                log=log,
                die_with_parent=self.settings.servers_die_with_worker,
                user=None if user is None else asdict(user),
            )
        if pid is None:
            with isolation.open_log(log, user) as handle:
                process = isolation.spawn(
                    [sys.executable, "-m", "mlc.serving", *argv],
                    log=handle,
                    user=user,
                    die_with_parent=self.settings.servers_die_with_worker,
                    cwd=cwd,
                    env=env,
                )
            _children[process.pid] = process
            pid = process.pid
        return pid

    async def _launch(self, request: OnlineDeployRequest, workdir: Path) -> dict[str, Any]:
        """Unpack (in a thread), then start the server from the event loop's thread: a
        parent-death signal is tied to the thread that forks (see :mod:`mlc.processes`)."""
        user, package = await asyncio.to_thread(self.prepare, request.runtime, request.snapshot, workdir)
        return self._start(request, workdir, package, user)

    def _start(
        self, request: OnlineDeployRequest, workdir: Path, package: Path, user: ModelUser | None
    ) -> dict[str, Any]:
        """Start a detached server on the socket in its folder, and record it."""
        sock = workdir / SERVER_SOCKET
        argv = ["serve", "--package", str(package), "--uds", str(sock)]
        env = child_env(request.snapshot, workdir)
        pid = self._start_process(argv, cwd=workdir, env=env, log=workdir / SERVER_LOG, user=user)
        state = {
            "pid": pid,
            "socket": str(sock),
            "sha256": request.snapshot.sha256,
            "model": str(request.snapshot.ref),
            "started_at": time.time(),
        }
        isolation.write_file(workdir / STATE_FILE, json.dumps(state))
        return state

    async def start_scorer(
        self,
        request: StreamingDeployRequest,
        workdir: Path,
        package: Path,
        user: ModelUser | None,
        heartbeat: Heartbeat,
    ) -> int:
        """Start the model server a streaming deployment's consumers score through (on the
        socket in its folder, kept off the network like any server), wait for its health;
        return its pid.

        Raises:
            DeploymentFailedError: it exited or stayed unhealthy; carries its log tail.
        """
        user = None if user is None else _networked(request.runtime, user)
        argv = ["serve", "--package", str(package), "--uds", str(workdir / SERVER_SOCKET)]
        env = child_env(request.snapshot, workdir)
        pid = self._start_process(argv, cwd=workdir, env=env, log=workdir / SERVER_LOG, user=user)
        state = {"pid": pid, "socket": str(workdir / SERVER_SOCKET)}
        online = OnlineDeployRequest(
            deployment_id=request.deployment_id,
            snapshot=request.snapshot,
            runtime=request.runtime,
            stage=request.stage,
        )
        await _wait_healthy(online, state, workdir, heartbeat)
        return pid

    def model_user(self, runtime: Runtime, workdir: Path) -> ModelUser | None:
        """The user the deployment's processes run as: its own when the worker is root
        (the owner of its folder, or a new one), else None (the worker's user)."""
        if not isolation.isolating():
            return None
        return isolation.user_for(workdir, taken=isolation.users_in(self.settings.runtime_dir))

    def prepare(
        self,
        runtime: Runtime,
        snapshot: ModelSnapshot,
        workdir: Path,
        *,
        fresh: bool = True,
        own_network: bool = True,
    ) -> tuple[ModelUser | None, Path]:
        """Make the deployment folder ready for model processes; return their user and the
        unpacked package.

        As root: nothing of the deployment's user still runs, ``MLC_HOME`` is locked
        (:func:`mlc.isolation.lock_home`), the user will reach the Python installation, the
        project and the folder (:func:`mlc.isolation.bind_unreachable`),
        the folder is the user's (0700) with a ``tmp`` of its own, and the package is
        unpacked by root into a folder the user cannot have redirected. ``fresh=False``
        (streaming consumers of the deployment keep running) kills nothing and unpacks
        nothing: the package is already there. ``own_network`` keeps the processes off the
        network as the runtime's ``model_network`` says (:func:`_networked`); without it
        they share the host's (streaming consumers).
        """
        user = self.model_user(runtime, workdir)
        if user is not None:
            if fresh:
                isolation.kill_user(user)
            self.settings.runtime_dir.mkdir(parents=True, exist_ok=True)
            isolation.lock_home(self.settings.home, self.settings.runtime_dir)
            python = (sys.prefix, sys.base_prefix, Path(sys.executable).resolve().parent)
            reach = tuple(str(p) for p in (*python, _project_root(), workdir))
            user = replace(user, reach=reach)
            user = _networked(runtime, user) if own_network else user
        isolation.prepare_folder(workdir, user)
        isolation.private_folder(workdir / TMP_DIR, user)
        if not fresh and (workdir / PACKAGE_DIR).is_dir():
            return user, workdir / PACKAGE_DIR
        return user, self._unpack(snapshot, workdir)

    def _unpack(self, snapshot: ModelSnapshot, workdir: Path) -> Path:
        """Extract the snapshot's archive into ``workdir/package`` (kept when it holds it).

        ``workdir`` may belong to the model's user, whose processes may be running (a
        shared host), so root never writes through a path there the model could swap for
        a link meanwhile: the archive is extracted into a root-only staging folder beside
        the runtimes' folders and renamed into place. rename(2) does not follow a link at
        its target, and fails on a folder planted there after the old package was removed.
        """
        package = workdir / PACKAGE_DIR
        if isolation.holds_package(package, snapshot.sha256):
            return package
        staging_root = self.settings.runtime_dir / STAGING_DIR
        staging_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=staging_root))
        try:
            ArtifactStore(self.settings.artifact_dir).unpack(snapshot.sha256, staging / PACKAGE_DIR)
            workdir.mkdir(parents=True, exist_ok=True)
            isolation.remove(package)
            try:
                os.rename(staging / PACKAGE_DIR, package)
            except OSError as exc:
                raise DeploymentFailedError(
                    f"could not put {snapshot.ref}'s package into {workdir}: something else "
                    f"appeared at {package} while it was unpacked ({exc.strerror})"
                ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return package

    async def run_batch(self, request: BatchJobRequest, heartbeat: Heartbeat) -> BatchJobResult:
        """Score the input (or the package's test dataset) with a child process, then clear up.

        Raises:
            DeploymentFailedError: the job exited non-zero; carries its log tail.
        """
        workdir = self.workdir(request.runtime, request.deployment_id)
        user, package = await asyncio.to_thread(self.prepare, request.runtime, request.snapshot, workdir)
        output_path = workdir / "output.jsonl"
        try:
            if request.input_path is not None:
                input_path = await asyncio.to_thread(_input_for, Path(request.input_path), workdir, user)
            else:
                input_path = workdir / "input.jsonl"
                await asyncio.to_thread(_write_test_dataset, package, input_path)
            log_path = workdir / BATCH_LOG
            summary = await _run_job(request, package, input_path, output_path, log_path, user, heartbeat)
        finally:
            # Nothing the job started outlives it, so nothing swaps its output once checked.
            await asyncio.to_thread(isolation.kill_user, user)
            await asyncio.to_thread(_forget_network, request.runtime, user)
            await asyncio.to_thread(shutil.rmtree, package, True)
        isolation.check_output(output_path)
        return BatchJobResult(
            output_path=str(output_path),
            records=int(summary["records"]),
            seconds=float(summary["seconds"]),
            details={"input": str(input_path), "log": str(log_path)},
        )

    async def locate(self, runtime: Runtime, deployment_id: str) -> str:
        """The endpoint of the deployment's live server, from its ``deployment.json``
        (``unix:.../.host/host.sock/models/<id>`` for a deployment in the shared host),
        once its socket is found to be the deployment's user's (:meth:`socket_user`).

        Raises:
            NotFoundError: no live server is recorded.
            DeploymentFailedError: its socket belongs to someone else.
        """
        workdir = self.workdir(runtime, deployment_id)
        state = self._state(runtime, workdir)
        if state is None or not _alive(int(state["pid"])):
            raise NotFoundError(
                f"deployment {deployment_id} has no live model server on runtime {runtime.name}"
            )
        self.socket_user(runtime, workdir, state)
        return _endpoint(state)

    def socket_user(self, runtime: Runtime, workdir: Path, state: dict[str, Any]) -> int | None:
        """The uid owning the recorded server's socket, checked to be the deployment's user
        (its folder's owner, the host's for a hosted one; the worker's own when it is not
        root), in that folder, which nobody else may write; None for a server recorded
        with a TCP port (before sockets).

        Raises:
            DeploymentFailedError: the socket is not that user's.
        """
        if "socket" not in state:
            return None
        sock = Path(state["socket"])
        folder = self._host_dir(runtime) if state.get("host") else workdir
        owner = endpoints.socket_owner(sock)
        user = isolation.user_of(folder)
        expected = os.geteuid() if user is None else user.uid
        mode = os.lstat(folder).st_mode
        if owner != expected or sock.parent != folder or mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise DeploymentFailedError(
                f"the socket {sock} of deployment {workdir.name} on runtime {runtime.name} belongs to "
                f"uid {owner}, not to the deployment's user {expected}: refusing to send it traffic"
            )
        return owner

    async def deploy_streaming(
        self, request: StreamingDeployRequest, heartbeat: Heartbeat
    ) -> StreamingDeployResult:
        """Start (or keep) the deployment's consumer processes (see :mod:`activities.runtimes.streaming`)."""
        from activities.runtimes import streaming

        return await streaming.deploy_local(self, request, heartbeat)

    async def undeploy(self, request: UndeployRequest) -> None:
        """Stop the deployment's server or consumers (TERM, then KILL) and remove its folder."""
        from activities.runtimes import streaming

        workdir = self.workdir(request.runtime, request.deployment_id)
        state = _read_state(workdir)
        if state is not None and not state.get("host"):
            await _stop(int(state["pid"]))
        await streaming.stop_local(workdir)
        await streaming.drop_test_topics(request.runtime, request.deployment_id)
        await self._leave_host(request.runtime, workdir, fresh=True)

    async def stop_servers(self, runtime: Runtime) -> list[str]:
        """Stop every model server of ``runtime`` and whatever its model users still run
        (daemons their code started, streaming consumers), keeping folders and records;
        return the deployment ids. For ``mlc dev`` stopping (and starting, after a stack
        that was killed): the inventory keeps saying what should serve, and the runtime's
        reconciler brings it back when the stack starts again."""
        from activities.runtimes import streaming

        root = self.settings.runtime_dir / runtime.name
        stopped = []
        for path in sorted(root.glob(f"*/{STATE_FILE}")) if root.is_dir() else []:
            state = self._state(runtime, path.parent)
            if state is not None and (state.get("host") or _alive(int(state["pid"]))):
                await _stop(int(state["pid"]))  # a hosted one: its host (once)
                stopped.append(path.parent.name)
        for folder in sorted(root.iterdir()) if root.is_dir() else []:
            await streaming.stop_consumers(folder)  # cleanly first: each commits its batch
            await asyncio.to_thread(isolation.kill_user, isolation.user_of(folder))
        return stopped

    async def cleanup(self, request: CleanupRequest) -> CleanupResult:
        """Undeploy every deployment folder of the runtime that is not in ``keep``."""
        root = self.settings.runtime_dir / request.runtime.name
        keep = set(request.keep)
        orphans = (
            sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in keep and p.name != HOST_DIR)
            if root.is_dir()
            else []
        )
        for deployment_id in orphans:
            await self.undeploy(UndeployRequest(deployment_id=deployment_id, runtime=request.runtime))
        await self._release_host(request.runtime)  # a host left hosting nothing goes too
        return CleanupResult(removed=tuple(orphans))


def child_env(snapshot: ModelSnapshot, workdir: Path) -> dict[str, str]:
    """The whole environment of a model process: an allow-list, never the worker's own.

    The worker holds ``MLC_DATABASE_URL``, ``TEMPORAL_*`` and whatever secrets its host
    gives it; model code could read any of them from ``os.environ``. The process gets
    ``INHERITED_ENV`` and ``LC_*`` from the worker, ``HOME`` and ``TMPDIR`` inside its
    deployment folder (so caches and temp files are its own and go when it is removed),
    ``PYTHONPATH`` with only this ``mlc`` checkout (the server must import the same code
    as the worker), and the snapshot identity the server reports.
    """
    tmp = workdir / TMP_DIR
    tmp.mkdir(parents=True, exist_ok=True)
    env = {
        name: value for name, value in os.environ.items() if name in INHERITED_ENV or name.startswith("LC_")
    }
    env.setdefault("PATH", os.defpath)
    env.update(
        {
            "HOME": str(workdir),
            "TMPDIR": str(tmp),
            "PYTHONPATH": str(Path(mlc.__file__).resolve().parent.parent),
            VERSION_ENV: str(snapshot.version),
            SHA256_ENV: snapshot.sha256,
        }
    )
    return env


def _host_env(host_dir: Path) -> dict[str, str]:
    """The shared host's environment: :func:`child_env`'s allow-list with ``HOME`` and
    ``TMPDIR`` in the host's folder and no snapshot identity (each model has its own)."""
    tmp = host_dir / TMP_DIR
    env = {
        name: value for name, value in os.environ.items() if name in INHERITED_ENV or name.startswith("LC_")
    }
    env.setdefault("PATH", os.defpath)
    env.update({"HOME": str(host_dir), "TMPDIR": str(tmp), "PYTHONPATH": str(_project_root())})
    return env


def _endpoint(state: dict[str, Any]) -> str:
    """A recorded server's endpoint: its socket (or, recorded before sockets, its port) and
    the model's path in a shared host."""
    if "socket" in state:
        return endpoints.unix_endpoint(Path(state["socket"]), state.get("path", ""))
    return f"http://{HOST}:{int(state['port'])}{state.get('path', '')}"


def _networked(runtime: Runtime, user: ModelUser) -> ModelUser:
    """``user`` kept off the network as ``runtime.model_network`` says: a namespace of its
    own (``none``), or the host's network with the host itself refused (``outbound``)."""
    if runtime.model_network is ModelNetwork.OUTBOUND:
        isolation.keep_off_host(user)
        return user
    return replace(user, own_network=True)


def _forget_network(runtime: Runtime, user: ModelUser | None) -> None:
    """Remove what :func:`_networked` added to the host's firewall for ``user``."""
    if user is not None and runtime.model_network is ModelNetwork.OUTBOUND:
        isolation.drop_host_rules(user.uid)


def _error_of(response: httpx.Response) -> str:
    """The ``error`` of a model server's JSON answer, else its status and text."""
    with contextlib.suppress(ValueError, AttributeError):
        return str(response.json()["error"])
    return f"HTTP {response.status_code} {response.text[:500]}"


def _project_root() -> Path:
    """The folder holding this ``mlc`` checkout (the model process's ``PYTHONPATH``)."""
    return Path(mlc.__file__).resolve().parent.parent


def _write_test_dataset(package: Path, path: Path) -> None:
    records = test_dataset(load_manifest(package), package)
    isolation.write_file(path, "".join(json.dumps(r) + "\n" for r in records), mode=0o644)


def _input_for(path: Path, workdir: Path, user: ModelUser | None) -> Path:
    """``path``, or a copy in the deployment folder (``input/NAME``) when the deployment's
    user could not read it (a file only root may read, or under a folder others cannot
    traverse): the job reads what the runtime hands it, not whatever root can read."""
    if user is None or _readable_by_others(path):
        return path
    folder = workdir / "input"  # the file keeps its name: the job's errors name it
    isolation.clear_for_root(folder)
    folder.mkdir(mode=0o755, exist_ok=True)
    copy = folder / path.name
    tmp = folder / f".{path.name}.tmp"
    isolation.clear_for_root(tmp)
    with path.open("rb") as source:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
    tmp.replace(copy)
    return copy


def _readable_by_others(path: Path) -> bool:
    try:
        resolved = path.resolve(strict=True)
        if not resolved.stat().st_mode & 0o004:
            return False
        return all(p.stat().st_mode & 0o001 for p in resolved.parents)
    except OSError:
        return False


async def _run_job(
    request: BatchJobRequest,
    package: Path,
    input_path: Path,
    output_path: Path,
    log_path: Path,
    user: ModelUser | None,
    heartbeat: Heartbeat,
) -> dict[str, Any]:
    """Run ``python -m mlc.serving batch`` (as ``user``) to completion, heartbeating; return
    its summary. Forked from the warm forkserver when it is ready (no interpreter start, no
    import of the model's libraries: most of a short job's time), else spawned."""
    argv = ["batch", "--package", str(package), "--input", str(input_path), "--output", str(output_path)]
    forks = _fork_client()
    if forks is not None:
        summary_path = log_path.parent / BATCH_SUMMARY
        isolation.clear_for_root(summary_path)
        with isolation.open_log(log_path, user):
            pass  # the log exists and is the user's, as for a spawned job
        pid = forks.fork(
            argv,
            cwd=log_path.parent,
            env=child_env(request.snapshot, log_path.parent),
            log=log_path,
            die_with_parent=False,
            user=None if user is None else asdict(user),
            stdout=summary_path,
        )
        if pid is not None:
            code = await _wait_forked(pid, forks, request, heartbeat)
            return _summary(request, code, isolation.read_tail(summary_path) or "", log_path)
    with isolation.open_log(log_path, user) as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mlc.serving", "batch",
            "--package", str(package), "--input", str(input_path), "--output", str(output_path),
            cwd=log_path.parent,
            env=child_env(request.snapshot, log_path.parent),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            **isolation.popen_options(user),
        )  # fmt: skip
    chunks: list[bytes] = []

    async def drain() -> None:
        assert process.stdout is not None
        while chunk := await process.stdout.read(1 << 16):
            chunks.append(chunk)

    reading = asyncio.ensure_future(drain())
    try:
        # Not process.wait(): it also waits for the pipes, which a process the job left
        # running may hold open forever.
        started = noted = time.monotonic()
        heartbeat(f"batch job for {request.snapshot.ref} started")
        while process.returncode is None:
            if time.monotonic() - noted >= HEARTBEAT_INTERVAL_SECONDS:
                noted = time.monotonic()
                heartbeat(f"batch job for {request.snapshot.ref}: {noted - started:.0f} s")
            if reading.done():
                await asyncio.sleep(0.01)
            else:
                await asyncio.wait({reading}, timeout=0.05)
        # Whatever the job left running (holding its output pipe open) ends with it.
        await asyncio.to_thread(isolation.kill_user, user)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reading), timeout=OUTPUT_DRAIN_SECONDS)
    finally:
        reading.cancel()
        if process.returncode is None:
            process.kill()
            await process.wait()
    return _summary(request, process.returncode, b"".join(chunks).decode(errors="replace"), log_path)


async def _wait_forked(
    pid: int, forks: ForkClient, request: BatchJobRequest, heartbeat: Heartbeat
) -> int | None:
    """Wait for a forked batch job to exit, heartbeating; return its exit code. Cancelled,
    it kills the job's process group."""
    started = noted = time.monotonic()
    heartbeat(f"batch job for {request.snapshot.ref} started")
    try:
        while _alive(pid):
            if time.monotonic() - noted >= HEARTBEAT_INTERVAL_SECONDS:
                noted = time.monotonic()
                heartbeat(f"batch job for {request.snapshot.ref}: {noted - started:.0f} s")
            await asyncio.sleep(0.01)
    except BaseException:
        processes.signal_group(pid, signal.SIGKILL)
        raise
    deadline = time.monotonic() + 1.0  # the forkserver notes the code as it reaps the job
    while (code := forks.exit_code(pid)) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return code


def _summary(request: BatchJobRequest, code: int | None, stdout: str, log_path: Path) -> dict[str, Any]:
    """The job's summary (the last line it printed), or the error its exit code means."""
    if code != 0:
        raise DeploymentFailedError(
            f"batch job for {request.snapshot.ref} on runtime {request.runtime.name} "
            f"(deployment {request.deployment_id}) exited with code {code}; "
            f"last lines of {log_path}:\n{_tail(log_path)}"
        )
    lines = stdout.strip().splitlines()
    if not lines:
        raise DeploymentFailedError(
            f"batch job for {request.snapshot.ref} (deployment {request.deployment_id}) exited "
            f"without printing its summary; see {log_path}"
        )
    return dict(json.loads(lines[-1]))


async def _wait_healthy(
    request: OnlineDeployRequest, state: dict[str, Any], workdir: Path, heartbeat: Heartbeat
) -> OnlineDeployResult:
    """Poll ``/health`` of the recorded server until it answers 200; stop it and raise if not."""
    pid, endpoint = int(state["pid"]), _endpoint(state)
    where = (
        f"model server for {request.snapshot.ref} (deployment {request.deployment_id}, "
        f"runtime {request.runtime.name})"
    )
    deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
    while True:
        if not _alive(pid):
            message = (
                f"{where} exited during start{_exit_code(pid)}; "
                f"last lines of {workdir / SERVER_LOG}:\n{_tail(workdir / SERVER_LOG)}"
            )
            await _stop(pid)
            raise DeploymentFailedError(message)
        try:
            response = await endpoints.get(endpoint, "/health", timeout=2.0)
            if response.status_code == 200:
                return OnlineDeployResult(
                    endpoint=endpoint, details={"pid": pid, "log": str(workdir / SERVER_LOG)}
                )
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            await _stop(pid)
            raise DeploymentFailedError(
                f"{where} did not become healthy at {endpoint} within "
                f"{HEALTH_TIMEOUT_SECONDS:.0f} s and was stopped; last lines of "
                f"{workdir / SERVER_LOG}:\n{_tail(workdir / SERVER_LOG)}"
            )
        heartbeat(f"waiting for {endpoint}/health")
        await asyncio.sleep(0.05)


def _read_state(workdir: Path, name: str = STATE_FILE) -> dict[str, Any] | None:
    """The runtime's record of the deployment (or, with ``HOST_STATE``, of the host), if
    this process's user wrote it (the model's user owns the folder and could leave a record
    of its own there)."""
    text = isolation.read_own_file(workdir / name)
    try:
        state = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return None
    if not isinstance(state, dict) or "pid" not in state or not ("port" in state or "socket" in state):
        return None
    return dict(state)


def _alive(pid: int) -> bool:
    """True when ``pid`` runs a model server (reaping it first if it is our exited child)."""
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    return processes.alive(pid, marker=SERVER_MARKER)


def _exit_code(pid: int) -> str:
    child = _children.get(pid)
    if child is None and _forkserver is not None:  # a forked server: its forkserver notes the code
        deadline = time.monotonic() + 1.0  # as it reaps the zombie, a moment after the exit
        while (code := _forkserver[1].exit_code(pid)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return "" if code is None else f" with code {code}"
    return f" with code {child.returncode}" if child is not None and child.returncode is not None else ""


async def _stop(pid: int) -> None:
    """SIGTERM the server's process group, SIGKILL it if still there after a grace period."""
    if _alive(pid):
        await asyncio.to_thread(
            processes.stop, pid, timeout=STOP_TIMEOUT_SECONDS, child=_children.get(pid), marker=SERVER_MARKER
        )
    _children.pop(pid, None)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The log's last lines; never through a link or from anything but a plain file."""
    text = isolation.read_tail(path)
    if text is None:
        return "(no log written)" if not path.is_symlink() and not path.exists() else "(log not readable)"
    return "\n".join(deque(text.splitlines(), maxlen=lines)).rstrip()
