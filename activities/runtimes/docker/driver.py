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
:mod:`activities.runtimes.docker.streaming`).

A dedicated deploy claims the runtime's warm spare of its snapshot when there is one: a
container started after the previous deploy of that snapshot there, exactly as this one
would be, that has imported its libraries and loaded its package already; it is renamed to
the deployment's container name and serves that deployment only (see
:mod:`activities.runtimes.docker.spares`). The deployment's containers are therefore those
labelled with its id and the spare named for it (:func:`online_containers`).

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
from typing import Any

import docker.errors

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
from activities.runtimes.docker import batch, spares
from activities.runtimes.docker.containers import (
    HOST_MODE,
    HOST_SOCKET_KEY,
    SPARE_MODE,
    SPARE_PREFIX,
    claimant,
    container_name,
    drop_socket_folder,
    endpoint_of,
    label_key,
    log_tail,
    model_labels,
    model_network,
    online_containers,
    owned,
    remove,
    run_model_container,
    running_online,
    socket_folder,
    socket_key,
    socket_options,
    sockets_root,
    wait_healthy,
)
from activities.runtimes.docker.engine import connect, docker_settings, engine_url
from activities.runtimes.docker.gateway import DockerGateway
from activities.runtimes.docker.hosting import deploy_hosted, host_containers, running_host, unhost
from activities.runtimes.docker.images import ModelImage, ensure_image
from activities.runtimes.docker.streaming import MODE, deploy_docker, stop_containers
from activities.runtimes.gateway.routing import GatewayRouted
from activities.runtimes.streams import drop_test_topics
from mlc.domain import DockerSettings, Runtime
from mlc.errors import DeploymentFailedError, NotFoundError
from mlc.serving.capture import CAPTURE_FILE, CAPTURE_MAX_BYTES, read_answers

_READ_CAPTURES = f"""
import os, stat, sys
for path in ("/tmp/{CAPTURE_FILE}.1", "/tmp/{CAPTURE_FILE}"):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        continue
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode):
        os.lseek(fd, max(0, info.st_size - int(sys.argv[1])), os.SEEK_SET)
        sys.stdout.buffer.write(os.read(fd, int(sys.argv[1])))
    os.close(fd)
"""
"""Prints the last bytes (at most ``argv[1]``) of each capture file in a container's ``/tmp``,
which the model owns: a link (to ``/dev/zero``), a FIFO or a device there is skipped, never
read, so what comes back is bounded (python3 is in every model image; ``-I``: nothing of the
model's on its path)."""


class DockerDriver(GatewayRouted):
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
                hosted = await deploy_hosted(self, client, request, heartbeat)
                if hosted is not None:
                    return hosted
            image: ModelImage | None = None
            claimed = False
            if container is None:
                image = await ensure_image(
                    client,
                    settings=self.settings,
                    runtime=runtime,
                    snapshot=snapshot,
                    heartbeat=heartbeat,
                    log_path=self.workdir(runtime, request.deployment_id) / "build.log",
                )
                wanted = spares.shape(runtime, snapshot, image.id, request.stage)
                container = await asyncio.to_thread(
                    spares.claim, client, self.settings, runtime, wanted, request.deployment_id
                )
                claimed = container is not None
                if not claimed:
                    container = await self._start_online(client, request, settings, image)
            endpoint = await asyncio.to_thread(endpoint_of, container)
            try:
                await wait_healthy(container, endpoint, request, heartbeat)
            except DeploymentFailedError:
                if claimed:  # the container is gone; its socket folder is named for no one
                    await asyncio.to_thread(spares.drop, client, self.settings, runtime, container)
                raise
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
                details["spare"] = claimed
                # The next deploy of this snapshot here finds a container warm (off this one's path).
                spares.start_later(self.settings, runtime, snapshot, image.id, request.stage)
            return OnlineDeployResult(endpoint=endpoint, details=details)

    async def _reusable(self, client: Any, request: OnlineDeployRequest) -> Any:
        """The deployment's running container of this snapshot, after removing stale ones."""
        found = await asyncio.to_thread(online_containers, client, request.deployment_id)
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
                await asyncio.to_thread(spares.drop, client, self.settings, request.runtime, container)
        return keep

    async def _start_online(
        self, client: Any, request: OnlineDeployRequest, settings: DockerSettings, image: ModelImage
    ) -> Any:
        """Create and start the container; on a name clash (a concurrent deploy) use theirs."""
        labels = model_labels(
            deployment_id=request.deployment_id,
            runtime=request.runtime,
            snapshot=request.snapshot,
            stage=request.stage,
            mode="online",
        )
        folder = await asyncio.to_thread(
            socket_folder, self.settings, request.runtime, socket_key(request.deployment_id)
        )
        uds, options, socket_labels = socket_options(folder, request.runtime)
        command = [*spares.serve_command(), *uds]
        name = container_name(request.deployment_id)
        try:
            return await asyncio.to_thread(
                run_model_container,
                client,
                image.id,
                command,
                name=name,
                labels={**labels, **socket_labels},
                settings=settings,
                snapshot=request.snapshot,
                **options,
            )
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
            return await asyncio.to_thread(client.containers.get, name)

    async def locate(self, runtime: Runtime, deployment_id: str) -> str:
        """The endpoint of the deployment's running container on this runtime's engine.

        Raises:
            NotFoundError: no running container serves it.
            DeploymentFailedError: its socket is not a socket of the containers' user.
        """
        async with connect(runtime, f"locate {deployment_id}") as client:
            found = await asyncio.to_thread(running_online, client, runtime, deployment_id)
            if found:
                return owned(runtime, await asyncio.to_thread(endpoint_of, found[0]))
            hosted = await running_host(client, runtime)
            if hosted is not None and deployment_id in hosted[2]:
                return owned(runtime, f"{hosted[1]}/models/{deployment_id}")
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
            found = await asyncio.to_thread(online_containers, client, request.deployment_id)
            if not found:  # hosted in the runtime's host container?
                found = await asyncio.to_thread(host_containers, client, runtime)
                hosted = await running_host(client, runtime) if found else None
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
                    log_tail=await asyncio.to_thread(log_tail, container),
                )
            endpoint = await asyncio.to_thread(endpoint_of, container)
            if container.labels.get("mlc.mode") == HOST_MODE:
                endpoint = f"{endpoint}/models/{request.deployment_id}"
            answer = await ask_health(endpoint)
            if answer is None:
                return ProbeResult(healthy=True, endpoint=endpoint)
            return ProbeResult(
                healthy=False,
                detail=f"container {container.name} runs but {endpoint}/health gave {answer}",
                log_tail=await asyncio.to_thread(log_tail, container),
                endpoint=endpoint,
            )

    async def restart(self, request: OnlineDeployRequest, heartbeat: Heartbeat) -> OnlineDeployResult:
        """Start the deployment's stopped container again (same container, same endpoint);
        when the engine no longer has it, deploy afresh (the image is usually still there)."""
        async with connect(request.runtime, f"restart {request.deployment_id}") as client:
            found = await asyncio.to_thread(online_containers, client, request.deployment_id)
            same = [c for c in found if c.labels.get("mlc.sha256") == request.snapshot.sha256]
            if same:
                container = same[0]
                await asyncio.to_thread(container.restart, timeout=5)
                await asyncio.to_thread(container.reload)
                endpoint = await asyncio.to_thread(endpoint_of, container)
                await wait_healthy(container, endpoint, request, heartbeat)
                return OnlineDeployResult(
                    endpoint=endpoint,
                    details={"container_id": container.id, "container_name": container.name},
                )
        return await self.deploy_online(request, heartbeat)

    async def deploy_streaming(
        self, request: StreamingDeployRequest, heartbeat: Heartbeat
    ) -> StreamingDeployResult:
        """One consumer container per instance (see :mod:`activities.runtimes.docker.streaming`)."""
        return await deploy_docker(self, request, heartbeat)

    async def undeploy(self, request: UndeployRequest) -> None:
        """Remove every container labelled with the deployment id and the spare it claimed
        (none is fine), with their socket folders; streaming consumers are stopped first so
        they commit and leave their group. The snapshot's spares go too once nothing of it
        serves on the runtime (see :func:`spares.retire_unserved`)."""

        async with connect(request.runtime, f"undeploy {request.deployment_id}") as client:
            found = await asyncio.to_thread(
                client.containers.list,
                ignore_removed=True,
                all=True,
                filters={"label": f"mlc.deployment-id={request.deployment_id}"},
            )
            claimed = await asyncio.to_thread(online_containers, client, request.deployment_id)
            found += [c for c in claimed if c.labels.get("mlc.mode") == SPARE_MODE]
            await stop_containers([c for c in found if c.labels.get("mlc.mode") == MODE])
            for container in found:
                if container.labels.get("mlc.mode") != MODE:
                    await asyncio.to_thread(spares.drop, client, self.settings, request.runtime, container)
            await unhost(self, client, request.runtime, keep=None, only=request.deployment_id)
            if shas := {c.labels.get("mlc.sha256", "") for c in found} - {""}:
                await spares.settled()  # a spare this process is starting for it
                await asyncio.to_thread(spares.retire_unserved, client, self.settings, request.runtime, shas)
        await asyncio.to_thread(
            drop_socket_folder, self.settings, request.runtime, socket_key(request.deployment_id)
        )
        await drop_test_topics(request.runtime, request.deployment_id)

    async def cleanup(self, request: CleanupRequest) -> CleanupResult:
        """Remove the runtime's containers whose deployment is not in ``request.keep``, and
        its unclaimed spares."""
        runtime = request.runtime
        keep = set(request.keep)
        kept_names = {container_name(i): i for i in keep}
        removed: set[str] = set()
        kept_keys: set[str] = set()
        await spares.settled()  # a spare still starting would outlive this cleanup
        async with connect(runtime, "clean up leftover containers") as client:
            found = await asyncio.to_thread(
                client.containers.list,
                ignore_removed=True,
                all=True,
                filters={"label": f"mlc.runtime={runtime.name}"},
            )
            for container in found:
                if container.labels.get("mlc.mode") == HOST_MODE:
                    continue  # below: it goes when it hosts nothing kept
                if container.labels.get("mlc.mode") == SPARE_MODE:
                    if container.name in kept_names:  # claimed by a kept deployment
                        kept_keys.add(label_key(container) or "")
                        continue
                    await asyncio.to_thread(spares.drop, client, self.settings, runtime, container)
                    if not container.name.startswith(SPARE_PREFIX):
                        removed.add(claimant(container.name))
                    continue
                deployment_id = container.labels.get("mlc.deployment-id", "")
                if deployment_id not in keep:
                    await asyncio.to_thread(remove, container)
                    removed.add(deployment_id)
            removed.update(await unhost(self, client, runtime, keep=keep, only=None))
            hosts = await asyncio.to_thread(host_containers, client, runtime)
        kept = {socket_key(i) for i in keep} | kept_keys | ({HOST_SOCKET_KEY} if hosts else set())
        await asyncio.to_thread(self._drop_socket_folders, runtime, kept)
        return CleanupResult(removed=tuple(sorted(removed)))

    async def drop_spares(self, runtime: Runtime) -> int:
        """Remove the runtime's unclaimed spare containers (``mlc dev`` stopping)."""
        return await spares.drop_spares(self.settings, runtime)

    def _drop_socket_folders(self, runtime: Runtime, keep: set[str]) -> None:
        """Remove the runtime's socket folders but those of ``keep``."""
        with contextlib.suppress(FileNotFoundError):
            for folder in list(sockets_root(self.settings, runtime).iterdir()):
                if folder.name not in keep:
                    drop_socket_folder(self.settings, runtime, folder.name)

    async def run_batch(self, request: BatchJobRequest, heartbeat: Heartbeat) -> BatchJobResult:
        """One container per job (see :func:`activities.runtimes.docker.batch.run_batch`)."""
        return await batch.run_batch(self, request, heartbeat)

    def gateway(self, runtime: Runtime) -> DockerGateway:
        """The runtime's gateway, as this kind runs it."""
        return DockerGateway(self.settings, runtime)

    async def read_captures(self, runtime: Runtime, deployment_id: str, *, since: float) -> dict[str, Any]:
        """The answers the deployment's container recorded in its ``/tmp``."""
        async with connect(runtime, f"read the answers recorded by {deployment_id}") as client:
            found = await asyncio.to_thread(running_online, client, runtime, deployment_id)
            if not found:
                return {}
            command = ["python3", "-I", "-c", _READ_CAPTURES, str(2 * CAPTURE_MAX_BYTES)]
            _, output = await asyncio.to_thread(found[0].exec_run, command, stderr=False)
        return read_answers(bytes(output).splitlines(), since=since)
