"""A docker runtime's shared host container: online deployments copied into one ``serve-many`` server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import tarfile
import time
from typing import Any

import docker.errors
import httpx

from activities.runtimes.base import (
    Heartbeat,
    OnlineDeployRequest,
    OnlineDeployResult,
    RuntimeDriver,
)
from activities.runtimes.docker.containers import (
    HEALTH_POLL_SECONDS,
    HOST_MODE,
    HOST_MODELS_DIR,
    HOST_SOCKET_KEY,
    ask_endpoint,
    container_name,
    drop_socket_folder,
    endpoint_of,
    error_of,
    fail,
    log_tail,
    model_network,
    remove,
    run_model_container,
    socket_folder,
    socket_options,
)
from activities.runtimes.docker.engine import docker_settings
from activities.runtimes.docker.images import ensure_image
from mlc.artifacts import ArtifactStore
from mlc.domain import Runtime
from mlc.errors import DeploymentFailedError
from mlc.serving.multi import MEMORY_BUDGET_ENV


async def deploy_hosted(
    driver: RuntimeDriver, client: Any, request: OnlineDeployRequest, heartbeat: Heartbeat
) -> OnlineDeployResult | None:
    """Copy the package into the runtime's host container (started when needed) and
    wait for its ``/models/<id>/health``; None when the host refuses it (409)."""
    host = await _host(driver, client, request, heartbeat)
    base = await asyncio.to_thread(endpoint_of, host)
    endpoint = f"{base}/models/{request.deployment_id}"
    archive = await asyncio.to_thread(_archive, driver, request)
    await asyncio.to_thread(remove_hosted, host, request.deployment_id)
    if not await asyncio.to_thread(host.put_archive, HOST_MODELS_DIR, archive):
        raise DeploymentFailedError(f"could not copy {request.snapshot.ref} into {host.name}")
    settings = docker_settings(request.runtime)
    deadline = time.monotonic() + settings.health_timeout_seconds
    problem = None
    while problem is None:
        with contextlib.suppress(httpx.HTTPError):
            response = await ask_endpoint(
                request.runtime, endpoint, "/health", timeout=settings.health_timeout_seconds
            )
            if response.status_code == 200:
                details = {"container_id": host.id, "container_name": host.name, "host": True}
                return OnlineDeployResult(endpoint=endpoint, details=details)
            if response.status_code == 409:
                await asyncio.to_thread(remove_hosted, host, request.deployment_id)
                return None
            problem = (
                "is not in the host container (its copy is gone)"
                if response.status_code == 404
                else f"could not be loaded: {error_of(response)}"
            )
        if time.monotonic() > deadline:
            problem = f"did not answer {endpoint}/health within {settings.health_timeout_seconds:.0f} s"
        await asyncio.sleep(HEALTH_POLL_SECONDS)
    await asyncio.to_thread(remove_hosted, host, request.deployment_id)
    tail = await asyncio.to_thread(log_tail, host)
    raise DeploymentFailedError(
        f"{request.snapshot.ref} in {request.stage} on runtime {request.runtime.name} (deployment "
        f"{request.deployment_id}, host container {host.name}) {problem}; last log lines:\n{tail}"
    )


def _archive(driver: RuntimeDriver, request: OnlineDeployRequest) -> bytes:
    """A tar of ``<id>/`` (the unpacked package) and ``<id>.json`` (its identity), readable by all."""
    workdir = driver.workdir(request.runtime, request.deployment_id)
    package = ArtifactStore(driver.settings.artifact_dir).unpack(request.snapshot.sha256, workdir / "package")
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


async def _host(
    driver: RuntimeDriver, client: Any, request: OnlineDeployRequest, heartbeat: Heartbeat
) -> Any:
    """The runtime's running host container: found, started again, or created from the
    image of ``request``'s snapshot; returns once its ``/health`` answers."""
    runtime = request.runtime
    settings = docker_settings(runtime)
    name = host_container_name(runtime)
    found = await asyncio.to_thread(host_containers, client, runtime)
    wanted = model_network(runtime)
    for stale in [h for h in found if h.labels.get("mlc.network") != wanted]:
        await asyncio.to_thread(remove_host, client, stale)  # another network, or a TCP port
    host = next((h for h in found if h.labels.get("mlc.network") == wanted), None)
    if host is not None and host.status != "running":
        await asyncio.to_thread(host.start)
        await asyncio.to_thread(host.reload)
    if host is None:
        image = await ensure_image(
            client,
            settings=driver.settings,
            runtime=runtime,
            snapshot=request.snapshot,
            heartbeat=heartbeat,
            log_path=driver.workdir(runtime, request.deployment_id) / "build.log",
        )
        labels = {
            "mlc.runtime": runtime.name,
            "mlc.mode": HOST_MODE,
            "mlc.image-of": request.snapshot.sha256,
        }
        folder = await asyncio.to_thread(socket_folder, driver.settings, runtime, HOST_SOCKET_KEY)
        uds, options, socket_labels = socket_options(folder, runtime)
        labels.update(socket_labels)
        options["volumes"][name] = {"bind": HOST_MODELS_DIR, "mode": "rw"}
        command = ["python3", "-m", "mlc.serving", "serve-many", "--models-dir", HOST_MODELS_DIR, *uds]
        budget = {
            MEMORY_BUDGET_ENV: str(int(megabytes(settings.memory) * 0.8))
        }  # evict before the OOM killer
        try:
            host = await asyncio.to_thread(
                run_model_container,
                client,
                image.id,
                command,
                name=name,
                labels=labels,
                settings=settings,
                snapshot=request.snapshot,
                environment=budget,
                **options,
            )
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
            host = await asyncio.to_thread(client.containers.get, name)
    assert host is not None
    endpoint = await asyncio.to_thread(endpoint_of, host)
    deadline = time.monotonic() + settings.health_timeout_seconds
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if (await ask_endpoint(runtime, endpoint, "/health", timeout=2.0)).status_code == 200:
                return host
        if time.monotonic() > deadline:
            await fail(host, f"the model host {host.name} of runtime {runtime.name} did not start")
        heartbeat(f"waiting for the model host {host.name}")
        await asyncio.sleep(HEALTH_POLL_SECONDS)


async def running_host(client: Any, runtime: Runtime) -> tuple[Any, str, list[str]] | None:
    """The runtime's running host container, its endpoint and the ids it hosts."""
    found = await asyncio.to_thread(host_containers, client, runtime)
    if not found or found[0].status != "running":
        return None
    host = found[0]
    endpoint = await asyncio.to_thread(endpoint_of, host)
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        listed = (await ask_endpoint(runtime, endpoint, "/models", timeout=5.0)).json()["models"]
        return host, endpoint, [str(i) for i in listed]
    return None


async def unhost(
    driver: RuntimeDriver, client: Any, runtime: Runtime, *, keep: set[str] | None, only: str | None
) -> list[str]:
    """Take ``only`` (or every id not in ``keep``) out of the runtime's host; remove the
    host and its volume when it hosts nothing any more. Returns the ids taken out."""
    hosted = await running_host(client, runtime)
    if hosted is None:
        found = await asyncio.to_thread(host_containers, client, runtime)
        if found and keep is not None and only is None and not keep:  # down and nothing kept: it goes
            for host in found:
                await asyncio.to_thread(remove_host, client, host)
        return []
    host, _, ids = hosted
    gone = [i for i in ids if (i == only if only is not None else i not in (keep or set()))]
    for deployment_id in gone:
        await asyncio.to_thread(remove_hosted, host, deployment_id)
    if not set(ids) - set(gone):
        await asyncio.to_thread(remove_host, client, host)
        await asyncio.to_thread(drop_socket_folder, driver.settings, runtime, HOST_SOCKET_KEY)
    return gone


def remove_hosted(host: Any, deployment_id: str) -> None:
    """Take the deployment's package out of the host container (gone already is fine)."""
    paths = [f"{HOST_MODELS_DIR}/{deployment_id}", f"{HOST_MODELS_DIR}/{deployment_id}.json"]
    with contextlib.suppress(docker.errors.APIError):
        host.exec_run(["rm", "-rf", "--", *paths], user="0:0")


def host_containers(client: Any, runtime: Runtime) -> list[Any]:
    """The runtime's host containers, running ones first."""
    found = client.containers.list(
        ignore_removed=True,
        all=True,
        filters={"label": [f"mlc.runtime={runtime.name}", f"mlc.mode={HOST_MODE}"]},
    )
    return sorted(found, key=lambda c: c.status != "running")


def host_container_name(runtime: Runtime) -> str:
    """The name of the runtime's shared host container (and of its models volume)."""
    return container_name(runtime.name, suffix="-model-host")


def remove_host(client: Any, host: Any) -> None:
    """Force-remove a host container and its models volume."""
    remove(host)
    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        client.volumes.get(host.name).remove(force=True)


def megabytes(limit: str) -> float:
    """A docker memory limit (``512m``, ``1g``, bytes) in MB."""
    text = limit.strip().lower().removesuffix("b")
    units = {"k": 1 / 1024, "m": 1.0, "g": 1024.0, "t": 1024.0**2}
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text) / 2**20
