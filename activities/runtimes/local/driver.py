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
(forked from the forkserver), is started again on its socket when found dead, keeps
serving when a deployment leaves it (the model is unloaded and, since its code ran in the
host's process, every other process of the host's user is killed: whatever it left
running ends; threads it started in the host run until the host's next restart), and
stops when its last deployment is removed. A model the host refuses (409: requirements it does not meet)
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
import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

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
    StreamingDeployRequest,
    StreamingDeployResult,
    UndeployRequest,
    ask_health,
)
from activities.runtimes.gateway.routing import GatewayRouted
from activities.runtimes.local import streaming
from activities.runtimes.local.batch import input_for, run_job, write_test_dataset
from activities.runtimes.local.gateway import LocalGateway
from activities.runtimes.local.hosting import LocalHosting
from activities.runtimes.local.layout import (
    BATCH_LOG,
    HOST_DIR,
    HOST_LOG,
    SERVER_LOG,
    SERVER_SOCKET,
    STATE_FILE,
    TMP_DIR,
    endpoint_of,
    read_state,
    tail,
)
from activities.runtimes.local.servers import (
    alive,
    child_env,
    exit_code,
    forget_network,
    start_process,
    stop,
    wait_healthy,
)
from activities.runtimes.streams import drop_test_topics
from mlc import endpoints, isolation
from mlc.domain import Runtime
from mlc.errors import DeploymentFailedError, NotFoundError
from mlc.isolation import ModelUser
from mlc.serving.capture import CAPTURE_FILE, CAPTURE_MAX_BYTES, read_answers


class LocalDriver(LocalHosting, GatewayRouted):
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
            if state.get("sha256") == request.snapshot.sha256 and alive(int(state["pid"])):
                try:
                    if state.get("host"):
                        hosted = await self._wait_hosted(request, state, workdir, heartbeat)
                        if hosted is not None:
                            return hosted
                    else:
                        return await wait_healthy(request, state, workdir, heartbeat)
                except DeploymentFailedError:
                    pass  # it died or hung since it was recorded (and is stopped now): replace it
            shares = request.runtime.shares_hosts(request.stage)
            if state.get("host") and not shares:
                await self._leave_host(request.runtime, workdir, fresh=True)
            elif state.get("host") and state.get("sha256") != request.snapshot.sha256:
                await self._leave_host(request.runtime, workdir, fresh=False)  # the old code's processes end
            elif not state.get("host"):
                await stop(int(state["pid"]))
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
        return await wait_healthy(request, state, workdir, heartbeat)

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
                await stop(int(state["pid"]))
        return await self._deploy(request, workdir, heartbeat)

    async def probe(self, request: ProbeRequest) -> ProbeResult:
        """The recorded server's process is alive and ``/health`` answers 200 (three tries);
        for a hosted deployment, the host's process and ``/models/<id>/health``."""
        workdir = self.workdir(request.runtime, request.deployment_id)
        state = self._state(request.runtime, workdir)
        if state is None:
            return ProbeResult(healthy=False, detail=f"no model server is recorded in {workdir}")
        pid, endpoint = int(state["pid"]), endpoint_of(state)
        log = self._host_dir(request.runtime) / HOST_LOG if state.get("host") else workdir / SERVER_LOG
        what = "the shared model host" if state.get("host") else "the model server"
        answer = await ask_health(endpoint) if alive(pid) else "no answer"
        if answer is None:
            return ProbeResult(healthy=True, endpoint=endpoint)
        running = alive(pid)  # again: it may have been dying while we asked
        detail = (
            f"{what} (pid {pid}) runs but {endpoint}/health gave {answer}"
            if running
            else f"{what} (pid {pid}) is not running{exit_code(pid)}"
        )
        return ProbeResult(healthy=False, detail=detail, log_tail=tail(log), endpoint=endpoint)

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
        pid = start_process(self.settings, argv, cwd=workdir, env=env, log=workdir / SERVER_LOG, user=user)
        state = {
            "pid": pid,
            "socket": str(sock),
            "sha256": request.snapshot.sha256,
            "model": str(request.snapshot.ref),
            "started_at": time.time(),
        }
        isolation.write_file(workdir / STATE_FILE, json.dumps(state))
        return state

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
                input_path = await asyncio.to_thread(input_for, Path(request.input_path), workdir, user)
            else:
                input_path = workdir / "input.jsonl"
                await asyncio.to_thread(write_test_dataset, package, input_path)
            log_path = workdir / BATCH_LOG
            summary = await run_job(
                request, package, input_path, output_path, log_path, user, heartbeat, home=self.settings.home
            )
        finally:
            # Nothing the job started outlives it, so nothing swaps its output once checked.
            await asyncio.to_thread(isolation.kill_user, user)
            await asyncio.to_thread(forget_network, request.runtime, user)
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
        if state is None or not alive(int(state["pid"])):
            raise NotFoundError(
                f"deployment {deployment_id} has no live model server on runtime {runtime.name}"
            )
        self.socket_user(runtime, workdir, state)
        return endpoint_of(state)

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
        """Start (or keep) the deployment's consumer processes (see
        :mod:`activities.runtimes.local.streaming`)."""
        return await streaming.deploy_local(self, request, heartbeat)

    async def undeploy(self, request: UndeployRequest) -> None:
        """Stop the deployment's server or consumers (TERM, then KILL) and remove its folder."""
        workdir = self.workdir(request.runtime, request.deployment_id)
        state = read_state(workdir)
        if state is not None and not state.get("host"):
            await stop(int(state["pid"]))
        await streaming.stop_local(workdir)
        await drop_test_topics(request.runtime, request.deployment_id)
        await self._leave_host(request.runtime, workdir, fresh=True)

    async def stop_servers(self, runtime: Runtime) -> list[str]:
        """Stop every model server of ``runtime`` and whatever its model users still run
        (daemons their code started, streaming consumers), keeping folders and records;
        return the deployment ids. For ``mlc dev`` stopping (and starting, after a stack
        that was killed): the inventory keeps saying what should serve, and the runtime's
        reconciler brings it back when the stack starts again."""
        root = self.settings.runtime_dir / runtime.name
        stopped = []
        for path in sorted(root.glob(f"*/{STATE_FILE}")) if root.is_dir() else []:
            state = self._state(runtime, path.parent)
            if state is not None and (state.get("host") or alive(int(state["pid"]))):
                await stop(int(state["pid"]))  # a hosted one: its host (once)
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

    def gateway(self, runtime: Runtime) -> LocalGateway:
        """The runtime's gateway, as this kind runs it."""
        return LocalGateway(self.settings, runtime)

    async def read_captures(self, runtime: Runtime, deployment_id: str, *, since: float) -> dict[str, Any]:
        """The answers the deployment's server recorded in its folder's ``tmp/``."""
        folder = self.workdir(runtime, deployment_id) / TMP_DIR
        lines: list[str] = []
        for path in (folder / f"{CAPTURE_FILE}.1", folder / CAPTURE_FILE):
            # the model's user owns the file: read it only if it is a plain file, bounded
            text = isolation.read_tail(path, limit=2 * CAPTURE_MAX_BYTES)
            lines.extend(text.splitlines() if text else ())
        return read_answers(lines, since=since)
