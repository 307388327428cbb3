"""Streaming deployments on docker runtimes: one container per consumer instance.

The consumers must reach the broker; model code must reach no network. So a deployment
is one **scorer** container (``mlc.mode=stream-scorer``: the model server of the
snapshot's image, with no network, on a unix socket in the deployment's socket folder,
as online containers are) and one **consumer** container per instance, on the runtime's
``docker.network_mode``, which imports no model code: it reads the manifest to validate
records and sends each batch to the scorer over its socket (the folder mounted read-only;
see :class:`mlc.streaming.consumer.RemoteModel`). Both are hardened like every model
container. The consumer still runs from the model image, whose site-packages hold the
model's requirements beside the consumer's own (wheels from the package index, never the
package's code). Consumers carry the ``mlc.*`` labels plus ``mlc.instance`` and
``mlc.stream-config`` (a digest of the consumer configuration): a redeploy keeps running
containers whose labels still match and replaces the others, and the engine's restart
policy brings a crashed consumer or scorer back; a consumer resumes from the group's
committed offsets, and retries a batch its scorer did not answer.

The configuration travels in the ``MLC_STREAM_CONFIG`` environment variable, so a remote
engine needs no shared folder; TLS files named in the kafka settings are bind-mounted
read-only at the same path, so they must exist on the engine's host.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import docker.errors

from activities.runtimes.base import (
    Heartbeat,
    OnlineDeployRequest,
    RuntimeDriver,
    StreamingDeployRequest,
    StreamingDeployResult,
)
from activities.runtimes.docker.containers import (
    CONTAINER_SOCKET_DIR,
    SOCKET_NAME,
    container_name,
    container_options,
    log_tail,
    model_labels,
    model_network,
    run_model_container,
    socket_folder,
    socket_key,
    socket_options,
    wait_healthy,
)
from activities.runtimes.docker.engine import HEARTBEAT_SECONDS, connect, docker_settings
from activities.runtimes.docker.images import PACKAGE_DIR, consumer_command, ensure_image
from activities.runtimes.streams import (
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
from mlc.errors import DeploymentFailedError
from mlc.streaming.consumer import READY_LINE, STREAM_CONFIG_ENV
from mlc.streaming.settings import StreamConfig

MODE = "streaming"
SCORER_MODE = "stream-scorer"
"""``mlc.mode`` of a streaming deployment's model server container."""
_SCORED_BY = "socket"
"""``mlc.scored-by`` of consumers that score through the scorer (older ones loaded the model)."""


def stop_gracefully(container: Any) -> None:
    """SIGTERM, so the consumer commits and leaves its group; removed after the grace period."""
    with contextlib.suppress(docker.errors.NotFound):
        if container.status == "running":
            container.stop(timeout=int(STOP_TIMEOUT_SECONDS))
        container.remove(force=True)


async def stop_containers(containers: list[Any], *, leaving: bool = False) -> None:
    """Stop a deployment's consumer containers one at a time, letting the group settle in
    between (see :func:`activities.runtimes.streams.stop_in_turn`); ``leaving``: others
    of the deployment keep running."""
    by_config: dict[str, list[Any]] = {}
    for container in containers:
        by_config.setdefault(_env(container).get(STREAM_CONFIG_ENV, ""), []).append(container)
    for raw, group in by_config.items():
        stops = [_stopper(c) for c in group]
        if not raw:
            for stop in stops:
                await stop()
            continue
        await stop_in_turn(stops, StreamConfig.model_validate_json(raw), leaving=leaving)


def _stopper(container: Any) -> Stop:
    async def stop() -> None:
        await asyncio.to_thread(stop_gracefully, container)

    return stop


def _env(container: Any) -> dict[str, str]:
    pairs = (container.attrs.get("Config") or {}).get("Env") or []
    return dict(pair.partition("=")[::2] for pair in pairs)


async def deploy_docker(
    driver: RuntimeDriver, request: StreamingDeployRequest, heartbeat: Heartbeat
) -> StreamingDeployResult:
    """Start (or keep) one container per consumer instance and wait until each is ready.

    Raises:
        DeploymentFailedError: no kafka settings, the image could not be built, or a
            container exited or stayed silent at start (with its last log lines).
        RuntimeUnavailableError: the engine or the broker cannot be reached.
    """

    runtime, snapshot = request.runtime, request.snapshot
    kafka = kafka_of(runtime)
    config = stream_config(request)
    settings = docker_settings(runtime)
    heartbeat(f"preparing topics on {kafka.bootstrap_servers}")
    await prepare_topics(kafka, config, dict(os.environ))
    digest = hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]
    async with connect(runtime, f"deploy {snapshot.ref} (streaming)") as client:
        found = await asyncio.to_thread(
            client.containers.list,
            ignore_removed=True,
            all=True,
            filters={"label": [f"mlc.deployment-id={request.deployment_id}", f"mlc.mode={MODE}"]},
        )
        running: dict[int, Any] = {}
        stale: list[Any] = []
        for container in found:
            labels = container.labels
            index = int(labels.get("mlc.instance", "-1"))
            if (
                container.status == "running"
                and labels.get("mlc.sha256") == snapshot.sha256
                and labels.get("mlc.stream-config") == digest
                and labels.get("mlc.scored-by") == _SCORED_BY
                and 0 <= index < kafka.instances
                and index not in running
            ):
                running[index] = container
            else:
                stale.append(container)
        await stop_containers(stale, leaving=bool(running))
        missing = [i for i in range(kafka.instances) if i not in running]
        scorer = await _running_scorer(client, request)
        image_tag = None
        if missing or scorer is None:
            image = await ensure_image(
                client,
                settings=driver.settings,
                runtime=runtime,
                snapshot=snapshot,
                heartbeat=heartbeat,
                log_path=driver.workdir(runtime, request.deployment_id) / "build.log",
            )
            image_tag = image.tag
        folder = await asyncio.to_thread(
            socket_folder, driver.settings, runtime, socket_key(request.deployment_id)
        )
        if scorer is None:
            await _start_scorer(driver, client, request, image.id, folder, heartbeat)
        if missing:
            identity = container_options(settings, snapshot)["environment"]
            environment = {**identity, STREAM_CONFIG_ENV: config.model_dump_json()}
            if kafka.sasl_password_env and kafka.sasl_password_env in os.environ:
                environment[kafka.sasl_password_env] = os.environ[kafka.sasl_password_env]
            volumes = {
                path: {"bind": path, "mode": "ro"}
                for path in (kafka.ssl_ca_location, kafka.ssl_certificate_location, kafka.ssl_key_location)
                if path
            }
            volumes[str(folder)] = {"bind": CONTAINER_SOCKET_DIR, "mode": "ro"}  # the scorer's socket
            labels = {
                **model_labels(
                    deployment_id=request.deployment_id,
                    runtime=runtime,
                    snapshot=snapshot,
                    stage=request.stage,
                    mode=MODE,
                ),
                "mlc.stream-config": digest,
                "mlc.scored-by": _SCORED_BY,
            }
            for index in missing:
                name = container_name(request.deployment_id, suffix=f"-stream-{index}")
                with contextlib.suppress(docker.errors.NotFound):  # a stopped leftover of the same name
                    await asyncio.to_thread(
                        stop_gracefully, await asyncio.to_thread(client.containers.get, name)
                    )
                running[index] = await asyncio.to_thread(
                    run_model_container,
                    client,
                    image.id,
                    consumer_command(
                        "consume",
                        "--package",
                        PACKAGE_DIR,
                        "--score-socket",
                        f"{CONTAINER_SOCKET_DIR}/{SOCKET_NAME}",
                    ),
                    name=name,
                    labels={**labels, "mlc.instance": str(index)},
                    settings=settings,
                    snapshot=snapshot,
                    network_mode=settings.network_mode,
                    environment=environment,
                    volumes=volumes,
                )
            for index in missing:
                await _wait_ready(running[index], request, index, heartbeat, log_tail)
        containers = [running[i] for i in sorted(running)]
        return StreamingDeployResult(
            endpoint=endpoint_of(config),
            details=result_details(
                config,
                container_ids=[c.id for c in containers],
                container_names=[c.name for c in containers],
                image=image_tag or containers[0].attrs["Config"]["Image"],
                reused=not missing,
            ),
        )


async def _running_scorer(client: Any, request: StreamingDeployRequest) -> Any:
    """The deployment's running scorer of this snapshot on the network its runtime allows
    (none by default); others are removed."""

    found = await asyncio.to_thread(
        client.containers.list,
        ignore_removed=True,
        all=True,
        filters={"label": [f"mlc.deployment-id={request.deployment_id}", f"mlc.mode={SCORER_MODE}"]},
    )
    keep = None
    for container in found:
        labels = container.labels
        if (
            keep is None
            and container.status == "running"
            and labels.get("mlc.sha256") == request.snapshot.sha256
            and labels.get("mlc.network") == model_network(request.runtime)
        ):
            keep = container
        else:
            await asyncio.to_thread(container.remove, force=True)
    return keep


async def _start_scorer(
    driver: RuntimeDriver,
    client: Any,
    request: StreamingDeployRequest,
    image_id: str,
    folder: Path,
    heartbeat: Heartbeat,
) -> None:
    """Start the deployment's model server on ``folder``'s socket, on the network its runtime
    allows (none by default); return once it answers ``/health`` (removed, with its log,
    when it does not)."""

    runtime, snapshot = request.runtime, request.snapshot
    settings = docker_settings(runtime)
    name = container_name(request.deployment_id, suffix="-stream-scorer")
    with contextlib.suppress(docker.errors.NotFound):  # a stopped leftover of the same name
        await asyncio.to_thread((await asyncio.to_thread(client.containers.get, name)).remove, force=True)
    labels = model_labels(
        deployment_id=request.deployment_id,
        runtime=runtime,
        snapshot=snapshot,
        stage=request.stage,
        mode=SCORER_MODE,
    )
    uds, options, socket_labels = socket_options(folder, runtime)  # no network, unless outbound
    container = await asyncio.to_thread(
        run_model_container,
        client,
        image_id,
        ["python3", "-m", "mlc.serving", "serve", "--package", PACKAGE_DIR, *uds],
        name=name,
        labels={**labels, **socket_labels},
        settings=settings,
        snapshot=snapshot,
        **options,
    )
    online = OnlineDeployRequest(
        deployment_id=request.deployment_id, snapshot=snapshot, runtime=runtime, stage=request.stage
    )
    await wait_healthy(container, socket_labels["mlc.endpoint"], online, heartbeat)


async def _wait_ready(
    container: Any, request: StreamingDeployRequest, index: int, heartbeat: Heartbeat, tail: Any
) -> None:
    """Wait for the consumer's ready line; remove the container and raise if it exits or hangs."""
    what = (
        f"streaming consumer {index} of {request.snapshot.ref} in {request.stage} on runtime "
        f"{request.runtime.name} (container {container.name})"
    )
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    next_beat = 0.0
    restarts = int(container.attrs.get("RestartCount", 0))
    while True:
        await asyncio.to_thread(container.reload)
        logs = bytes(await asyncio.to_thread(container.logs, stdout=True, stderr=False)).decode(
            errors="replace"
        )
        if READY_LINE in logs:
            return
        state = container.attrs["State"]
        failed = state["Status"] != "running" or int(container.attrs.get("RestartCount", 0)) > restarts
        if failed or time.monotonic() > deadline:
            why = (
                f"exited with code {state.get('ExitCode')} during start"
                if failed
                else f"was not ready within {READY_TIMEOUT_SECONDS:.0f} s"
            )
            last = await asyncio.to_thread(tail, container)
            await asyncio.to_thread(container.remove, force=True)
            raise DeploymentFailedError(f"{what} {why}; container removed. Last log lines:\n{last}")
        if time.monotonic() >= next_beat:
            heartbeat(f"waiting for {what}")
            next_beat = time.monotonic() + HEARTBEAT_SECONDS
        await asyncio.sleep(0.25)
