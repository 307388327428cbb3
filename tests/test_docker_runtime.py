"""DockerDriver against a real Docker engine and the local base image.

Needs dockerd and ``mlc-python:3.11-bookworm`` (``scripts/docker-engine.sh`` provides
both). Without them the module is skipped locally, but fails under ``CI=true``: a CI run
that silently skipped the container tests would prove nothing.
"""

from __future__ import annotations

import asyncio
import json
import socket
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import httpx
import pytest
from pydantic import ValidationError
from temporalio.testing import WorkflowEnvironment

from activities.runtimes.base import (
    BatchJobRequest,
    CleanupRequest,
    OnlineDeployRequest,
    ProbeRequest,
    UndeployRequest,
)
from activities.runtimes.docker import spares
from activities.runtimes.docker.containers import SOCKET_NAME, SPARE_PREFIX, container_name, sockets_root
from activities.runtimes.docker.driver import DockerDriver
from activities.runtimes.docker.images import manylinux_platforms
from activities.runtimes.registry import remove_gateway as remove_gateway
from cli.examples import prepare_example_model
from mlc import endpoints, evaluation
from mlc.artifacts import ArtifactStore, build_archive
from mlc.config import Settings
from mlc.domain import (
    DockerSettings,
    HostingMode,
    ModelNetwork,
    ModelSnapshot,
    Runtime,
    RuntimeKind,
    TrafficRoute,
)
from mlc.errors import DeploymentFailedError, RuntimeUnavailableError
from mlc.manifest import load_manifest
from tests.conftest import call_model, gateway_settings

BASE_IMAGE = "mlc-python:3.11-bookworm"
CRASH_MODEL = Path(__file__).parent / "fixtures" / "models" / "crash-model"
CC_FRAUD_SAMPLE = {
    "amount": 2450.0,
    "hour": 3,
    "merchant_risk": 0.85,
    "distance_from_home": 4200.0,
    "foreign": True,
    "card_present": False,
    "velocity_24h": 9,
}


@pytest.fixture(scope="module")
def engine(docker_engine: Any) -> Any:
    """The shared engine client (conftest fails under CI=true when there is none)."""
    return docker_engine


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """One MLC_HOME for the module: the wheelhouse is downloaded once."""
    return Settings.from_env(home=tmp_path_factory.mktemp("mlc-home"))


def _runtime(name: str, **docker_options: Any) -> Runtime:
    return Runtime(
        name=name,
        kind=RuntimeKind.DOCKER,
        stage="DEV",
        docker=DockerSettings(base_image=BASE_IMAGE, network_mode="host", **docker_options),
    )


@pytest.fixture(scope="module")
def runtime(engine: Any) -> Iterator[Runtime]:
    """A runtime with a name unique to this run, whose containers are all removed at the end."""
    rt = _runtime(f"docker-test-{uuid.uuid4().hex[:8]}", memory="512m")
    yield rt
    for container in engine.containers.list(all=True, filters={"label": f"mlc.runtime={rt.name}"}):
        container.remove(force=True)


def _snapshot(settings: Settings, package: Path) -> ModelSnapshot:
    manifest = load_manifest(package)
    sha = ArtifactStore(settings.artifact_dir).put(build_archive(package))
    return ModelSnapshot(
        model=manifest.name,
        version=1,
        sha256=sha,
        service_tags=manifest.service_tags,
        entry_module=manifest.entry_module,
        requirements=manifest.requirements,
    )


@pytest.fixture(scope="module")
def cc_fraud(settings: Settings) -> ModelSnapshot:
    """The trained cc-fraud example, registered in the module's artifact store."""
    return _snapshot(settings, prepare_example_model())


@pytest.fixture
def notes() -> list[str]:
    """Heartbeat notes of one test."""
    return []


def _containers(engine: Any, deployment_id: str) -> list[Any]:
    return engine.containers.list(all=True, filters={"label": f"mlc.deployment-id={deployment_id}"})


async def test_online_deploy_scores_in_a_hardened_container(
    engine: Any, settings: Settings, runtime: Runtime, cc_fraud: ModelSnapshot, notes: list[str]
) -> None:
    driver = DockerDriver(settings)
    deployment_id = f"cc-fraud-1-dev-{uuid.uuid4().hex[:6]}"
    request = OnlineDeployRequest(
        deployment_id=deployment_id, snapshot=cc_fraud, runtime=runtime, stage="DEV"
    )

    result = await driver.deploy_online(request, notes.append)

    assert notes, "deploy sent no heartbeat"
    response = await call_model(result.endpoint, "/score", json=CC_FRAUD_SAMPLE)
    assert response.status_code == 200, response.text
    assert response.json()["is_fraud"] == 1
    container = engine.containers.get(result.details["container_id"])
    host_config = container.attrs["HostConfig"]
    assert host_config["ReadonlyRootfs"] is True
    assert host_config["Memory"] == 512 * 1024**2
    assert host_config["NanoCpus"] == 1_000_000_000
    assert host_config["NetworkMode"] == "none", "model containers have no network"
    own = endpoints.parse(result.endpoint).socket
    assert own is not None, f"not a socket endpoint: {result.endpoint}"
    folder = own.parent
    assert folder.is_relative_to(settings.runtime_dir)
    info = folder.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (65534, 65534, 0o700)
    assert container.attrs["Config"]["User"] == "65534:65534"
    assert container.exec_run(["python3", "-c", "import os; print(os.getuid())"]).output == b"65534\n"
    assert container.labels["mlc.deployment-id"] == deployment_id
    assert container.labels["mlc.runtime"] == runtime.name
    assert container.labels["mlc.model"] == "cc-fraud"
    assert container.labels["mlc.version"] == "1"
    assert container.labels["mlc.stage"] == "DEV"
    assert container.labels["mlc.mode"] == "online"
    assert container.labels["mlc.endpoint"] == result.endpoint
    image = engine.images.get(result.details["image_id"])
    assert image.labels["mlc.sha256"] == cc_fraud.sha256
    assert image.labels["mlc.base-image"] == BASE_IMAGE

    again = await driver.deploy_online(request, notes.append)

    assert again.endpoint == result.endpoint
    assert again.details["container_id"] == result.details["container_id"]
    assert again.details["reused"] is True
    assert [c.id for c in _containers(engine, deployment_id)] == [container.id]

    await driver.undeploy(UndeployRequest(deployment_id=deployment_id, runtime=runtime))
    await driver.undeploy(UndeployRequest(deployment_id=deployment_id, runtime=runtime))
    assert _containers(engine, deployment_id) == []
    assert not folder.exists(), "undeploy leaves the socket folder behind"


async def test_captures_a_model_plants_as_links_are_skipped_and_reading_is_bounded(
    engine: Any, settings: Settings, runtime: Runtime, cc_fraud: ModelSnapshot, notes: list[str]
) -> None:
    driver = DockerDriver(settings)
    deployment_id = f"cc-fraud-1-dev-{uuid.uuid4().hex[:6]}"
    request = OnlineDeployRequest(
        deployment_id=deployment_id, snapshot=cc_fraud, runtime=runtime, stage="DEV"
    )
    result = await driver.deploy_online(request, notes.append)
    container = engine.containers.get(result.details["container_id"])
    try:
        # as the model (the container's user, who owns /tmp): one real answer, a link to a file
        # of forged answers, then a link to /dev/zero
        plant = (
            'echo \'{"t": 9, "id": "kept", "out": 1}\' > /tmp/mlc-capture.jsonl.1 && '
            'echo \'{"t": 9, "id": "linked", "out": 2}\' > /tmp/forged.jsonl && '
            "ln -s /tmp/forged.jsonl /tmp/mlc-capture.jsonl"
        )
        assert container.exec_run(["sh", "-c", plant]).exit_code == 0
        assert await driver.read_captures(runtime, deployment_id, since=1.0) == {"kept": 1}
        swap = "rm /tmp/mlc-capture.jsonl && ln -s /dev/zero /tmp/mlc-capture.jsonl"
        assert container.exec_run(["sh", "-c", swap]).exit_code == 0
        read = driver.read_captures(runtime, deployment_id, since=1.0)
        assert await asyncio.wait_for(read, timeout=60) == {"kept": 1}
    finally:
        await driver.undeploy(UndeployRequest(deployment_id=deployment_id, runtime=runtime))


async def test_outbound_models_join_the_runtime_network_and_serve_on_their_socket(
    engine: Any, settings: Settings, cc_fraud: ModelSnapshot, notes: list[str]
) -> None:
    network = engine.networks.create(f"mlc-test-{uuid.uuid4().hex[:8]}")
    runtime = Runtime(
        name=f"docker-net-{uuid.uuid4().hex[:8]}",
        kind=RuntimeKind.DOCKER,
        stage="DEV",
        model_network=ModelNetwork.OUTBOUND,
        docker=DockerSettings(base_image=BASE_IMAGE, network_mode=network.name),
    )
    driver = DockerDriver(settings)
    request = OnlineDeployRequest(
        deployment_id="cc-fraud-net", snapshot=cc_fraud, runtime=runtime, stage="DEV"
    )
    try:
        result = await driver.deploy_online(request, notes.append)
        again = await driver.deploy_online(request, notes.append)

        assert result.endpoint.startswith("unix:")
        assert again.endpoint == result.endpoint and again.details["reused"] is True
        container = engine.containers.get(result.details["container_id"])
        assert container.attrs["HostConfig"]["NetworkMode"] == network.name
        assert not container.attrs["NetworkSettings"]["Ports"], "nothing published"
        response = await call_model(result.endpoint, "/score", json=CC_FRAUD_SAMPLE)
        assert response.status_code == 200, response.text
        with socket.create_server(("127.0.0.1", 0)) as host_server:  # on the host's loopback only
            port = host_server.getsockname()[1]
            targets = {"ports": [port], "sockets": []}
            code, output = container.exec_run(["python3", "-c", _REACH, json.dumps(targets)])
        assert code == 0, output
        assert json.loads(output)[f"tcp {port}"] == "ConnectionRefusedError"
    finally:
        await driver.undeploy(UndeployRequest(deployment_id="cc-fraud-net", runtime=runtime))
        await driver.cleanup(CleanupRequest(runtime=runtime))  # its warm spare is on the network too
        network.remove()


async def test_batch_job_writes_output_and_leaves_no_container(
    engine: Any, settings: Settings, runtime: Runtime, cc_fraud: ModelSnapshot, notes: list[str]
) -> None:
    driver = DockerDriver(settings)
    deployment_id = f"cc-fraud-1-batch-{uuid.uuid4().hex[:6]}"
    package = ArtifactStore(settings.artifact_dir).unpack(
        cc_fraud.sha256, settings.home / "expected" / cc_fraud.sha256
    )
    expected = len(evaluation.test_dataset(load_manifest(package), package))

    result = await driver.run_batch(
        BatchJobRequest(deployment_id=deployment_id, snapshot=cc_fraud, runtime=runtime, stage="DEV"),
        notes.append,
    )

    output = Path(result.output_path)
    assert output.parent == driver.workdir(runtime, deployment_id)
    assert len(output.read_bytes().splitlines()) == expected
    assert result.records == expected
    assert result.seconds > 0
    assert _containers(engine, deployment_id) == []


async def test_crashing_model_fails_with_log_tail_and_is_removed(
    engine: Any, settings: Settings, runtime: Runtime, notes: list[str]
) -> None:
    driver = DockerDriver(settings)
    deployment_id = f"crash-model-1-dev-{uuid.uuid4().hex[:6]}"
    request = OnlineDeployRequest(
        deployment_id=deployment_id,
        snapshot=_snapshot(settings, CRASH_MODEL),
        runtime=runtime,
        stage="DEV",
    )

    with pytest.raises(DeploymentFailedError) as failure:
        await driver.deploy_online(request, notes.append)

    message = str(failure.value)
    assert "crash-model@1" in message
    assert "init() fails on purpose" in message  # from the container's log
    assert _containers(engine, deployment_id) == []


async def test_cleanup_removes_orphans_and_keeps_kept(
    engine: Any, settings: Settings, cc_fraud: ModelSnapshot, notes: list[str]
) -> None:
    runtime = _runtime(f"docker-cleanup-{uuid.uuid4().hex[:8]}")
    driver = DockerDriver(settings)
    kept, orphan = (f"cc-fraud-1-{name}-{uuid.uuid4().hex[:6]}" for name in ("kept", "orphan"))
    try:
        for deployment_id in (kept, orphan):
            await driver.deploy_online(
                OnlineDeployRequest(
                    deployment_id=deployment_id, snapshot=cc_fraud, runtime=runtime, stage="DEV"
                ),
                notes.append,
            )

        first = await driver.cleanup(CleanupRequest(runtime=runtime, keep=(kept,)))

        assert first.removed == (orphan,)
        assert _containers(engine, orphan) == []
        assert [c.status for c in _containers(engine, kept)] == ["running"]

        second = await driver.cleanup(CleanupRequest(runtime=runtime, keep=()))

        assert second.removed == (kept,)
        assert _containers(engine, kept) == []
    finally:
        for container in engine.containers.list(all=True, filters={"label": f"mlc.runtime={runtime.name}"}):
            container.remove(force=True)


async def test_missing_base_image_says_how_to_get_one(
    engine: Any, settings: Settings, cc_fraud: ModelSnapshot, notes: list[str]
) -> None:
    runtime = Runtime(
        name="docker-no-base",
        kind=RuntimeKind.DOCKER,
        stage="DEV",
        docker=DockerSettings(base_image="mlc-test/no-such-image:0"),
    )
    request = OnlineDeployRequest(deployment_id="no-base", snapshot=cc_fraud, runtime=runtime, stage="DEV")

    with pytest.raises(DeploymentFailedError, match="scripts/docker-engine.sh") as failure:
        await DockerDriver(settings).deploy_online(request, notes.append)

    assert "mlc-test/no-such-image:0" in str(failure.value)
    assert _containers(engine, "no-base") == []


async def test_unreachable_engine_is_retryable_and_named(tmp_path: Path, notes: list[str]) -> None:
    url = f"unix://{tmp_path}/no-engine.sock"
    runtime = Runtime(
        name="docker-away", kind=RuntimeKind.DOCKER, stage="DEV", docker=DockerSettings(base_url=url)
    )

    with pytest.raises(RuntimeUnavailableError) as failure:
        await DockerDriver(Settings.from_env(home=tmp_path)).undeploy(
            UndeployRequest(deployment_id="anything", runtime=runtime)
        )

    assert failure.value.retryable
    assert "docker-away" in str(failure.value) and url in str(failure.value)


def test_wheel_platforms_cover_older_glibc_and_legacy_tags() -> None:
    platforms = manylinux_platforms("2.36", "x86_64")

    assert platforms[0] == "manylinux_2_36_x86_64"  # most specific first
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(platforms)


def test_container_names_are_valid_and_keep_ids_apart() -> None:
    assert container_name("cc-fraud-1-dev") == "mlc-cc-fraud-1-dev"
    odd = container_name("cc-fraud@1/DEV")
    assert odd.startswith("mlc-cc-fraud-1-DEV-")
    assert odd != container_name("cc-fraud@1:DEV")


async def test_a_shared_runtime_hosts_its_deployments_in_one_container(
    engine: Any, settings: Settings, cc_fraud: ModelSnapshot
) -> None:
    runtime = _runtime(f"docker-shared-{uuid.uuid4().hex[:8]}", memory="512m").model_copy(
        update={"hosting": HostingMode.SHARED, "gateway": gateway_settings()}
    )
    driver = DockerDriver(settings)
    ids = [f"cc-fraud-1-dev-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    try:
        results = [
            await driver.deploy_online(
                OnlineDeployRequest(deployment_id=i, snapshot=cc_fraud, runtime=runtime, stage="DEV"),
                lambda note: None,
            )
            for i in ids
        ]
        hosts = engine.containers.list(filters={"label": [f"mlc.runtime={runtime.name}", "mlc.mode=host"]})
        assert len(hosts) == 1 and all(r.details["container_id"] == hosts[0].id for r in results)
        assert [r.endpoint.rsplit("/", 2)[1:] for r in results] == [["models", i] for i in ids]
        assert _containers(engine, ids[0]) == [], "no container of its own"
        assert hosts[0].attrs["HostConfig"]["NetworkMode"] == "none"
        scored = await call_model(results[0].endpoint, "/score", json=CC_FRAUD_SAMPLE)
        health = (await call_model(results[1].endpoint, "/health")).json()
        assert scored.status_code == 200, scored.text
        assert (health["version"], health["sha256"]) == ("1", cc_fraud.sha256)
        assert await driver.locate(runtime, ids[1]) == results[1].endpoint
        assert (await driver.probe(ProbeRequest(deployment_id=ids[0], runtime=runtime))).healthy
        # the gateway container reaches the host container's socket too
        routed = await driver.route(
            runtime, "cc-fraud", (TrafficRoute(deployment_id=ids[0], version=1),), lambda note: None
        )
        async with httpx.AsyncClient(trust_env=False) as http:
            stable = await http.post(f"{routed.endpoint}/score", json=CC_FRAUD_SAMPLE)
        assert stable.status_code == 200 and stable.json()["is_fraud"] == 1, stable.text

        await driver.undeploy(UndeployRequest(deployment_id=ids[0], runtime=runtime))
        assert not (await driver.probe(ProbeRequest(deployment_id=ids[0], runtime=runtime))).healthy
        assert (await driver.probe(ProbeRequest(deployment_id=ids[1], runtime=runtime))).healthy
        await driver.undeploy(UndeployRequest(deployment_id=ids[1], runtime=runtime))
        assert engine.containers.list(all=True, filters={"label": f"mlc.runtime={runtime.name}"}) == []
    finally:
        await driver.cleanup(CleanupRequest(runtime=runtime))
        await remove_gateway(settings, runtime)


def test_a_runtime_with_outbound_models_on_the_host_network_is_not_registered() -> None:
    with pytest.raises(ValidationError, match="this host's loopback"):
        Runtime(
            name="docker-out",
            kind=RuntimeKind.DOCKER,
            stage="DEV",
            model_network=ModelNetwork.OUTBOUND,
            docker=DockerSettings(network_mode="host"),
        )


_REACH = """
import json, os, socket, sys
targets = json.loads(sys.argv[1])
found = {}
for port in targets["ports"]:
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
            found[f"tcp {port}"] = "connected"
        except OSError as exc:
            found[f"tcp {port}"] = type(exc).__name__
for path in targets["sockets"]:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
            found[path] = "connected"
        except OSError as exc:
            found[path] = type(exc).__name__
found["run"] = sorted(os.listdir("/run/mlc"))
print(json.dumps(found))
"""
"""Run inside a model container: TCP to the host's loopback ports, and other models' sockets."""


async def test_a_model_container_reaches_neither_the_host_loopback_nor_another_model(
    engine: Any,
    settings: Settings,
    runtime: Runtime,
    cc_fraud: ModelSnapshot,
    temporal_env: WorkflowEnvironment,
) -> None:
    driver = DockerDriver(settings)
    ids = [f"cc-fraud-1-dev-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    host_server = socket.create_server(("127.0.0.1", 0))  # stands for PostgreSQL, a model's port...
    temporal_port = int(temporal_env.client.service_client.config.target_host.rpartition(":")[2])
    try:
        results = [
            await driver.deploy_online(
                OnlineDeployRequest(deployment_id=i, snapshot=cc_fraud, runtime=runtime, stage="DEV"),
                lambda note: None,
            )
            for i in ids
        ]
        other = endpoints.parse(results[1].endpoint).socket
        assert other is not None
        with socket.socket() as probe:  # the worker's side does reach the same ports
            probe.connect(("127.0.0.1", temporal_port))
        targets = {
            "ports": [temporal_port, host_server.getsockname()[1]],
            "sockets": [str(other), f"/run/mlc-models/{other.parent.name}/{SOCKET_NAME}"],
        }
        container = engine.containers.get(results[0].details["container_id"])
        code, output = container.exec_run(["python3", "-c", _REACH, json.dumps(targets)])
        assert code == 0, output
        found = json.loads(output)

        assert found.pop("run") == ["model.sock"], "a model sees its own socket folder only"
        assert not [k for k, v in found.items() if v == "connected"], found
        assert found[f"tcp {temporal_port}"] in ("ConnectionRefusedError", "OSError"), found
        for result in results:  # while both still answer the worker
            assert (await call_model(result.endpoint, "/health")).status_code == 200

        # the model points its socket at the other model's: the worker does not follow
        swap = f"rm /run/mlc/{SOCKET_NAME} && ln -s {other} /run/mlc/{SOCKET_NAME}"
        code, output = container.exec_run(["sh", "-c", swap])
        assert code == 0, output
        probe = await driver.probe(ProbeRequest(deployment_id=ids[0], runtime=runtime))
        assert not probe.healthy and "ConnectError" in probe.detail, probe
        with pytest.raises(DeploymentFailedError, match="refusing to send it traffic"):
            await driver.locate(runtime, ids[0])  # so the gateway is never pointed at it either
    finally:
        host_server.close()
        for i in ids:
            await driver.undeploy(UndeployRequest(deployment_id=i, runtime=runtime))


def _spares(engine: Any, runtime: Runtime) -> list[Any]:
    """The runtime's unclaimed spare containers."""
    found = engine.containers.list(
        all=True, filters={"label": [f"mlc.runtime={runtime.name}", "mlc.mode=spare"]}
    )
    return [c for c in found if c.name.startswith(SPARE_PREFIX)]


async def test_a_snapshots_spare_goes_with_its_last_deployment(
    engine: Any, settings: Settings, cc_fraud: ModelSnapshot, notes: list[str]
) -> None:
    """A spare keeps a serving snapshot's next container warm; once nothing of the snapshot
    serves on the runtime (undeployed, rejected, retired), its model code stops running."""
    runtime = _runtime(f"docker-spare-{uuid.uuid4().hex[:8]}", memory="512m")
    driver = DockerDriver(settings)
    first, second = (f"cc-fraud-1-{n}-{uuid.uuid4().hex[:6]}" for n in ("a", "b"))

    def request(deployment_id: str) -> OnlineDeployRequest:
        return OnlineDeployRequest(
            deployment_id=deployment_id, snapshot=cc_fraud, runtime=runtime, stage="DEV"
        )

    try:
        await driver.deploy_online(request(first), notes.append)
        await driver.deploy_online(request(second), notes.append)
        await spares.settled()
        (spare,) = _spares(engine, runtime)
        await driver.undeploy(UndeployRequest(deployment_id=first, runtime=runtime))
        assert [s.id for s in _spares(engine, runtime)] == [spare.id], "the snapshot still serves here"

        await driver.undeploy(UndeployRequest(deployment_id=second, runtime=runtime))

        assert _spares(engine, runtime) == []
        assert engine.containers.list(all=True, filters={"label": f"mlc.runtime={runtime.name}"}) == []
        spare_socket = endpoints.parse(spare.labels["mlc.endpoint"]).socket
        assert spare_socket is not None and not spare_socket.parent.exists()
    finally:
        await spares.settled()
        for container in engine.containers.list(all=True, filters={"label": f"mlc.runtime={runtime.name}"}):
            container.remove(force=True)


async def test_a_spare_serves_one_deployment_only_and_cleanup_leaves_nothing(
    engine: Any, settings: Settings, cc_fraud: ModelSnapshot, notes: list[str]
) -> None:
    runtime = _runtime(f"docker-spare-{uuid.uuid4().hex[:8]}", memory="512m")
    driver = DockerDriver(settings)
    ids = [f"cc-fraud-1-{n}-{uuid.uuid4().hex[:6]}" for n in ("cold", "warm", "next", "race1", "race2")]
    cold_id, warm_id, next_id, *racing = ids

    def request(deployment_id: str) -> OnlineDeployRequest:
        return OnlineDeployRequest(
            deployment_id=deployment_id, snapshot=cc_fraud, runtime=runtime, stage="DEV"
        )

    try:
        cold = await driver.deploy_online(request(cold_id), notes.append)
        await spares.settled()
        (spare,) = _spares(engine, runtime)
        cold_container = engine.containers.get(cold.details["container_id"])

        assert cold.details["spare"] is False
        assert spare.id != cold_container.id
        for key in ("NetworkMode", "ReadonlyRootfs", "Memory", "NanoCpus", "CapDrop", "SecurityOpt"):
            assert spare.attrs["HostConfig"][key] == cold_container.attrs["HostConfig"][key], key
        assert spare.attrs["Config"]["User"] == cold_container.attrs["Config"]["User"] == "65534:65534"
        spare_socket = endpoints.parse(spare.labels["mlc.endpoint"]).socket
        assert spare_socket is not None and spare_socket.parent.parent == sockets_root(settings, runtime)
        info = spare_socket.parent.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (65534, 0o700)

        warm = await driver.deploy_online(request(warm_id), notes.append)

        assert warm.details["spare"] is True
        assert warm.details["container_id"] == spare.id
        assert warm.endpoint == spare.labels["mlc.endpoint"] != cold.endpoint
        assert engine.containers.get(spare.id).name == container_name(warm_id)
        response = await call_model(warm.endpoint, "/score", json=CC_FRAUD_SAMPLE)
        assert response.status_code == 200, response.text
        assert await driver.locate(runtime, warm_id) == warm.endpoint
        assert (await driver.probe(ProbeRequest(deployment_id=warm_id, runtime=runtime))).healthy
        again = await driver.deploy_online(request(warm_id), notes.append)
        assert (again.details["container_id"], again.details["reused"]) == (spare.id, True)
        await spares.settled()
        (refill,) = _spares(engine, runtime)
        assert refill.id not in {spare.id, cold_container.id}

        await driver.undeploy(UndeployRequest(deployment_id=warm_id, runtime=runtime))

        with pytest.raises(docker.errors.NotFound):
            engine.containers.get(spare.id)
        assert not spare_socket.parent.exists(), "undeploy leaves the spare's socket folder behind"
        following = await driver.deploy_online(request(next_id), notes.append)
        assert following.details["container_id"] == refill.id, "the next deploy gets a fresh spare"
        await spares.settled()

        (last_spare,) = _spares(engine, runtime)
        raced = await asyncio.gather(*(driver.deploy_online(request(i), notes.append) for i in racing))

        assert [r.details["spare"] for r in raced].count(True) == 1, "one spare, claimed once"
        assert len({r.details["container_id"] for r in raced}) == 2
        assert last_spare.id in {r.details["container_id"] for r in raced}
        await spares.settled()

        assert await driver.drop_spares(runtime) >= 1  # what `mlc dev` does when it stops
        assert _spares(engine, runtime) == []
        for result in raced:  # claimed ones are deployments: they stay
            assert engine.containers.get(result.details["container_id"]).status == "running"

        cleaned = await driver.cleanup(CleanupRequest(runtime=runtime, keep=(cold_id,)))

        assert cleaned.removed == tuple(sorted([next_id, *racing]))
        left = engine.containers.list(all=True, filters={"label": f"mlc.runtime={runtime.name}"})
        assert [c.id for c in left] == [cold_container.id]
        cold_socket = endpoints.parse(cold.endpoint).socket
        assert cold_socket is not None
        assert list(sockets_root(settings, runtime).iterdir()) == [cold_socket.parent]
    finally:
        await spares.settled()
        for container in engine.containers.list(all=True, filters={"label": f"mlc.runtime={runtime.name}"}):
            container.remove(force=True)
