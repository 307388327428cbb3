"""Model server processes on a local runtime: the forkserver, starting, waiting, stopping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx

import mlc
from activities.runtimes.base import (
    Heartbeat,
    OnlineDeployRequest,
    OnlineDeployResult,
)
from activities.runtimes.local.layout import (
    HEALTH_TIMEOUT_SECONDS,
    SERVER_LOG,
    SERVER_MARKER,
    STOP_TIMEOUT_SECONDS,
    TMP_DIR,
    endpoint_of,
    tail,
)
from mlc import endpoints, isolation, processes
from mlc.config import Settings
from mlc.domain import ModelNetwork, ModelSnapshot, Runtime
from mlc.errors import DeploymentFailedError
from mlc.isolation import ModelUser
from mlc.serving.app import SHA256_ENV, VERSION_ENV
from mlc.serving.forkserver import TITLE_ROOM, ForkClient
from mlc.serving.limits import LIMIT_ENVS
from mlc.serving.microbatch import BATCHING_ENVS
from mlc.serving.multi import MEMORY_BUDGET_ENV

INHERITED_ENV = (
    "PATH", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH", MEMORY_BUDGET_ENV, *LIMIT_ENVS, *BATCHING_ENVS,
)  # fmt: skip
"""Worker variables a model process may see: locale, time zone, where programs and
libraries are, and the model server's own limits and batching. ``LC_*`` is passed as well."""

logger = logging.getLogger(__name__)

SERVERS = processes.Children(SERVER_MARKER)
"""Servers this process spawned (forked ones are the forkserver's children)."""

FORKSERVER_ENV = "MLC_LOCAL_FORKSERVER"
"""``0`` turns the forkserver off: every model server is then a fresh interpreter."""
_forkserver: tuple[subprocess.Popen[bytes], ForkClient] | None = None
FORKSERVER_RECORD = "forkserver-folder"
"""Under ``MLC_HOME``: the path of the forkserver's folder (see :func:`fork_client`)."""


def fork_client(home: Path) -> ForkClient | None:
    """This worker's forkserver when it is ready; the first call starts it in the background.

    Deploys before it is ready (about a second of imports) spawn as before, so nothing
    waits for it. It runs with the model processes' allow-listed environment, never the
    worker's: its memory is what every forked server starts from. Its socket's folder is
    ``home``'s private temp folder (recorded under ``home``: the next start of its stack
    reuses it, cleared, instead of leaving one more in the temp dir).
    """
    global _forkserver
    if os.environ.get(FORKSERVER_ENV, "1") == "0":
        return None
    if _forkserver is not None and _forkserver[0].poll() is None:
        return _forkserver[1] if _forkserver[1].ready() else None
    home.mkdir(parents=True, exist_ok=True)
    folder = isolation.private_temp_folder(home / FORKSERVER_RECORD, prefix="mlc-forkserver-")
    for leftover in folder.iterdir():  # a previous forkserver's socket and exit codes
        isolation.remove(leftover)
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


def host_env(host_dir: Path) -> dict[str, str]:
    """The shared host's environment: :func:`child_env`'s allow-list with ``HOME`` and
    ``TMPDIR`` in the host's folder and no snapshot identity (each model has its own)."""
    tmp = host_dir / TMP_DIR
    env = {
        name: value for name, value in os.environ.items() if name in INHERITED_ENV or name.startswith("LC_")
    }
    env.setdefault("PATH", os.defpath)
    env.update({"HOME": str(host_dir), "TMPDIR": str(tmp), "PYTHONPATH": str(project_root())})
    return env


def networked(runtime: Runtime, user: ModelUser) -> ModelUser:
    """``user`` kept off the network as ``runtime.model_network`` says: a namespace of its
    own (``none``), or the host's network with the host itself refused (``outbound``)."""
    if runtime.model_network is ModelNetwork.OUTBOUND:
        isolation.keep_off_host(user)
        return user
    return replace(user, own_network=True)


def forget_network(runtime: Runtime, user: ModelUser | None) -> None:
    """Remove what :func:`networked` added to the host's firewall for ``user``."""
    if user is not None and runtime.model_network is ModelNetwork.OUTBOUND:
        isolation.drop_host_rules(user.uid)


def error_of(response: httpx.Response) -> str:
    """The ``error`` of a model server's JSON answer, else its status and text."""
    with contextlib.suppress(ValueError, AttributeError):
        return str(response.json()["error"])
    return f"HTTP {response.status_code} {response.text[:500]}"


def project_root() -> Path:
    """The folder holding this ``mlc`` checkout (the model process's ``PYTHONPATH``)."""
    return Path(mlc.__file__).resolve().parent.parent


async def wait_healthy(
    request: OnlineDeployRequest, state: dict[str, Any], workdir: Path, heartbeat: Heartbeat
) -> OnlineDeployResult:
    """Poll ``/health`` of the recorded server until it answers 200; stop it and raise if not."""
    pid, endpoint = int(state["pid"]), endpoint_of(state)
    where = (
        f"model server for {request.snapshot.ref} (deployment {request.deployment_id}, "
        f"runtime {request.runtime.name})"
    )
    deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
    while True:
        if not alive(pid):
            message = (
                f"{where} exited during start{exit_code(pid)}; "
                f"last lines of {workdir / SERVER_LOG}:\n{tail(workdir / SERVER_LOG)}"
            )
            await stop(pid)
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
            await stop(pid)
            raise DeploymentFailedError(
                f"{where} did not become healthy at {endpoint} within "
                f"{HEALTH_TIMEOUT_SECONDS:.0f} s and was stopped; last lines of "
                f"{workdir / SERVER_LOG}:\n{tail(workdir / SERVER_LOG)}"
            )
        heartbeat(f"waiting for {endpoint}/health")
        await asyncio.sleep(0.05)


def alive(pid: int) -> bool:
    """True when ``pid`` runs a model server (reaping it first if it is our exited child)."""
    return SERVERS.alive(pid)


def exit_code(pid: int) -> str:
    """`` with code N`` when the server's exit code is known, else ""."""
    if not SERVERS.started(pid) and _forkserver is not None:  # a forked server: its forkserver notes the code
        deadline = time.monotonic() + 1.0  # as it reaps the zombie, a moment after the exit
        while (code := _forkserver[1].exit_code(pid)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return "" if code is None else f" with code {code}"
    code = SERVERS.returncode(pid)
    return "" if code is None else f" with code {code}"


async def stop(pid: int) -> None:
    """SIGTERM the server's process group, SIGKILL it if still there after a grace period."""
    await SERVERS.stop(pid, timeout=STOP_TIMEOUT_SECONDS)


def start_process(
    settings: Settings, argv: list[str], *, cwd: Path, env: dict[str, str], log: Path, user: ModelUser | None
) -> int:
    """Run ``python -m mlc.serving ARGV`` detached (as ``user``): forked from the warm
    forkserver when it is ready, else spawned. Returns its pid."""
    forks = fork_client(settings.home)
    pid = None
    if forks is not None:  # a warm fork: no interpreter start, server and libraries imported
        pid = forks.fork(
            argv,
            cwd=cwd,
            env=env,
            log=log,
            die_with_parent=settings.servers_die_with_worker,
            user=None if user is None else asdict(user),
        )
    if pid is None:
        pid, _ = spawn(
            SERVERS,
            [sys.executable, "-m", "mlc.serving", *argv],
            log=log,
            user=user,
            die_with_parent=settings.servers_die_with_worker,
            cwd=cwd,
            env=env,
        )
    return pid


def spawn(
    children: processes.Children,
    args: list[str],
    *,
    log: Path,
    user: ModelUser | None,
    die_with_parent: bool,
    cwd: Path,
    env: dict[str, str],
) -> tuple[int, int]:
    """Start ``args`` detached as ``user`` (its own session, output appended to ``log``),
    kept among ``children``; return its pid and the log's size before it started (where
    its own lines begin)."""
    with isolation.open_log(log, user) as handle:
        offset = os.fstat(handle.fileno()).st_size
        process = isolation.spawn(
            args, log=handle, user=user, die_with_parent=die_with_parent, cwd=cwd, env=env
        )
    return children.add(process), offset
