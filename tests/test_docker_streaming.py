"""A streaming deployment as containers on a real Docker engine, against the session's broker.

Needs dockerd and ``mlc-python:3.11-bookworm`` (``scripts/docker-engine.sh``); fails under
``CI=true`` without them, like the other container tests.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from pathlib import Path
from typing import Any

from activities.runtimes.base import StreamingDeployRequest, UndeployRequest
from activities.runtimes.docker.driver import DockerDriver
from mlc.artifacts import ArtifactStore, build_archive
from mlc.config import Settings
from mlc.domain import DockerSettings, ModelSnapshot, RuntimeKind
from mlc.manifest import load_manifest
from mlc.streaming.consumer import HEADER_VERSION
from mlc.streaming.probe import stream_through
from mlc.streaming.settings import test_topics
from tests.streaming_helpers import produce, read_topic, streaming_runtime

STREAM_MODEL = Path(__file__).parent / "fixtures" / "models" / "stream-model"
BASE_IMAGE = "mlc-python:3.11-bookworm"


async def test_consumers_run_as_containers_and_stop_cleanly(
    docker_engine: Any, kafka_broker: str, tmp_path: Path
) -> None:
    settings = Settings.from_env(home=tmp_path / "home")
    runtime = streaming_runtime(
        kafka_broker, name=f"docker-stream-{uuid.uuid4().hex[:6]}", instances=2, partitions=4
    ).model_copy(
        update={
            "kind": RuntimeKind.DOCKER,
            "docker": DockerSettings(base_image=BASE_IMAGE, network_mode="host", memory="512m"),
        }
    )
    kafka = runtime.kafka
    assert kafka is not None
    manifest = load_manifest(STREAM_MODEL)
    snapshot = ModelSnapshot(
        model=manifest.name,
        version=4,
        sha256=ArtifactStore(settings.artifact_dir).put(build_archive(STREAM_MODEL)),
        service_tags=manifest.service_tags,
        entry_module=manifest.entry_module,
    )
    driver = DockerDriver(settings)
    request = StreamingDeployRequest(
        deployment_id="dep-docker-stream", snapshot=snapshot, runtime=runtime, stage="UAT"
    )
    try:
        result = await driver.deploy_streaming(request, lambda note: None)
        names = result.details["container_names"]
        assert len(names) == 2 and not result.details["reused"]
        containers = [docker_engine.containers.get(n) for n in names]
        assert all(c.attrs["HostConfig"]["ReadonlyRootfs"] and c.attrs["Config"]["User"] for c in containers)
        # the consumers (on the runtime's network) load no model code: a scorer with no network does
        assert all("--score-socket" in c.attrs["Config"]["Cmd"] for c in containers)
        (scorer,) = docker_engine.containers.list(
            filters={"label": ["mlc.deployment-id=dep-docker-stream", "mlc.mode=stream-scorer"]}
        )
        assert scorer.attrs["HostConfig"]["NetworkMode"] == "none"

        await asyncio.to_thread(
            produce, kafka_broker, kafka.input_topic, [(str(i), {"id": i, "x": float(i)}) for i in range(200)]
        )
        outputs = await asyncio.to_thread(read_topic, kafka_broker, kafka.output_topic, until=200)
        assert collections.Counter(o.key for o in outputs) == collections.Counter(str(i) for i in range(200))
        assert {o.headers[HEADER_VERSION] for o in outputs} == {"4"}
        test_in, test_out = test_topics("dep-docker-stream")
        probe = await asyncio.to_thread(
            stream_through, kafka.client_config(), test_in, test_out, [{"id": 9, "x": 0.5}], timeout=30
        )
        assert probe.answers == [{"id": 9, "y": 1.0}]

        again = await driver.deploy_streaming(request, lambda note: None)
        assert again.details["reused"] and again.details["container_ids"] == result.details["container_ids"]
    finally:
        await driver.undeploy(UndeployRequest(deployment_id="dep-docker-stream", runtime=runtime))
    left = docker_engine.containers.list(all=True, filters={"label": "mlc.deployment-id=dep-docker-stream"})
    assert left == []
