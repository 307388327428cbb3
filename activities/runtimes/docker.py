"""The docker runtime: each deployment is a container of a per-snapshot model image.

Containers carry ``mlc.*`` labels (deployment id, runtime, model, version, stage, mode),
and the labels, not the driver's memory, are the source of truth: redeploying finds the
running container again, undeploy and cleanup find what to remove, and a worker that
crashed between starting a container and reporting it loses nothing.

Containers run hardened: non-root (``docker.user``), read-only root filesystem with a
tmpfs ``/tmp``, CPU and memory limits.

Networking: model containers (online servers, shared hosts, batch jobs) get **no network**
(``network_mode: none``): no port to squat, no route to the host's loopback (Temporal,
PostgreSQL, other models). An online container serves on the unix socket ``model.sock``
in a folder of its own on the engine's host, ``<runtime_dir>/_sockets/<runtime>/<key>/``
(``key``: a digest of the deployment id, so paths stay within the kernel's 107 bytes for
socket names; owned by ``docker.user``, 0700, bind-mounted at ``/run/mlc``); its endpoint is
``unix:<that folder>/model.sock`` (see :mod:`mlc.endpoints`). The worker
(deploy waits, probes, stage tests) and the runtime's gateway (which mounts the runtime's
sockets folder) reach it there; another model container mounts only its own folder and
so reaches no other model. The runtime worker must therefore run on the engine's host.
A runtime whose signed record says ``model_network: outbound`` puts its model containers
on ``docker.network_mode`` as well (still serving on their socket); that is refused for
``network_mode: host``, which would share the host's loopback. ``docker.network_mode``
otherwise only places the gateway and the streaming consumers (see
:mod:`activities.runtimes.streaming_docker`).

A runtime with ``hosting: shared`` (docker runtimes default to ``dedicated``) serves its
online deployments from one host container per runtime instead (``mlc.mode=host``,
``python -m mlc.serving serve-many``, see :mod:`mlc.serving.multi`), started from the
first hosted snapshot's image, its models in a volume at ``/models``. A deployment is put
there as ``/models/<id>/`` (copied in through the engine, so remote engines work) with its
identity ``/models/<id>.json``; its endpoint is the host's plus ``/models/<id>``, and the
host's ``GET /models`` is the record of what it hosts. A deploy then costs a copy and a
model load in an interpreter that has imported the libraries already, not a container
start. A snapshot whose requirements the host's image does not meet (409) gets a
container of its own, as do all of them under ``dedicated``. Hosted models share one
process and user, and their answers are not captured for shadow comparisons.

Batch jobs bind-mount the deployment's working directory (on the worker's host) at
``/data``. With a remote engine that path must exist on the engine's host too (a shared
mount at the same path); the same holds for a worker running in a container, whose
``MLC_HOME`` must be mounted at the same path as on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

import docker.errors
import httpx
import orjson

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
from activities.runtimes.docker_engine import HEARTBEAT_SECONDS, connect, docker_settings, engine_url
from activities.runtimes.docker_images import PACKAGE_DIR, ModelImage, ensure_image
from mlc import endpoints
from mlc.artifacts import ArtifactStore
from mlc.config import Settings
from mlc.domain import DockerSettings, ModelNetwork, ModelSnapshot, Runtime
from mlc.errors import DeploymentFailedError, NotFoundError
from mlc.evaluation import test_dataset
from mlc.manifest import load_manifest
from mlc.serving.app import SHA256_ENV, VERSION_ENV
from mlc.serving.multi import MEMORY_BUDGET_ENV

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


_HEALTH_POLL_SECONDS = 0.02
"""How often a starting container's ``/health`` is asked (was 0.25 s: 0.12 s lost per deploy on average)."""
_STATE_POLL_SECONDS = 0.25
"""How often the engine is asked whether a starting container still runs."""
_TMPFS = {"/tmp": "rw,nosuid,nodev,size=64m"}
HOST_MODE = "host"
"""``mlc.mode`` of a runtime's shared model-host container."""
HOST_MODELS_DIR = "/models"
"""Where a host container's models are (a volume of its own)."""
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


def _labels(
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


def _restart_policy(value: str) -> dict[str, Any]:
    """docker-py's form of ``no``, ``always``, ``unless-stopped`` or ``on-failure[:N]``."""
    name, _, retries = value.partition(":")
    policy: dict[str, Any] = {"Name": "" if name == "no" else name}
    if retries:
        policy["MaximumRetryCount"] = int(retries)
    return policy


def _container_options(settings: DockerSettings, snapshot: ModelSnapshot) -> dict[str, Any]:
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


async def _get(runtime: Runtime, endpoint: str, path: str, *, timeout: float) -> httpx.Response:
    """One ``GET`` of a container's ``path`` over a fresh connection (a starting server's
    socket may not exist yet), to a socket of the containers' user only.

    Raises:
        httpx.HTTPError: no answer.
        DeploymentFailedError: the socket belongs to another user.
    """
    async with endpoints.connect(endpoint, timeout=timeout, owner=socket_uid(runtime)) as (client, url):
        return await client.get(f"{url}{path}")


def _owned(runtime: Runtime, endpoint: str) -> str:
    """``endpoint``, once its socket (if it has one) is checked to be a socket of the
    containers' user: the gateway connects by path and follows what it finds there.

    Raises:
        DeploymentFailedError: it is missing, a link or another user's.
    """
    socket, uid = endpoints.parse(endpoint).socket, socket_uid(runtime)
    if socket is not None and uid is not None and endpoints.socket_owner(socket) != uid:
        raise DeploymentFailedError(f"{socket} is not the socket of uid {uid}: refusing to send it traffic")
    return endpoint


def _drop_socket_folder(settings: Settings, runtime: Runtime, key: str) -> None:
    """Remove the socket folder ``key`` (gone already is fine)."""
    shutil.rmtree(sockets_root(settings, runtime) / key, ignore_errors=True)


def _socket_options(folder: Path, runtime: Runtime) -> tuple[list[str], dict[str, Any], dict[str, str]]:
    """The server's socket flag, the folder's mount and the endpoint label of a container
    serving in ``folder`` on the network :func:`model_network` allows."""
    network = model_network(runtime)
    mount = {"volumes": {str(folder): {"bind": CONTAINER_SOCKET_DIR, "mode": "rw"}}, "network_mode": network}
    labels = {"mlc.endpoint": endpoints.unix_endpoint(folder / SOCKET_NAME), "mlc.network": network}
    return ["--uds", f"{CONTAINER_SOCKET_DIR}/{SOCKET_NAME}"], mount, labels


def _tail(container: Any, *, lines: int = LOG_TAIL_LINES) -> str:
    """The container's last log lines (stdout and stderr), or why there are none."""
    try:
        return bytes(container.logs(tail=lines)).decode(errors="replace").rstrip()
    except docker.errors.APIError as exc:
        return f"(no logs: {exc.explanation or exc})"


def running_online(client: Any, runtime: Runtime, deployment_id: str) -> list[Any]:
    """The deployment's running online containers of its own on ``runtime`` (not a shared host)."""
    labels = [f"mlc.deployment-id={deployment_id}", "mlc.mode=online", f"mlc.runtime={runtime.name}"]
    found: list[Any] = client.containers.list(filters={"label": labels})
    return found


def _remove(container: Any) -> None:
    """Force-remove ``container``; gone already is fine."""
    with contextlib.suppress(docker.errors.NotFound):
        container.remove(force=True)


def host_container_name(runtime: Runtime) -> str:
    """The name of the runtime's shared host container (and of its models volume)."""
    return container_name(runtime.name, suffix="-model-host")


def _remove_host(client: Any, host: Any) -> None:
    """Force-remove a host container and its models volume."""
    _remove(host)
    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        client.volumes.get(host.name).remove(force=True)


def _megabytes(limit: str) -> float:
    """A docker memory limit (``512m``, ``1g``, bytes) in MB."""
    text = limit.strip().lower().removesuffix("b")
    units = {"k": 1 / 1024, "m": 1.0, "g": 1024.0, "t": 1024.0**2}
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text) / 2**20


def _error_of(response: httpx.Response) -> str:
    """The ``error`` of a model server's JSON answer, else its status and text."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return str(response.json()["error"])
    return f"HTTP {response.status_code} {response.text[:500]}"


class DockerDriver(RuntimeDriver):
    """Deploys snapshots as containers on a Docker engine (local or remote)."""

    async def deploy_online(self, request: OnlineDeployRequest, heartbeat: Heartbeat) -> OnlineDeployResult:
        """Start the deployment's container (or find the running one) and wait for ``/health``.

        Raises:
            DeploymentFailedError: the image could not be built, or the container exited or
                stayed unhealthy past ``docker.health_timeout_seconds`` (it is then removed
                and the error quotes its last log lines).
            RuntimeUnavailableError: the engine cannot be reached.
        """
        runtime, snapshot = request.runtime, request.snapshot
        settings = docker_settings(runtime)
        async with connect(runtime, f"deploy {snapshot.ref}") as client:
            container = await self._reusable(client, request)
            if container is None and runtime.shares_hosts(request.stage):
                hosted = await self._deploy_hosted(client, request, heartbeat)
                if hosted is not None:
                    return hosted
            image: ModelImage | None = None
            if container is None:
                image = await ensure_image(
                    client,
                    settings=self.settings,
                    runtime=runtime,
                    snapshot=snapshot,
                    heartbeat=heartbeat,
                    log_path=self.workdir(runtime, request.deployment_id) / "build.log",
                )
                container = await self._start_online(client, request, settings, image)
            endpoint = await asyncio.to_thread(self._endpoint, container)
            await self._wait_healthy(container, endpoint, request, heartbeat)
            details: dict[str, Any] = {
                "container_id": container.id,
                "container_name": container.name,
                "image": image.tag if image else container.attrs["Config"]["Image"],
                "image_id": image.id if image else container.attrs["Image"],
                "reused": image is None,
            }
            if image is not None:
                details["image_built"] = image.built
                details["image_seconds"] = round(image.seconds, 3)
            return OnlineDeployResult(endpoint=endpoint, details=details)

    # --- the runtime's shared host container -----------------------------------------

    async def _deploy_hosted(
        self, client: Any, request: OnlineDeployRequest, heartbeat: Heartbeat
    ) -> OnlineDeployResult | None:
        """Copy the package into the runtime's host container (started when needed) and
        wait for its ``/models/<id>/health``; None when the host refuses it (409)."""
        host = await self._host(client, request, heartbeat)
        base = await asyncio.to_thread(self._endpoint, host)
        endpoint = f"{base}/models/{request.deployment_id}"
        archive = await asyncio.to_thread(self._hosted_archive, request)
        await asyncio.to_thread(self._remove_hosted, host, request.deployment_id)
        if not await asyncio.to_thread(host.put_archive, HOST_MODELS_DIR, archive):
            raise DeploymentFailedError(f"could not copy {request.snapshot.ref} into {host.name}")
        settings = docker_settings(request.runtime)
        deadline = time.monotonic() + settings.health_timeout_seconds
        problem = None
        while problem is None:
            with contextlib.suppress(httpx.HTTPError):
                response = await _get(
                    request.runtime, endpoint, "/health", timeout=settings.health_timeout_seconds
                )
                if response.status_code == 200:
                    details = {"container_id": host.id, "container_name": host.name, "host": True}
                    return OnlineDeployResult(endpoint=endpoint, details=details)
                if response.status_code == 409:
                    await asyncio.to_thread(self._remove_hosted, host, request.deployment_id)
                    return None
                problem = (
                    "is not in the host container (its copy is gone)"
                    if response.status_code == 404
                    else f"could not be loaded: {_error_of(response)}"
                )
            if time.monotonic() > deadline:
                problem = f"did not answer {endpoint}/health within {settings.health_timeout_seconds:.0f} s"
            await asyncio.sleep(_HEALTH_POLL_SECONDS)
        await asyncio.to_thread(self._remove_hosted, host, request.deployment_id)
        tail = await asyncio.to_thread(_tail, host)
        raise DeploymentFailedError(
            f"{request.snapshot.ref} in {request.stage} on runtime {request.runtime.name} (deployment "
            f"{request.deployment_id}, host container {host.name}) {problem}; last log lines:\n{tail}"
        )

    def _hosted_archive(self, request: OnlineDeployRequest) -> bytes:
        """A tar of ``<id>/`` (the unpacked package) and ``<id>.json`` (its identity), readable by all."""
        workdir = self.workdir(request.runtime, request.deployment_id)
        package = ArtifactStore(self.settings.artifact_dir).unpack(
            request.snapshot.sha256, workdir / "package"
        )
        identity = {
            "version": str(request.snapshot.version),
            "sha256": request.snapshot.sha256,
            "capture": f"/tmp/mlc-capture-{request.deployment_id}.jsonl",
        }
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:

            def readable(info: tarfile.TarInfo) -> tarfile.TarInfo:
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mode = 0o755 if info.isdir() else 0o644
                return info

            tar.add(package, arcname=request.deployment_id, filter=readable)
            data = json.dumps(identity).encode()
            info = readable(tarfile.TarInfo(f"{request.deployment_id}.json"))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        shutil.rmtree(workdir, ignore_errors=True)
        return buffer.getvalue()

    @staticmethod
    def _remove_hosted(host: Any, deployment_id: str) -> None:
        """Take the deployment's package out of the host container (gone already is fine)."""
        paths = [f"{HOST_MODELS_DIR}/{deployment_id}", f"{HOST_MODELS_DIR}/{deployment_id}.json"]
        with contextlib.suppress(docker.errors.APIError):
            host.exec_run(["rm", "-rf", "--", *paths], user="0:0")

    async def _host(self, client: Any, request: OnlineDeployRequest, heartbeat: Heartbeat) -> Any:
        """The runtime's running host container: found, started again, or created from the
        image of ``request``'s snapshot; returns once its ``/health`` answers."""
        runtime = request.runtime
        settings = docker_settings(runtime)
        name = host_container_name(runtime)
        found = await asyncio.to_thread(self._host_containers, client, runtime)
        wanted = model_network(runtime)
        for stale in [h for h in found if h.labels.get("mlc.network") != wanted]:
            await asyncio.to_thread(_remove_host, client, stale)  # another network, or a TCP port
        host = next((h for h in found if h.labels.get("mlc.network") == wanted), None)
        if host is not None and host.status != "running":
            await asyncio.to_thread(host.start)
            await asyncio.to_thread(host.reload)
        if host is None:
            image = await ensure_image(
                client,
                settings=self.settings,
                runtime=runtime,
                snapshot=request.snapshot,
                heartbeat=heartbeat,
                log_path=self.workdir(runtime, request.deployment_id) / "build.log",
            )
            labels = {
                "mlc.runtime": runtime.name,
                "mlc.mode": HOST_MODE,
                "mlc.image-of": request.snapshot.sha256,
            }
            folder = await asyncio.to_thread(socket_folder, self.settings, runtime, HOST_SOCKET_KEY)
            uds, options, socket_labels = _socket_options(folder, runtime)
            labels.update(socket_labels)
            options["volumes"][name] = {"bind": HOST_MODELS_DIR, "mode": "rw"}
            command = ["python3", "-m", "mlc.serving", "serve-many", "--models-dir", HOST_MODELS_DIR, *uds]
            budget = {
                MEMORY_BUDGET_ENV: str(int(_megabytes(settings.memory) * 0.8))
            }  # evict before the OOM killer
            container_options = {**_container_options(settings, request.snapshot), "environment": budget}
            try:
                host = await asyncio.to_thread(
                    client.containers.run,
                    image.id,
                    command,
                    name=name,
                    labels=labels,
                    detach=True,
                    restart_policy=_restart_policy(settings.restart_policy),
                    **container_options,
                    **options,
                )
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise
                host = await asyncio.to_thread(client.containers.get, name)
        assert host is not None
        endpoint = await asyncio.to_thread(self._endpoint, host)
        deadline = time.monotonic() + settings.health_timeout_seconds
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await _get(runtime, endpoint, "/health", timeout=2.0)).status_code == 200:
                    return host
            if time.monotonic() > deadline:
                await self._fail(host, f"the model host {host.name} of runtime {runtime.name} did not start")
            heartbeat(f"waiting for the model host {host.name}")
            await asyncio.sleep(_HEALTH_POLL_SECONDS)

    @staticmethod
    def _host_containers(client: Any, runtime: Runtime) -> list[Any]:
        """The runtime's host containers, running ones first."""
        found = client.containers.list(
            all=True, filters={"label": [f"mlc.runtime={runtime.name}", f"mlc.mode={HOST_MODE}"]}
        )
        return sorted(found, key=lambda c: c.status != "running")

    async def _hosted(self, client: Any, runtime: Runtime) -> tuple[Any, str, list[str]] | None:
        """The runtime's running host container, its endpoint and the ids it hosts."""
        found = await asyncio.to_thread(self._host_containers, client, runtime)
        if not found or found[0].status != "running":
            return None
        host = found[0]
        endpoint = await asyncio.to_thread(self._endpoint, host)
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            listed = (await _get(runtime, endpoint, "/models", timeout=5.0)).json()["models"]
            return host, endpoint, [str(i) for i in listed]
        return None

    async def _unhost(
        self, client: Any, runtime: Runtime, *, keep: set[str] | None, only: str | None
    ) -> list[str]:
        """Take ``only`` (or every id not in ``keep``) out of the runtime's host; remove the
        host and its volume when it hosts nothing any more. Returns the ids taken out."""
        hosted = await self._hosted(client, runtime)
        if hosted is None:
            found = await asyncio.to_thread(self._host_containers, client, runtime)
            if found and keep is not None and only is None and not keep:  # down and nothing kept: it goes
                for host in found:
                    await asyncio.to_thread(_remove_host, client, host)
            return []
        host, _, ids = hosted
        gone = [i for i in ids if (i == only if only is not None else i not in (keep or set()))]
        for deployment_id in gone:
            await asyncio.to_thread(self._remove_hosted, host, deployment_id)
        if not set(ids) - set(gone):
            await asyncio.to_thread(_remove_host, client, host)
            await asyncio.to_thread(_drop_socket_folder, self.settings, runtime, HOST_SOCKET_KEY)
        return gone

    async def _reusable(self, client: Any, request: OnlineDeployRequest) -> Any:
        """The deployment's running container of this snapshot, after removing stale ones."""
        found = await asyncio.to_thread(
            client.containers.list,
            all=True,
            filters={"label": [f"mlc.deployment-id={request.deployment_id}", "mlc.mode=online"]},
        )
        keep = None
        network = model_network(request.runtime)
        for container in found:
            labels = container.labels
            if (
                keep is None
                and container.status == "running"
                and labels.get("mlc.sha256") == request.snapshot.sha256
                and labels.get("mlc.runtime") == request.runtime.name
                and labels.get("mlc.network") == network  # not one started with a TCP port
            ):
                keep = container
            else:
                await asyncio.to_thread(_remove, container)
        return keep

    async def _start_online(
        self, client: Any, request: OnlineDeployRequest, settings: DockerSettings, image: ModelImage
    ) -> Any:
        """Create and start the container; on a name clash (a concurrent deploy) use theirs."""
        labels = _labels(
            deployment_id=request.deployment_id,
            runtime=request.runtime,
            snapshot=request.snapshot,
            stage=request.stage,
            mode="online",
        )
        folder = await asyncio.to_thread(
            socket_folder, self.settings, request.runtime, socket_key(request.deployment_id)
        )
        uds, options, socket_labels = _socket_options(folder, request.runtime)
        command = ["python3", "-m", "mlc.serving", "serve", "--package", PACKAGE_DIR, *uds]
        name = container_name(request.deployment_id)
        try:
            return await asyncio.to_thread(
                client.containers.run,
                image.id,
                command,
                name=name,
                labels={**labels, **socket_labels},
                detach=True,
                restart_policy=_restart_policy(settings.restart_policy),
                **_container_options(settings, request.snapshot),
                **options,
            )
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
            return await asyncio.to_thread(client.containers.get, name)

    @staticmethod
    def _endpoint(container: Any) -> str:
        """The endpoint from the container's label (host network) or its published port."""
        if endpoint := container.labels.get("mlc.endpoint"):
            return str(endpoint)  # labels never change: no need to ask the engine again
        container.reload()
        bindings = container.attrs["NetworkSettings"]["Ports"].get(f"{CONTAINER_PORT}/tcp") or []
        if not bindings:
            raise DeploymentFailedError(
                f"container {container.name} publishes no port {CONTAINER_PORT}; "
                f"last log lines:\n{_tail(container)}"
            )
        binding = bindings[0]
        return f"http://{binding['HostIp'] or '127.0.0.1'}:{binding['HostPort']}"

    async def _wait_healthy(
        self, container: Any, endpoint: str, request: OnlineDeployRequest, heartbeat: Heartbeat
    ) -> None:
        """Poll ``/health`` until it answers 200; fail fast when the container stops or restarts.

        ``/health`` is asked every :data:`_HEALTH_POLL_SECONDS` (a refused connection costs
        next to nothing), the engine only every :data:`_STATE_POLL_SECONDS`: inspecting the
        container is an engine round trip that competes for the CPU with the server's start.
        """
        settings = docker_settings(request.runtime)
        what = f"{request.snapshot.ref} in {request.stage} on runtime {request.runtime.name}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.health_timeout_seconds
        next_beat = loop.time()
        next_state = next_beat + _STATE_POLL_SECONDS  # it was running a moment ago
        restarts = int(container.attrs["RestartCount"])
        while True:
            now = loop.time()
            if now >= next_state:
                await asyncio.to_thread(container.reload)
                state = container.attrs["State"]
                if state["Status"] != "running" or int(container.attrs["RestartCount"]) > restarts:
                    await self._fail(
                        container,
                        f"{what}: container {container.name} exited with code "
                        f"{state.get('ExitCode')} before {endpoint}/health answered",
                    )
                next_state = loop.time() + _STATE_POLL_SECONDS
            with contextlib.suppress(httpx.HTTPError):
                if (await _get(request.runtime, endpoint, "/health", timeout=2.0)).status_code == 200:
                    return
            now = loop.time()
            if now > deadline:
                await self._fail(
                    container,
                    f"{what}: {endpoint}/health did not answer 200 within "
                    f"{settings.health_timeout_seconds:.0f} s (docker.health_timeout_seconds)",
                )
            if now >= next_beat:
                heartbeat(f"waiting for {endpoint}/health ({container.name})")
                next_beat = now + HEARTBEAT_SECONDS
            await asyncio.sleep(_HEALTH_POLL_SECONDS)

    @staticmethod
    async def _fail(container: Any, message: str) -> None:
        """Remove ``container`` and raise ``message`` with its last log lines."""
        tail = await asyncio.to_thread(_tail, container)
        await asyncio.to_thread(_remove, container)
        raise DeploymentFailedError(f"{message}; container removed. Last log lines:\n{tail}")

    async def run_batch(self, request: BatchJobRequest, heartbeat: Heartbeat) -> BatchJobResult:
        """Score the input in a one-off container with no network; remove it in every case.

        Raises:
            DeploymentFailedError: the image could not be built or the job failed (quoting
                the container's last log lines).
            RuntimeUnavailableError: the engine cannot be reached.
        """
        runtime, snapshot = request.runtime, request.snapshot
        settings = docker_settings(runtime)
        workdir = self.workdir(runtime, request.deployment_id)
        input_path, output_path = workdir / "input.jsonl", workdir / "output.jsonl"
        records = await asyncio.to_thread(self._prepare_input, request, workdir, input_path)
        async with connect(runtime, f"run a batch job of {snapshot.ref}") as client:
            name = container_name(request.deployment_id, suffix="-batch")
            leftovers = await asyncio.to_thread(
                client.containers.list,
                all=True,
                filters={"label": [f"mlc.deployment-id={request.deployment_id}", "mlc.mode=batch"]},
            )
            for leftover in leftovers:  # from an attempt whose worker died: start afresh
                await asyncio.to_thread(_remove, leftover)
            image = await ensure_image(
                client,
                settings=self.settings,
                runtime=runtime,
                snapshot=snapshot,
                heartbeat=heartbeat,
                log_path=workdir / "build.log",
            )
            command = [
                "python3", "-m", "mlc.serving", "batch", "--package", PACKAGE_DIR,
                "--input", "/data/input.jsonl", "--output", "/data/output.jsonl",
            ]  # fmt: skip
            started = time.monotonic()
            container = await asyncio.to_thread(
                client.containers.run,
                image.id,
                command,
                name=name,
                labels=_labels(
                    deployment_id=request.deployment_id,
                    runtime=runtime,
                    snapshot=snapshot,
                    stage=request.stage,
                    mode="batch",
                ),
                detach=True,
                network_mode=model_network(runtime),
                volumes={str(workdir): {"bind": "/data", "mode": "rw"}},
                **_container_options(settings, snapshot),
            )
            try:
                summary = await self._wait_batch(container, request, heartbeat)
            finally:
                await asyncio.to_thread(_remove, container)
        return BatchJobResult(
            output_path=str(output_path),
            records=int(summary.get("records", records)),
            seconds=float(summary.get("seconds", time.monotonic() - started)),
            details={
                "image": image.tag,
                "image_id": image.id,
                "image_built": image.built,
                "image_seconds": round(image.seconds, 3),
                "container_seconds": round(time.monotonic() - started, 3),
                "load_seconds": summary.get("load_seconds"),
            },
        )

    def _prepare_input(self, request: BatchJobRequest, workdir: Path, input_path: Path) -> int:
        """Put the job's input at ``input_path`` and return its record count.

        The working directory is made world-writable because the job runs as an
        unprivileged user (``docker.user``) that owns nothing on the host, and must create
        its output there.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o777)
        (workdir / "output.jsonl").unlink(missing_ok=True)
        if request.input_path is not None:
            shutil.copyfile(request.input_path, input_path)
            with input_path.open("rb") as fh:
                count = sum(1 for line in fh if line.strip())
        else:
            package = ArtifactStore(self.settings.artifact_dir).unpack(
                request.snapshot.sha256, workdir / "package"
            )
            dataset = test_dataset(load_manifest(package), package)
            input_path.write_bytes(
                b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in dataset)
            )
            count = len(dataset)
        os.chmod(input_path, 0o644)
        return count

    @staticmethod
    async def _wait_batch(container: Any, request: BatchJobRequest, heartbeat: Heartbeat) -> dict[str, Any]:
        """Wait for the job to exit and return its summary (its last stdout line)."""
        started = time.monotonic()
        while True:
            await asyncio.to_thread(container.reload)
            state = container.attrs["State"]
            if state["Status"] in ("exited", "dead"):
                break
            heartbeat(f"batch job {container.name} running for {time.monotonic() - started:.0f} s")
            await asyncio.sleep(min(HEARTBEAT_SECONDS, 0.1 + (time.monotonic() - started) / 4))
        what = f"batch job of {request.snapshot.ref} in {request.stage} on runtime {request.runtime.name}"
        if state["ExitCode"] != 0:
            tail = await asyncio.to_thread(_tail, container)
            raise DeploymentFailedError(
                f"{what} failed: container {container.name} exited with code {state['ExitCode']}. "
                f"Last log lines:\n{tail}"
            )
        stdout = await asyncio.to_thread(container.logs, stdout=True, stderr=False, tail=5)
        for line in reversed(bytes(stdout).decode(errors="replace").splitlines()):
            with contextlib.suppress(json.JSONDecodeError):
                summary = json.loads(line)
                if isinstance(summary, dict):
                    return summary
        tail = await asyncio.to_thread(_tail, container)
        raise DeploymentFailedError(
            f"{what}: container {container.name} exited 0 but printed no JSON summary. "
            f"Last log lines:\n{tail}"
        )

    async def locate(self, runtime: Runtime, deployment_id: str) -> str:
        """The endpoint of the deployment's running container on this runtime's engine.

        Raises:
            NotFoundError: no running container serves it.
            DeploymentFailedError: its socket is not a socket of the containers' user.
        """
        async with connect(runtime, f"locate {deployment_id}") as client:
            found = await asyncio.to_thread(running_online, client, runtime, deployment_id)
            if found:
                return _owned(runtime, await asyncio.to_thread(self._endpoint, found[0]))
            hosted = await self._hosted(client, runtime)
            if hosted is not None and deployment_id in hosted[2]:
                return _owned(runtime, f"{hosted[1]}/models/{deployment_id}")
            raise NotFoundError(
                f"deployment {deployment_id} has no running container on runtime {runtime.name}"
            )

    async def probe(self, request: ProbeRequest) -> ProbeResult:
        """The deployment's container is running and its ``/health`` answers 200 (three tries).

        Raises:
            RuntimeUnavailableError: the engine cannot be reached (then nothing is judged).
        """
        runtime = request.runtime
        async with connect(runtime, f"check deployment {request.deployment_id}") as client:
            found = await asyncio.to_thread(self._online_containers, client, request.deployment_id)
            if not found:  # hosted in the runtime's host container?
                found = await asyncio.to_thread(self._host_containers, client, runtime)
                hosted = await self._hosted(client, runtime) if found else None
                if hosted is not None and request.deployment_id not in hosted[2]:
                    found = []
            if not found:
                return ProbeResult(
                    healthy=False,
                    detail=f"no container of this deployment on the engine at {engine_url(runtime)}",
                )
            container = found[0]
            state = container.attrs["State"]
            if container.status != "running":
                return ProbeResult(
                    healthy=False,
                    detail=f"container {container.name} is {container.status} "
                    f"(exit code {state.get('ExitCode')})",
                    log_tail=await asyncio.to_thread(_tail, container),
                )
            endpoint = await asyncio.to_thread(self._endpoint, container)
            if container.labels.get("mlc.mode") == HOST_MODE:
                endpoint = f"{endpoint}/models/{request.deployment_id}"
            answer = await ask_health(endpoint)
            if answer is None:
                return ProbeResult(healthy=True, endpoint=endpoint)
            return ProbeResult(
                healthy=False,
                detail=f"container {container.name} runs but {endpoint}/health gave {answer}",
                log_tail=await asyncio.to_thread(_tail, container),
                endpoint=endpoint,
            )

    async def restart(self, request: OnlineDeployRequest, heartbeat: Heartbeat) -> OnlineDeployResult:
        """Start the deployment's stopped container again (same container, same endpoint);
        when the engine no longer has it, deploy afresh (the image is usually still there)."""
        async with connect(request.runtime, f"restart {request.deployment_id}") as client:
            found = await asyncio.to_thread(self._online_containers, client, request.deployment_id)
            same = [c for c in found if c.labels.get("mlc.sha256") == request.snapshot.sha256]
            if same:
                container = same[0]
                await asyncio.to_thread(container.restart, timeout=5)
                await asyncio.to_thread(container.reload)
                endpoint = await asyncio.to_thread(self._endpoint, container)
                await self._wait_healthy(container, endpoint, request, heartbeat)
                return OnlineDeployResult(
                    endpoint=endpoint,
                    details={"container_id": container.id, "container_name": container.name},
                )
        return await self.deploy_online(request, heartbeat)

    @staticmethod
    def _online_containers(client: Any, deployment_id: str) -> list[Any]:
        """The deployment's online containers, running ones first."""
        found = client.containers.list(
            all=True, filters={"label": [f"mlc.deployment-id={deployment_id}", "mlc.mode=online"]}
        )
        return sorted(found, key=lambda c: c.status != "running")

    async def deploy_streaming(
        self, request: StreamingDeployRequest, heartbeat: Heartbeat
    ) -> StreamingDeployResult:
        """One consumer container per instance (see :mod:`activities.runtimes.streaming_docker`)."""
        from activities.runtimes.streaming_docker import deploy_docker

        return await deploy_docker(self, request, heartbeat)

    async def undeploy(self, request: UndeployRequest) -> None:
        """Remove every container labelled with the deployment id (none is fine); streaming
        consumers are stopped first so they commit and leave their group."""
        from activities.runtimes.streaming import drop_test_topics
        from activities.runtimes.streaming_docker import MODE, stop_containers

        async with connect(request.runtime, f"undeploy {request.deployment_id}") as client:
            found = await asyncio.to_thread(
                client.containers.list,
                all=True,
                filters={"label": f"mlc.deployment-id={request.deployment_id}"},
            )
            await stop_containers([c for c in found if c.labels.get("mlc.mode") == MODE])
            for container in found:
                if container.labels.get("mlc.mode") != MODE:
                    await asyncio.to_thread(_remove, container)
            await self._unhost(client, request.runtime, keep=None, only=request.deployment_id)
        await asyncio.to_thread(
            _drop_socket_folder, self.settings, request.runtime, socket_key(request.deployment_id)
        )
        await drop_test_topics(request.runtime, request.deployment_id)

    async def cleanup(self, request: CleanupRequest) -> CleanupResult:
        """Remove the runtime's containers whose deployment is not in ``request.keep``."""
        runtime = request.runtime
        keep = set(request.keep)
        removed: set[str] = set()
        async with connect(runtime, "clean up leftover containers") as client:
            found = await asyncio.to_thread(
                client.containers.list, all=True, filters={"label": f"mlc.runtime={runtime.name}"}
            )
            for container in found:
                if container.labels.get("mlc.mode") == HOST_MODE:
                    continue  # below: it goes when it hosts nothing kept
                deployment_id = container.labels.get("mlc.deployment-id", "")
                if deployment_id not in keep:
                    await asyncio.to_thread(_remove, container)
                    removed.add(deployment_id)
            removed.update(await self._unhost(client, runtime, keep=keep, only=None))
            hosts = await asyncio.to_thread(self._host_containers, client, runtime)
        kept = {socket_key(i) for i in keep} | ({HOST_SOCKET_KEY} if hosts else set())
        await asyncio.to_thread(self._drop_socket_folders, runtime, kept)
        return CleanupResult(removed=tuple(sorted(removed)))

    def _drop_socket_folders(self, runtime: Runtime, keep: set[str]) -> None:
        """Remove the runtime's socket folders but those of ``keep``."""
        with contextlib.suppress(FileNotFoundError):
            for folder in list(sockets_root(self.settings, runtime).iterdir()):
                if folder.name not in keep:
                    _drop_socket_folder(self.settings, runtime, folder.name)
