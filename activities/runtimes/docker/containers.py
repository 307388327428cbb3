"""Naming, labelling, shaping and finding a docker runtime's containers and their sockets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import docker.errors
import httpx

from activities.runtimes.base import (
    Heartbeat,
    OnlineDeployRequest,
)
from activities.runtimes.docker.engine import HEARTBEAT_SECONDS, docker_settings
from mlc import endpoints
from mlc.config import Settings
from mlc.domain import DockerSettings, ModelNetwork, ModelSnapshot, Runtime
from mlc.errors import DeploymentFailedError
from mlc.serving.app import SHA256_ENV, VERSION_ENV

CONTAINER_PORT = 8080
"""Where servers of containers started before unix sockets listened (their endpoints are
still found from the published port until they are replaced)."""
SOCKETS_DIR = "_sockets"
"""Under ``runtime_dir``: one folder per runtime of its containers' socket folders (runtime
names cannot start with ``_``, so it names no runtime)."""
HOST_SOCKET_KEY = "_host"
"""The socket folder of the runtime's shared host container (no digest starts with ``_``)."""
CONTAINER_SOCKET_DIR = "/run/mlc"
"""Where a model container sees its socket folder."""
SOCKET_NAME = "model.sock"

LOG_TAIL_LINES = 40
"""Container log lines quoted in errors."""


HEALTH_POLL_SECONDS = 0.02
"""How often a starting container's ``/health`` is asked (was 0.25 s: 0.12 s lost per deploy on average)."""
STATE_POLL_SECONDS = 0.25
"""How often the engine is asked whether a starting container still runs."""
_TMPFS = {"/tmp": "rw,nosuid,nodev,size=64m"}
HOST_MODE = "host"
"""``mlc.mode`` of a runtime's shared model-host container."""
HOST_MODELS_DIR = "/models"
"""Where a host container's models are (a volume of its own)."""
SPARE_MODE = "spare"
"""``mlc.mode`` of a warm spare container (see :mod:`activities.runtimes.docker.spares`),
claimed or not."""
SPARE_PREFIX = "mlcspare-"
"""The name of an unclaimed spare starts so (no :func:`container_name` does)."""
_UNSAFE_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_.-]+")


def container_name(deployment_id: str, *, suffix: str = "") -> str:
    """``mlc-<deployment_id><suffix>``, made a valid docker name.

    When characters had to be replaced, a short hash of the original id keeps two ids that
    differ only in those characters from colliding.
    """
    safe = _UNSAFE_NAME_CHARS.sub("-", deployment_id).strip("-.") or "deployment"
    if safe != deployment_id:
        safe = f"{safe[:100]}-{hashlib.sha256(deployment_id.encode()).hexdigest()[:8]}"
    return f"mlc-{safe}{suffix}"


def claimant(name: str) -> str:
    """The deployment id a container named ``name`` was named for, when the name spells it
    whole (else the name: :func:`container_name` hashed what it replaced)."""
    candidate = name.removeprefix("mlc-")
    return candidate if container_name(candidate) == name else name


def model_labels(
    *, deployment_id: str, runtime: Runtime, snapshot: ModelSnapshot, stage: str, mode: str
) -> dict[str, str]:
    return {
        "mlc.deployment-id": deployment_id,
        "mlc.runtime": runtime.name,
        "mlc.model": snapshot.model,
        "mlc.version": str(snapshot.version),
        "mlc.sha256": snapshot.sha256,
        "mlc.stage": stage,
        "mlc.mode": mode,
    }


def restart_policy(value: str) -> dict[str, Any]:
    """docker-py's form of ``no``, ``always``, ``unless-stopped`` or ``on-failure[:N]``."""
    name, _, retries = value.partition(":")
    policy: dict[str, Any] = {"Name": "" if name == "no" else name}
    if retries:
        policy["MaximumRetryCount"] = int(retries)
    return policy


def container_options(settings: DockerSettings, snapshot: ModelSnapshot) -> dict[str, Any]:
    """Options shared by online and batch containers: identity, limits and hardening."""
    return {
        "environment": {VERSION_ENV: str(snapshot.version), SHA256_ENV: snapshot.sha256},
        "nano_cpus": int(settings.cpus * 1e9),
        "mem_limit": settings.memory,
        "user": settings.user,
        "read_only": True,
        "tmpfs": _TMPFS,
        "security_opt": ["no-new-privileges"],
        "cap_drop": ["ALL"],
    }


def model_network(runtime: Runtime) -> str:
    """The ``network_mode`` of the runtime's model containers: ``none`` unless its signed
    record allows ``outbound``, then ``docker.network_mode`` (never ``host``: such a runtime
    does not validate, see :class:`mlc.domain.Runtime`)."""
    if runtime.model_network is not ModelNetwork.OUTBOUND:
        return "none"
    return docker_settings(runtime).network_mode


def sockets_root(settings: Settings, runtime: Runtime) -> Path:
    """``<runtime_dir>/_sockets/<runtime>``: the runtime's socket folders (the gateway mounts it)."""
    return (settings.runtime_dir / SOCKETS_DIR / runtime.name).resolve()


def socket_key(deployment_id: str) -> str:
    """The name of a deployment's socket folder: short, whatever the id's length."""
    return hashlib.sha256(deployment_id.encode()).hexdigest()[:16]


_SOCKET_KEY = re.compile(r"_?[0-9a-f]{15,16}")
"""A deployment's key (:func:`socket_key`) or a spare's (``_`` and 15 hex digits)."""


def label_key(container: Any) -> str | None:
    """A container's ``mlc.socket-key`` label when it is a key this code makes, else None.

    Labels are inherited from the image, and an image's from its base: a base image
    labelled ``mlc.socket-key=../../..`` must not name a path the worker removes as root."""
    key = container.labels.get("mlc.socket-key", "")
    return key if _SOCKET_KEY.fullmatch(key) else None


def socket_folder(settings: Settings, runtime: Runtime, key: str) -> Path:
    """Create (or take back) the socket folder ``key`` of ``runtime``: owned by the
    containers' user, 0700; its parents root's, 0711 (traversable, not listable)."""
    root = sockets_root(settings, runtime)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root.parent, 0o711)
    os.chmod(root, 0o711)
    folder = root / key
    folder.mkdir(exist_ok=True)
    uid, _, gid = docker_settings(runtime).user.partition(":")
    if uid.isdigit() and (not gid or gid.isdigit()):
        os.chown(folder, int(uid), int(gid or uid), follow_symlinks=False)
        os.chmod(folder, 0o700)
    else:  # a user name: only the engine knows its uid; other containers never mount it
        os.chmod(folder, 0o1777)
    return folder


def socket_uid(runtime: Runtime) -> int | None:
    """The uid the containers' sockets belong to (None: ``docker.user`` names a user only the
    engine can resolve)."""
    uid = docker_settings(runtime).user.partition(":")[0]
    return int(uid) if uid.isdigit() else None


async def ask_endpoint(runtime: Runtime, endpoint: str, path: str, *, timeout: float) -> httpx.Response:
    """One ``GET`` of a container's ``path`` over a fresh connection (a starting server's
    socket may not exist yet), to a socket of the containers' user only.

    Raises:
        httpx.HTTPError: no answer.
        DeploymentFailedError: the socket belongs to another user.
    """
    async with endpoints.connect(endpoint, timeout=timeout, owner=socket_uid(runtime)) as (client, url):
        return await client.get(f"{url}{path}")


def owned(runtime: Runtime, endpoint: str) -> str:
    """``endpoint``, once its socket (if it has one) is checked to be a socket of the
    containers' user: the gateway connects by path and follows what it finds there.

    Raises:
        DeploymentFailedError: it is missing, a link or another user's.
    """
    socket, uid = endpoints.parse(endpoint).socket, socket_uid(runtime)
    if socket is not None and uid is not None and endpoints.socket_owner(socket) != uid:
        raise DeploymentFailedError(f"{socket} is not the socket of uid {uid}: refusing to send it traffic")
    return endpoint


def drop_socket_folder(settings: Settings, runtime: Runtime, key: str) -> None:
    """Remove the socket folder ``key`` (gone already is fine)."""
    shutil.rmtree(sockets_root(settings, runtime) / key, ignore_errors=True)


def socket_options(folder: Path, runtime: Runtime) -> tuple[list[str], dict[str, Any], dict[str, str]]:
    """The server's socket flag, the folder's mount and the endpoint label of a container
    serving in ``folder`` on the network :func:`model_network` allows."""
    network = model_network(runtime)
    mount = {"volumes": {str(folder): {"bind": CONTAINER_SOCKET_DIR, "mode": "rw"}}, "network_mode": network}
    labels = {"mlc.endpoint": endpoints.unix_endpoint(folder / SOCKET_NAME), "mlc.network": network}
    return ["--uds", f"{CONTAINER_SOCKET_DIR}/{SOCKET_NAME}"], mount, labels


def log_tail(container: Any, *, lines: int = LOG_TAIL_LINES) -> str:
    """The container's last log lines (stdout and stderr), or why there are none."""
    try:
        return bytes(container.logs(tail=lines)).decode(errors="replace").rstrip()
    except docker.errors.APIError as exc:
        return f"(no logs: {exc.explanation or exc})"


def running_online(client: Any, runtime: Runtime, deployment_id: str) -> list[Any]:
    """The deployment's running online containers of its own on ``runtime`` (not a shared host)."""
    return [
        c
        for c in online_containers(client, deployment_id, running=True)
        if c.labels.get("mlc.runtime") == runtime.name
    ]


def remove(container: Any) -> None:
    """Force-remove ``container``; gone already is fine."""
    with contextlib.suppress(docker.errors.NotFound):
        container.remove(force=True)


def error_of(response: httpx.Response) -> str:
    """The ``error`` of a model server's JSON answer, else its status and text."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return str(response.json()["error"])
    return f"HTTP {response.status_code} {response.text[:500]}"


def endpoint_of(container: Any) -> str:
    """The endpoint from the container's label (host network) or its published port."""
    if endpoint := container.labels.get("mlc.endpoint"):
        return str(endpoint)  # labels never change: no need to ask the engine again
    container.reload()
    bindings = container.attrs["NetworkSettings"]["Ports"].get(f"{CONTAINER_PORT}/tcp") or []
    if not bindings:
        raise DeploymentFailedError(
            f"container {container.name} publishes no port {CONTAINER_PORT}; "
            f"last log lines:\n{log_tail(container)}"
        )
    binding = bindings[0]
    return f"http://{binding['HostIp'] or '127.0.0.1'}:{binding['HostPort']}"


async def fail(container: Any, message: str) -> None:
    """Remove ``container`` and raise ``message`` with its last log lines."""
    tail = await asyncio.to_thread(log_tail, container)
    await asyncio.to_thread(remove, container)
    raise DeploymentFailedError(f"{message}; container removed. Last log lines:\n{tail}")


def online_containers(client: Any, deployment_id: str, *, running: bool = False) -> list[Any]:
    """The deployment's online containers (only running ones if ``running``), running ones
    first: those started for it (labelled with its id) and the spare it claimed (named for
    it, see :mod:`activities.runtimes.docker.spares`)."""
    found: list[Any] = client.containers.list(
        ignore_removed=True,
        all=not running,
        filters={"label": [f"mlc.deployment-id={deployment_id}", "mlc.mode=online"]},
    )
    with contextlib.suppress(docker.errors.NotFound):
        named = client.containers.get(container_name(deployment_id))
        if named.labels.get("mlc.mode") == SPARE_MODE and (named.status == "running" or not running):
            found.append(named)
    return sorted(found, key=lambda c: c.status != "running")


def run_model_container(
    client: Any,
    image_id: str,
    command: list[str],
    *,
    name: str,
    labels: dict[str, str],
    settings: DockerSettings,
    snapshot: ModelSnapshot,
    restart: bool = True,
    **options: Any,
) -> Any:
    """Start a detached container of ``snapshot``'s image, hardened and limited like every
    model container (:func:`container_options`), restarted by the engine per
    ``docker.restart_policy`` unless ``restart`` is false (a batch job); ``options`` add to
    or replace those (a network, volumes, another environment)."""
    run = {**container_options(settings, snapshot), **options}
    if restart:
        run["restart_policy"] = restart_policy(settings.restart_policy)
    return client.containers.run(image_id, command, name=name, labels=labels, detach=True, **run)


async def wait_healthy(
    container: Any, endpoint: str, request: OnlineDeployRequest, heartbeat: Heartbeat
) -> None:
    """Poll ``/health`` until it answers 200; fail fast when the container stops or restarts.

    ``/health`` is asked every :data:`HEALTH_POLL_SECONDS` (a refused connection costs
    next to nothing), the engine only every :data:`STATE_POLL_SECONDS`: inspecting the
    container is an engine round trip that competes for the CPU with the server's start.
    """
    settings = docker_settings(request.runtime)
    what = f"{request.snapshot.ref} in {request.stage} on runtime {request.runtime.name}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.health_timeout_seconds
    next_beat = loop.time()
    next_state = next_beat + STATE_POLL_SECONDS  # it was running a moment ago
    restarts = int(container.attrs["RestartCount"])
    while True:
        now = loop.time()
        if now >= next_state:
            await asyncio.to_thread(container.reload)
            state = container.attrs["State"]
            if state["Status"] != "running" or int(container.attrs["RestartCount"]) > restarts:
                await fail(
                    container,
                    f"{what}: container {container.name} exited with code "
                    f"{state.get('ExitCode')} before {endpoint}/health answered",
                )
            next_state = loop.time() + STATE_POLL_SECONDS
        with contextlib.suppress(httpx.HTTPError):
            if (await ask_endpoint(request.runtime, endpoint, "/health", timeout=2.0)).status_code == 200:
                return
        now = loop.time()
        if now > deadline:
            await fail(
                container,
                f"{what}: {endpoint}/health did not answer 200 within "
                f"{settings.health_timeout_seconds:.0f} s (docker.health_timeout_seconds)",
            )
        if now >= next_beat:
            heartbeat(f"waiting for {endpoint}/health ({container.name})")
            next_beat = now + HEARTBEAT_SECONDS
        await asyncio.sleep(HEALTH_POLL_SECONDS)
