"""Streaming deployments on the local runtime against a real broker (Tansu): scoring,
dead letters, at-least-once across ``kill -9``, and a version switch at committed offsets."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from activities.runtimes.base import CleanupRequest, StreamingDeployRequest, UndeployRequest
from activities.runtimes.local.driver import LocalDriver
from activities.runtimes.local.streaming import local_consumer_pids
from mlc.config import Settings
from mlc.domain import ModelSnapshot, Runtime
from mlc.manifest import load_manifest
from mlc.streaming.consumer import HEADER_DEPLOYMENT, HEADER_ERROR, HEADER_MODEL, HEADER_VERSION
from mlc.streaming.probe import stream_through
from mlc.streaming.settings import test_topics
from mlc.streaming.topics import group_lag
from tests.streaming_helpers import SteadyProducer, produce, read_topic, streaming_runtime
from tests.test_local_runtime import snapshot_of

STREAM_MODEL = Path(__file__).parent / "fixtures" / "models" / "stream-model"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env(home=tmp_path / "home")


@pytest.fixture
async def driver(settings: Settings) -> AsyncIterator[LocalDriver]:
    local = LocalDriver(settings)
    yield local
    for name in ("local-stream",):
        await local.cleanup(CleanupRequest(runtime=Runtime(name=name, stage="UAT")))


async def deploy(
    driver: LocalDriver,
    snapshot: ModelSnapshot,
    runtime: Runtime,
    deployment_id: str,
    *,
    standby: bool = False,
) -> dict:
    result = await driver.deploy_streaming(
        StreamingDeployRequest(
            deployment_id=deployment_id,
            snapshot=snapshot,
            runtime=runtime,
            stage=runtime.stage,
            standby=standby,
        ),
        lambda note: None,
    )
    assert result.endpoint == f"kafka://{runtime.kafka.bootstrap_servers}/{runtime.kafka.input_topic}"
    return result.details


async def lag_of(runtime: Runtime, model: str) -> int:
    kafka = runtime.kafka
    assert kafka is not None
    found = await asyncio.to_thread(
        group_lag, kafka.client_config(), kafka.group_for(runtime.name, model), kafka.input_topic
    )
    return found.lag


async def test_scores_with_headers_and_dead_letters_poison_without_stopping(
    driver: LocalDriver, settings: Settings, kafka_broker: str
) -> None:
    runtime = streaming_runtime(kafka_broker)
    kafka = runtime.kafka
    assert kafka is not None
    snapshot = snapshot_of(settings, STREAM_MODEL, version=3)
    details = await deploy(driver, snapshot, runtime, "dep-poison")
    assert details["consumer_group"] == "mlc.local-stream.stream-model" and not details["standby"]

    poison = {
        "p-json": b"{not json",
        "p-schema": {"id": "seven", "x": 1.0},
        "p-model": {"id": 13, "x": -1.0},
    }
    good = [(f"g{i}", {"id": i, "x": float(i)}) for i in range(30)]
    await asyncio.to_thread(
        produce, kafka_broker, kafka.input_topic, [*good[:10], *poison.items(), *good[10:]]
    )
    outputs = await asyncio.to_thread(read_topic, kafka_broker, kafka.output_topic, until=30)
    assert sorted((o.key, o.value["y"]) for o in outputs) == sorted((k, 2.0 * v["x"]) for k, v in good)
    assert {
        (o.headers[HEADER_MODEL], o.headers[HEADER_VERSION], o.headers[HEADER_DEPLOYMENT]) for o in outputs
    } == {("stream-model", "3", "dep-poison")}
    dead = await asyncio.to_thread(read_topic, kafka_broker, kafka.dead_letters, until=3)
    reasons = {d.key: d.headers[HEADER_ERROR] for d in dead}
    assert set(reasons) == set(poison)
    assert "not valid JSON" in reasons["p-json"]
    assert "field 'id': expected integer, got string" in reasons["p-schema"]
    assert "raised ValueError: x must not be negative" in reasons["p-model"]
    assert next(d for d in dead if d.key == "p-json").value == b"{not json"  # the record as it came

    # The deployment's test topics answer too (stage tests), without touching business topics.
    samples = [dict(s.input) for s in load_manifest(STREAM_MODEL).samples]
    test_in, test_out = test_topics("dep-poison")
    probe = await asyncio.to_thread(
        stream_through, kafka.client_config(), test_in, test_out, samples, timeout=30
    )
    assert probe.answers == [{"id": 1, "y": 3.0}, {"id": 2, "y": 8.0}]
    for _ in range(50):
        if await lag_of(runtime, "stream-model") == 0:
            break
        await asyncio.sleep(0.2)
    assert await lag_of(runtime, "stream-model") == 0

    pids = local_consumer_pids(driver.workdir(runtime, "dep-poison"))
    assert len(pids) == 1
    await driver.undeploy(UndeployRequest(deployment_id="dep-poison", runtime=runtime))
    assert not local_consumer_pids(driver.workdir(runtime, "dep-poison")) and not _running(pids[0])


async def test_at_least_once_across_kill_9_of_one_consumer(
    driver: LocalDriver, settings: Settings, kafka_broker: str
) -> None:
    runtime = streaming_runtime(kafka_broker, instances=2, partitions=4)
    kafka = runtime.kafka
    assert kafka is not None
    snapshot = snapshot_of(settings, STREAM_MODEL)
    await deploy(driver, snapshot, runtime, "dep-kill")
    workdir = driver.workdir(runtime, "dep-kill")
    pids = local_consumer_pids(workdir)
    assert len(pids) == 2

    producer = SteadyProducer(kafka_broker, kafka.input_topic, count=2000, seconds=4).start()
    seen = await asyncio.to_thread(read_topic, kafka_broker, kafka.output_topic, until=300)
    assert len(seen) >= 300
    os.kill(pids[0], signal.SIGKILL)  # no clean stop: its last batch may be scored again
    placed = await asyncio.to_thread(producer.join)
    outputs = await asyncio.to_thread(read_topic, kafka_broker, kafka.output_topic, until=2000, timeout=90)
    keys = collections.Counter(o.key for o in outputs)
    assert set(keys) == set(placed), f"lost {len(set(placed) - set(keys))} records"
    assert local_consumer_pids(workdir) == [pids[1]]

    # Redeploying the same deployment restarts the dead consumer and keeps the live one.
    await deploy(driver, snapshot, runtime, "dep-kill")
    again = local_consumer_pids(workdir)
    assert len(again) == 2 and pids[1] in again and pids[0] not in again
    for _ in range(100):
        if await lag_of(runtime, "stream-model") == 0:
            break
        await asyncio.sleep(0.2)
    assert await lag_of(runtime, "stream-model") == 0


async def test_version_switch_continues_from_committed_offsets(
    driver: LocalDriver, settings: Settings, kafka_broker: str
) -> None:
    runtime = streaming_runtime(kafka_broker, partitions=3)
    kafka = runtime.kafka
    assert kafka is not None
    v1 = snapshot_of(settings, STREAM_MODEL, version=1)
    v2 = snapshot_of(settings, STREAM_MODEL, version=2)
    await deploy(driver, v1, runtime, "dep-v1")
    producer = SteadyProducer(kafka_broker, kafka.input_topic, count=1500, seconds=6).start()
    await asyncio.to_thread(read_topic, kafka_broker, kafka.output_topic, until=200)

    # v2 arrives while v1 owns the input topic: standby, tested through its own topics only.
    standby = await deploy(driver, v2, runtime, "dep-v2", standby=True)
    assert standby["standby"] is True
    test_in, test_out = test_topics("dep-v2")
    probe = await asyncio.to_thread(
        stream_through, kafka.client_config(), test_in, test_out, [{"id": 5, "x": 1.0}], timeout=30
    )
    assert probe.answers == [{"id": 5, "y": 2.0}]

    # Promotion: v1 stops cleanly (finishes its batch, commits, leaves), then v2 takes over.
    await driver.undeploy(UndeployRequest(deployment_id="dep-v1", runtime=runtime))
    active = await deploy(driver, v2, runtime, "dep-v2")
    assert active["standby"] is False
    placed = dict(await asyncio.to_thread(producer.join))
    # However long the switch took on a busy machine, v2 gets records of its own too.
    records = ((str(i), {"id": i, "x": i}) for i in range(1500, 1800))
    placed.update(await asyncio.to_thread(produce, kafka_broker, kafka.input_topic, records))
    outputs = await asyncio.to_thread(read_topic, kafka_broker, kafka.output_topic, until=1800, timeout=90)

    keys = collections.Counter(o.key for o in outputs)
    assert set(keys) == set(placed), f"lost {sorted(set(placed) - set(keys))[:10]}"
    assert [k for k, n in keys.items() if n > 1] == [], "a record was scored twice across the switch"
    by_version = collections.Counter(o.headers[HEADER_VERSION] for o in outputs)
    assert by_version["1"] > 0 and by_version["2"] > 0, by_version
    # In each partition v1 scored a prefix of the records and v2 the rest: v2 started at
    # v1's committed offset.
    inputs_by_partition: dict[int, list[int]] = collections.defaultdict(list)
    for key, partition in placed.items():
        inputs_by_partition[partition].append(int(key))
    version_of = {o.key: o.headers[HEADER_VERSION] for o in outputs}
    for partition, ids in inputs_by_partition.items():
        versions = [version_of[str(i)] for i in sorted(ids)]
        assert versions == sorted(versions), f"partition {partition}: versions interleave {versions}"
    # Offsets are committed once outputs are acknowledged, a moment after they can be read.
    expected = {p: len(ids) for p, ids in inputs_by_partition.items()}
    for _ in range(100):
        committed = (
            await asyncio.to_thread(
                group_lag,
                kafka.client_config(),
                kafka.group_for(runtime.name, "stream-model"),
                kafka.input_topic,
            )
        ).committed
        if committed == expected:
            break
        await asyncio.sleep(0.1)
    assert committed == expected


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}").exists()
        and b"Z" not in Path(f"/proc/{pid}/stat").read_bytes().split(b")")[-1][:3]
    )


async def test_mlc_dev_starts_a_broker_for_streaming_runtimes_on_loopback(
    database_url: str, tmp_path: Path, kafka_broker: str
) -> None:
    from cli.stack.kafka_broker import dev_brokers, free_port, listening
    from mlc.store import connect, runtimes

    port = free_port()
    pool = await connect(database_url)
    try:
        for runtime in (
            streaming_runtime(f"localhost:{port}", name="dev-stream"),
            streaming_runtime(kafka_broker, name="already-served"),
            streaming_runtime("kafka.example.internal:9092", name="team-kafka"),
        ):
            await runtimes.create_runtime(pool, runtime)
        notes: list[str] = []
        async with dev_brokers(pool, tmp_path, announce=notes.append) as started:
            assert list(started) == [port] and listening("127.0.0.1", port)
            assert notes == [
                f"started the embedded Kafka broker (Tansu) on 127.0.0.1:{port} for runtime dev-stream"
            ]
        assert not listening("127.0.0.1", port)
    finally:
        await pool.close()


def test_kafka_settings_refuse_what_cannot_work() -> None:
    import pydantic

    from mlc.domain import Mode
    from mlc.kafka_settings import KafkaSettings

    with pytest.raises(
        pydantic.ValidationError, match="needs sasl_mechanism, sasl_username and sasl_password_env"
    ):
        KafkaSettings(
            bootstrap_servers="b:9092", input_topic="in", output_topic="out", security_protocol="SASL_SSL"
        )
    with pytest.raises(pydantic.ValidationError, match="must differ"):
        KafkaSettings(bootstrap_servers="b:9092", input_topic="in", output_topic="in")
    with pytest.raises(pydantic.ValidationError, match="environment variable's name"):
        KafkaSettings(
            bootstrap_servers="b:9092", input_topic="i", output_topic="o", sasl_password_env="s3cr3t!"
        )
    with pytest.raises(pydantic.ValidationError, match="supports mode streaming but has no kafka settings"):
        Runtime(name="r", stage="UAT", modes=(Mode.STREAMING,))
    grouped = KafkaSettings(
        bootstrap_servers="b:9092", input_topic="i", output_topic="o", consumer_group="fraud.{model}"
    )
    assert grouped.group_for("r", "cc-fraud") == "fraud.cc-fraud" and grouped.dead_letters == "i.dead-letter"


def test_runtime_add_names_the_missing_streaming_options() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "mlc", "runtime", "add", "s", "--stage", "UAT", "--mode", "streaming",
         "--kafka-bootstrap", "127.0.0.1:9092"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "--input-topic, --output-topic" in result.stderr, result.stderr


def test_compose_kafka_service_is_kraft_on_loopback_behind_a_profile() -> None:
    import yaml

    compose = yaml.safe_load((Path(__file__).parent.parent / "docker-compose.yml").read_text())
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:") and kafka["profiles"] == ["streaming"]
    env = kafka["environment"]
    assert (
        env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        and "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    )
    assert all(port.startswith("127.0.0.1:") for port in kafka["ports"])
    assert "healthcheck" in kafka and "kafka-data" in compose["volumes"]
