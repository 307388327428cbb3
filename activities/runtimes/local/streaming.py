"""Streaming deployments on a local runtime: each consumer a child process.

See :mod:`activities.runtimes.streams` for what every kind shares. Local consumers run with
an allow-listed environment (plus the runtime's SASL password,
which they need), and when the worker is root as the deployment's own unprivileged user in
its folder (see :mod:`mlc.isolation`). They talk to the broker, so they keep the host's
network; model code must not, so they import none: each batch goes to the deployment's
own model server (``server.sock`` in its folder), which runs in a network namespace of its
own like every local server (see :class:`mlc.streaming.consumer.RemoteModel`). It is
started before the consumers, recorded as ``scorer`` and started again by a redeploy that
finds it dead (consumers retry their batch meanwhile; nothing is dead-lettered for it).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from activities.runtimes.base import (
    Heartbeat,
    OnlineDeployRequest,
    StreamingDeployRequest,
    StreamingDeployResult,
)
from activities.runtimes.local import servers
from activities.runtimes.local.layout import SERVER_LOG, SERVER_SOCKET
from activities.runtimes.local.packages import LocalPackages
from activities.runtimes.streams import (
    QUICK_STOP_SECONDS,
    READY_TIMEOUT_SECONDS,
    STOP_TIMEOUT_SECONDS,
    Stop,
    endpoint_of,
    kafka_of,
    prepare_topics,
    result_details,
    stop_in_turn,
    stream_config,
)
from mlc import isolation, processes
from mlc.errors import DeploymentFailedError
from mlc.isolation import ModelUser
from mlc.streaming.consumer import READY_LINE, STREAM_CONFIG_ENV
from mlc.streaming.settings import StreamConfig

STATE_FILE = "streaming.json"
CONSUMER_MARKER = "mlc.streaming"
"""In every consumer's command line: a recorded pid is ours only while it still says so."""
LOG_TAIL_LINES = 20
SCORE_SOCKET = "server.sock"
"""The deployment's model server's socket, relative to the consumers' working folder (its
folder): a relative name fits a socket address however long ``MLC_HOME`` is."""


CONSUMERS = processes.Children(CONSUMER_MARKER)
"""Consumers this process started."""


async def deploy_local(
    driver: LocalPackages, request: StreamingDeployRequest, heartbeat: Heartbeat
) -> StreamingDeployResult:
    """Start (or keep) the deployment's consumer processes and wait until each is ready.

    Raises:
        DeploymentFailedError: no kafka settings, the broker refused, or a consumer exited
            or stayed silent at start (with its log's last lines).
        RuntimeUnavailableError: the broker cannot be reached.
    """

    kafka = kafka_of(request.runtime)
    config = stream_config(request)
    workdir = driver.workdir(request.runtime, request.deployment_id)
    heartbeat(f"preparing topics on {kafka.bootstrap_servers}")
    await prepare_topics(kafka, config, dict(os.environ))
    wanted = {"sha256": request.snapshot.sha256, "config": config.model_dump(mode="json")}
    state = _read_state(workdir)
    recorded: list[int] = list(state.get("pids", [])) if state else []
    if state is not None and all(state.get(k) == v for k, v in wanted.items()):
        # Same snapshot and configuration: keep live consumers, restart dead ones.
        await stop_in_turn([_stopper(pid) for pid in recorded[kafka.instances :]], config, leaving=True)
        kept = recorded[: kafka.instances]
        pids: list[int | None] = [p if _alive(p) else None for p in kept]
        pids += [None] * (kafka.instances - len(kept))
    else:
        if state is not None:
            previous = StreamConfig.model_validate(state["config"])
            await stop_in_turn([_stopper(pid) for pid in recorded], previous)
        pids = [None] * kafka.instances
    # A fresh start (no consumer kept) also ends whatever else the deployment's user runs.
    fresh = all(p is None for p in pids)
    # The consumers talk to the broker: they keep the host's network and run no model code;
    # the model's server scores for them, off the network.
    user, package = await asyncio.to_thread(
        driver.prepare, request.runtime, request.snapshot, workdir, fresh=fresh, own_network=False
    )
    scorer = state.get("scorer") if state is not None and not fresh else None
    if not isinstance(scorer, int) or not servers.alive(scorer):
        scorer = await start_scorer(driver, request, workdir, package, user, heartbeat)
    env = servers.child_env(request.snapshot, workdir)
    env[STREAM_CONFIG_ENV] = config.model_dump_json()
    if kafka.sasl_password_env and kafka.sasl_password_env in os.environ:
        env[kafka.sasl_password_env] = os.environ[kafka.sasl_password_env]
    started: dict[int, int] = {}
    for index, pid in enumerate(pids):
        if pid is None:
            log_path = workdir / f"consumer-{index}.log"
            pids[index], started[index] = servers.spawn(
                CONSUMERS,
                [
                    sys.executable,
                    "-s",
                    "-P",
                    "-m",
                    "mlc.streaming",
                    "consume",
                    "--package",
                    str(package),
                    "--score-socket",
                    SCORE_SOCKET,
                ],  # fmt: skip
                log=log_path,
                user=user,
                die_with_parent=driver.settings.servers_die_with_worker,
                cwd=workdir,
                env=env,
            )
    live = [p for p in pids if p is not None]
    _write_state(workdir, {**wanted, "pids": live, "scorer": scorer, "started_at": time.time()})
    for index, offset in started.items():
        await _wait_ready(request, workdir, index, live[index], offset, heartbeat)
    return StreamingDeployResult(
        endpoint=endpoint_of(config),
        details=result_details(
            config, pids=live, logs=[str(workdir / f"consumer-{i}.log") for i in range(len(live))]
        ),
    )


async def stop_local(workdir: Path) -> None:
    """Stop the deployment's consumers cleanly (TERM: finish, commit, leave; KILL after a grace period)."""

    state = _read_state(workdir)
    if state is not None:
        config = StreamConfig.model_validate(state["config"])
        await stop_in_turn([_stopper(pid) for pid in state.get("pids", [])], config)
        if isinstance(state.get("scorer"), int):
            await servers.stop(int(state["scorer"]))
        (workdir / STATE_FILE).unlink(missing_ok=True)


async def stop_consumers(workdir: Path) -> None:
    """Stop the deployment's live consumers all at once, keeping the record, for ``mlc dev``
    stopping (the next deploy starts them again): TERM lets each commit its batch, within
    ``QUICK_STOP_SECONDS`` (the stack's own broker may be gone already; what is not
    committed is delivered again)."""
    await asyncio.gather(*(_stop(pid, timeout=QUICK_STOP_SECONDS) for pid in local_consumer_pids(workdir)))


def _stopper(pid: int) -> Stop:
    async def stop() -> None:
        await _stop(pid)

    return stop


def local_consumer_pids(workdir: Path) -> list[int]:
    """The live consumer processes recorded for a deployment (tests kill them)."""
    state = _read_state(workdir)
    return [pid for pid in (state or {}).get("pids", []) if _alive(pid)]


async def _wait_ready(
    request: StreamingDeployRequest, workdir: Path, index: int, pid: int, offset: int, heartbeat: Heartbeat
) -> None:
    log_path = workdir / f"consumer-{index}.log"
    what = (
        f"streaming consumer {index} of {request.snapshot.ref} (deployment {request.deployment_id}, "
        f"runtime {request.runtime.name})"
    )
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while True:
        if READY_LINE in (isolation.read_tail(log_path, offset=offset) or ""):
            return
        if not _alive(pid):
            returncode = CONSUMERS.returncode(pid)
            code = "" if returncode is None else f" with code {returncode}"
            raise DeploymentFailedError(
                f"{what} exited during start{code}; last lines of {log_path}:\n{_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            await _stop(pid)
            raise DeploymentFailedError(
                f"{what} was not ready within {READY_TIMEOUT_SECONDS:.0f} s and was stopped; "
                f"last lines of {log_path}:\n{_tail(log_path)}"
            )
        heartbeat(f"waiting for {what}")
        await asyncio.sleep(0.1)


def _read_state(workdir: Path) -> dict[str, Any] | None:
    """The runtime's record of the consumers, if this process's user wrote it (the model's
    user owns the folder, see :mod:`mlc.isolation`)."""
    text = isolation.read_own_file(workdir / STATE_FILE)
    try:
        state = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return None
    return dict(state) if isinstance(state, dict) and "config" in state else None


def _write_state(workdir: Path, state: dict[str, Any]) -> None:
    isolation.write_file(workdir / STATE_FILE, json.dumps(state))


def _alive(pid: int) -> bool:
    """True when ``pid`` is a live streaming consumer (reaping it first if it is our exited child)."""
    return CONSUMERS.alive(pid)


async def _stop(pid: int, *, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    await CONSUMERS.stop(pid, timeout=timeout)


def _tail(path: Path) -> str:
    text = isolation.read_tail(path)
    if text is None:
        return "(no log written)"
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])


async def start_scorer(
    driver: LocalPackages,
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
    user = None if user is None else servers.networked(request.runtime, user)
    argv = ["serve", "--package", str(package), "--uds", str(workdir / SERVER_SOCKET)]
    env = servers.child_env(request.snapshot, workdir)
    pid = servers.start_process(
        driver.settings, argv, cwd=workdir, env=env, log=workdir / SERVER_LOG, user=user
    )
    state = {"pid": pid, "socket": str(workdir / SERVER_SOCKET)}
    online = OnlineDeployRequest(
        deployment_id=request.deployment_id,
        snapshot=request.snapshot,
        runtime=request.runtime,
        stage=request.stage,
    )
    await servers.wait_healthy(online, state, workdir, heartbeat)
    return pid
