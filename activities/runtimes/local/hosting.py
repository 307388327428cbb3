"""A local runtime's shared model host: online deployments served by one process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from activities.runtimes.base import (
    Heartbeat,
    OnlineDeployRequest,
    OnlineDeployResult,
)
from activities.runtimes.local.layout import (
    HEALTH_TIMEOUT_SECONDS,
    HOST_DIR,
    HOST_LOG,
    HOST_SOCKET,
    HOST_STATE,
    LOCKS_DIR,
    MODELS_DIR,
    STATE_FILE,
    TMP_DIR,
    endpoint_of,
    read_state,
    tail,
)
from activities.runtimes.local.packages import LocalPackages
from activities.runtimes.local.servers import (
    alive,
    error_of,
    exit_code,
    forget_network,
    host_env,
    networked,
    project_root,
    start_process,
    stop,
)
from mlc import endpoints, isolation, processes
from mlc.config import Settings
from mlc.domain import Runtime
from mlc.errors import DeploymentFailedError
from mlc.isolation import ModelUser
from mlc.serving.capture import CAPTURE_FILE

SWEEP_TIMEOUT_SECONDS = 5.0
"""How long a running shared host may take to answer ``/health`` when a model leaves it
(any answer: it serves, 503 included) before it counts as wedged and is restarted."""

_host_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)
"""Per event loop, one per runtime: deploys and undeploys that start or stop its host take turns."""


@contextlib.asynccontextmanager
async def host_turn(settings: Settings, runtime: Runtime) -> AsyncIterator[None]:
    """Deploys and undeploys that start or stop the runtime's host take turns: in this
    process (an asyncio lock per event loop) and across workers on this host (a file lock
    of root's beside the runtimes' folders: not in the host's folder, which its models own)."""
    locks = _host_locks.setdefault(asyncio.get_running_loop(), {})
    async with locks.setdefault(runtime.name, asyncio.Lock()):
        async with processes.file_lock(settings.runtime_dir / LOCKS_DIR / f"{runtime.name}.host"):
            yield


logger = logging.getLogger(__name__)


def _host_failed(runtime: Runtime, problem: str) -> DeploymentFailedError:
    """The error of a shared host that did not start, logged as a warning too: every model
    it hosts is down until one does, and a restart's caller may not report it."""
    message = f"the shared model host of runtime {runtime.name} {problem}"
    logger.warning("%s", message)
    return DeploymentFailedError(message)


class LocalHosting(LocalPackages):
    """The local driver's shared model host: one ``serve-many`` process per runtime, in
    ``<runtime_dir>/<runtime>/.host/``, that online deployments join and leave (see
    :mod:`activities.runtimes.local.driver`)."""

    def _host_dir(self, runtime: Runtime) -> Path:
        return (self.settings.runtime_dir / runtime.name).resolve() / HOST_DIR

    def _state(self, runtime: Runtime, workdir: Path) -> dict[str, Any] | None:
        """The deployment's record; a hosted one with its host's current pid and address."""
        state = read_state(workdir)
        if state is not None and state.get("host"):
            host = read_state(self._host_dir(runtime), HOST_STATE)
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
        async with host_turn(self.settings, runtime):
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
            reach = tuple(str(p) for p in (*python, project_root(), host_dir.parent))
            user = networked(runtime, replace(user, reach=reach))
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
        state = read_state(host_dir, HOST_STATE)
        if state is not None and alive(int(state["pid"])):
            return state
        await asyncio.to_thread(isolation.kill_user, user)  # what a dead host's models left running
        sock = host_dir / HOST_SOCKET
        env = host_env(host_dir)
        argv = ["serve-many", "--models-dir", str(host_dir / MODELS_DIR), "--uds", str(sock)]
        pid = start_process(self.settings, argv, cwd=host_dir, env=env, log=host_dir / HOST_LOG, user=user)
        state = {"pid": pid, "socket": str(sock), "started_at": time.time()}
        isolation.write_file(host_dir / HOST_STATE, json.dumps(state))
        endpoint = endpoint_of(state)
        deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
        while True:
            if not alive(pid):
                log = host_dir / HOST_LOG
                problem = f"exited during start{exit_code(pid)}; last lines of {log}:\n{tail(log)}"
                raise _host_failed(runtime, problem)
            with contextlib.suppress(httpx.TransportError):
                if (await endpoints.get(endpoint, "/health", timeout=2.0)).status_code == 200:
                    return state
            if time.monotonic() > deadline:
                await stop(pid)
                raise _host_failed(
                    runtime,
                    f"did not answer {endpoint}/health within {HEALTH_TIMEOUT_SECONDS:.0f} s and was "
                    f"stopped; last lines of {host_dir / HOST_LOG}:\n{tail(host_dir / HOST_LOG)}",
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
        pid, endpoint = int(state["pid"]), endpoint_of(state)
        log = self._host_dir(request.runtime) / HOST_LOG
        where = (
            f"model {request.snapshot.ref} (deployment {request.deployment_id}, runtime "
            f"{request.runtime.name}) in the runtime's shared model host (pid {pid})"
        )
        deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
        problem = None
        while problem is None:
            if not alive(pid):
                problem = f"{where}: the host exited{exit_code(pid)}"
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
                        else f"{where} could not be loaded: {error_of(response)}"
                    )
                except httpx.TransportError:
                    pass
            if problem is not None and (moved := await self._restarted(request.runtime, workdir, pid)):
                pid, endpoint, problem = int(moved["pid"]), endpoint_of(moved), None
                continue  # the host was restarted meanwhile (see _release_host): ask the new one
            if problem is None and time.monotonic() > deadline:
                problem = (
                    f"{where} did not become healthy at {endpoint} within {HEALTH_TIMEOUT_SECONDS:.0f} s"
                )
            heartbeat(f"waiting for {endpoint}/health")
            await asyncio.sleep(0.02)
        await self._leave_host(request.runtime, workdir, fresh=False)
        with contextlib.suppress(FileNotFoundError):
            (workdir / STATE_FILE).unlink()  # nothing to reuse: the next deploy puts it in again
        raise DeploymentFailedError(f"{problem}; last lines of {log}:\n{tail(log)}")

    async def _restarted(self, runtime: Runtime, workdir: Path, pid: int) -> dict[str, Any] | None:
        """The deployment's record with its host's new pid when the host ``pid`` was
        restarted since (it did not answer when a model left it: its answers while stopping
        do not count), waiting for a restart under way; else None."""
        async with host_turn(self.settings, runtime):
            moved = self._state(runtime, workdir)
        if moved is not None and int(moved["pid"]) != pid and alive(int(moved["pid"])):
            return moved
        return None

    async def _leave_host(self, runtime: Runtime, workdir: Path, *, fresh: bool) -> None:
        """Take the deployment out of the runtime's host (its link and identity); with
        ``fresh`` also its folder, which belongs to the host's user. The model's code ran in
        the host's process, so whatever it left running is the host user's: every process
        of that user but the host's own ends, and the host serves on (see
        :meth:`_release_host`)."""
        models = self._host_dir(runtime) / MODELS_DIR
        for path in (models / workdir.name, models / f"{workdir.name}.json"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if fresh:
            await asyncio.to_thread(self._forget_folder, runtime, workdir)
        await self._release_host(runtime, left=True)

    def _forget_folder(self, runtime: Runtime, workdir: Path) -> None:
        """Remove the deployment's folder, first killing what its user still runs unless
        that user is the host's (:meth:`_release_host` ends those)."""
        user = isolation.user_of(workdir)
        if user is not None and user != isolation.user_of(self._host_dir(runtime)):
            isolation.kill_user(user)
            forget_network(runtime, user)
        shutil.rmtree(workdir, True)

    async def _release_host(self, runtime: Runtime, *, left: bool = False) -> None:
        """Stop the runtime's host with every process of its user (its cgroup, its uid) and
        remove its folder when no deployment is linked in it any more.

        With ``left`` (a model just left it) and deployments still linked, the model is
        unloaded (the host's ``/health`` sweeps out what is no longer linked) and every
        process of the host's user but the host's own is killed: a model's code runs in
        the host's process, so a ``setsid`` daemon it started is the host user's, and the
        host itself runs no process of its own (uvicorn in one process). The others keep
        answering. Threads the leaving model started inside the host's process run on until
        the host's next restart. A host that does not answer, or whose user's processes
        will not die (a thread forking on), is restarted on its socket instead (the models
        that stay load again on their next request). A dead host is only cleared of its
        user's leftovers: the reconciler brings it back.
        """
        host_dir = self._host_dir(runtime)
        async with host_turn(self.settings, runtime):
            state = read_state(host_dir, HOST_STATE)
            models = host_dir / MODELS_DIR
            hosting = models.is_dir() and any(p.is_symlink() for p in models.iterdir())
            if hosting and not left:
                return
            running = state is not None and alive(int(state["pid"]))
            user = isolation.user_of(host_dir)  # None once its folder is gone
            if hosting and running and state is not None and await self._sweep(runtime, state, user):
                return
            if state is not None:
                await stop(int(state["pid"]))
            await asyncio.to_thread(isolation.kill_user, user)
            if not hosting:
                await asyncio.to_thread(forget_network, runtime, user)
                await asyncio.to_thread(shutil.rmtree, host_dir, True)
            elif running:
                prepared = await asyncio.to_thread(self._prepare_host, runtime)
                # the model left; a host that does not start is logged by _host_failed, and
                # the others' probes will say
                with contextlib.suppress(DeploymentFailedError):
                    await self._ensure_host(runtime, prepared, lambda note: None)

    async def _sweep(self, runtime: Runtime, state: dict[str, Any], user: ModelUser | None) -> bool:
        """Have the running host unload what is no longer linked in it and kill every other
        process of its user; False when it does not answer ``/health`` within
        ``SWEEP_TIMEOUT_SECONDS`` or those processes do not die (it must be restarted)."""
        pid = int(state["pid"])
        try:
            await endpoints.get(endpoint_of(state), "/health", timeout=SWEEP_TIMEOUT_SECONDS)
        except httpx.TransportError:
            logger.warning(
                "the shared host of runtime %s (pid %d) does not answer: restarting it", runtime.name, pid
            )
            return False
        try:
            await asyncio.to_thread(isolation.kill_user, user, spare=pid)
        except DeploymentFailedError as exc:
            logger.warning("the shared host of runtime %s is restarted: %s", runtime.name, exc)
            return False
        return True
