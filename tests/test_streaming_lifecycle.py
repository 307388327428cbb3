"""A lifecycle with a streaming stage, end to end on real Temporal, PostgreSQL and Kafka (Tansu).

SIT scores in batch, UAT streams, and PROD serves the same model over REST and Kafka at
once, the runtimes chosen by service tags (a PROD streaming runtime of another business
process is left alone). A second version then takes over the topics in UAT and PROD from
the first one's committed offsets.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

from mlc.domain import DeploymentState, LifecycleSpec, Mode, StageSpec, TestKind
from mlc.store import deployments
from mlc.streaming.consumer import HEADER_DEPLOYMENT, HEADER_MODEL, HEADER_VERSION
from tests.conftest import ADMIN, Stack, call_model
from tests.lifecycle_helpers import wait_for, wait_for_gate
from tests.streaming_helpers import produce, read_topic, streaming_runtime

BOTH = (TestKind.SMOKE, TestKind.METRICS)
SPEC = LifecycleSpec(
    stages=(
        StageSpec(name="SIT", mode=Mode.BATCH, tests=BOTH, gate={}),
        StageSpec(name="UAT", mode=Mode.STREAMING, tests=BOTH, gate={}),
        StageSpec(name="PROD", modes=(Mode.ONLINE, Mode.STREAMING), tests=(TestKind.SMOKE,)),
    )
)


async def approve(stack: Stack, ref: str, stage: str) -> None:
    result = await stack.mlc("approve", ref, "--stage", stage, "--comment", f"ok {stage}")
    assert result.returncode == 0, result.stderr


async def test_streaming_stage_and_rest_plus_kafka_in_prod(
    stack: Stack, example_package: Path, kafka_broker: str, tmp_path: Path
) -> None:
    queue = stack.task_queue
    sit = streaming_runtime(kafka_broker, name="sit-batch", stage="SIT", task_queue=queue)
    await stack.add_runtime(sit.model_copy(update={"modes": (Mode.BATCH,), "kafka": None}))
    uat = streaming_runtime(
        kafka_broker, name="uat-stream", stage="UAT", tags=("cc-fraud",), task_queue=queue
    )
    assert uat.kafka is not None
    added = await stack.mlc(
        "runtime", "add", "uat-stream", "--stage", "UAT", "--tag", "cc-fraud", "--mode", "streaming",
        "--task-queue", queue, "--kafka-bootstrap", kafka_broker,
        "--input-topic", uat.kafka.input_topic, "--output-topic", uat.kafka.output_topic,
        user=ADMIN,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    prod_stream = streaming_runtime(
        kafka_broker, name="prod-stream", stage="PROD", tags=("cc-fraud",), task_queue=queue
    )
    other = streaming_runtime(kafka_broker, name="prod-other", stage="PROD", tags=("aml",), task_queue=queue)
    for runtime in (prod_stream, other):
        await stack.add_runtime(runtime)
    await stack.add_runtime(
        prod_stream.model_copy(update={"name": "prod-rest", "modes": (Mode.ONLINE,), "kafka": None})
    )

    v1 = await stack.register(example_package)
    ref = f"{v1.model}@{v1.version}"
    handle = await stack.start(v1, spec=SPEC)
    for stage in ("SIT", "UAT"):
        status = await wait_for_gate(handle, stage)
        report = next(r for r in status.reports if r.stage == stage)
        assert report.passed and len(report.results) == 2, report
        await approve(stack, ref, stage)
    await handle.result()

    live = await deployments.read_deployments(stack.pool, model=v1.model)
    assert sorted((d.stage, d.runtime, d.mode) for d in live) == [
        ("PROD", "prod-rest", Mode.ONLINE),
        ("PROD", "prod-stream", Mode.STREAMING),
        ("UAT", "uat-stream", Mode.STREAMING),
    ]  # SIT's batch job completed; the "aml" process's runtime was not touched
    rest = next(d for d in live if d.runtime == "prod-rest")
    stream = next(d for d in live if d.runtime == "prod-stream")
    sample = json.loads((example_package / "data" / "eval.jsonl").read_text().splitlines()[0])
    sample.pop("is_fraud")
    answer = (await call_model(rest.endpoint, "/score", json=sample)).json()
    kafka = prod_stream.kafka
    assert kafka is not None
    await asyncio.to_thread(produce, kafka_broker, kafka.input_topic, [("txn-1", sample)])
    [scored] = await asyncio.to_thread(read_topic, kafka_broker, kafka.output_topic, until=1)
    assert scored.key == "txn-1" and scored.value == answer  # one model, REST and Kafka alike
    names = (scored.headers[HEADER_MODEL], scored.headers[HEADER_VERSION], scored.headers[HEADER_DEPLOYMENT])
    assert names == ("cc-fraud", "1", stream.id)

    listing = await stack.mlc("deployments", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = {row["runtime"]: row for row in json.loads(listing.stdout)}
    assert rows["prod-stream"]["topics"] == f"{kafka.input_topic} -> {kafka.output_topic}"
    assert rows["prod-stream"]["lag"] == 0 and rows["prod-rest"]["lag"] is None
    table = await stack.mlc("deployments")
    assert "lag" in table.stdout and kafka.input_topic in table.stdout

    # Version 2 takes over UAT and PROD: it waits in standby while v1 owns the topics, is
    # tested through its own topics, and continues from v1's committed offsets once promoted.
    package = tmp_path / "cc-fraud-v2"
    shutil.copytree(example_package, package)
    manifest = package / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("Flags card", "Version two flags card"))
    v2 = await stack.register(package)
    ref2 = f"{v2.model}@{v2.version}"
    switch = LifecycleSpec(
        stages=(
            StageSpec(name="UAT", mode=Mode.STREAMING, tests=(TestKind.SMOKE,), gate={}),
            StageSpec(name="PROD", mode=Mode.STREAMING, tests=(TestKind.SMOKE,)),
        )
    )
    handle2 = await stack.start(v2, spec=switch)
    status = await wait_for_gate(handle2, "UAT")
    candidate = next(d for d in status.deployments if d.stage == "UAT")
    assert candidate.details["standby"] is True and status.reports[0].passed, status
    uat_kafka = uat.kafka
    await asyncio.to_thread(
        produce, kafka_broker, uat_kafka.input_topic, [(f"u{i}", sample) for i in range(20)]
    )
    await approve(stack, ref2, "UAT")
    await wait_for(handle2, lambda s: s.state.value == "succeeded", what="v2 in PROD")
    await asyncio.to_thread(
        produce, kafka_broker, uat_kafka.input_topic, [(f"u{i}", sample) for i in range(20, 40)]
    )
    outputs = await asyncio.to_thread(read_topic, kafka_broker, uat_kafka.output_topic, until=40)
    keys = [o.key for o in outputs]
    assert sorted(keys) == sorted(f"u{i}" for i in range(40)), "every record once, none lost or repeated"
    assert {o.headers[HEADER_VERSION] for o in outputs if o.key in ("u20", "u39")} == {"2"}

    everything = await deployments.read_deployments(stack.pool, model=v1.model, live_only=False)
    state = {(d.version, d.stage, d.mode): d.state for d in everything if d.mode is Mode.STREAMING}
    assert state[(1, "UAT", Mode.STREAMING)] is DeploymentState.RETIRED
    assert state[(1, "PROD", Mode.STREAMING)] is DeploymentState.RETIRED
    assert state[(2, "PROD", Mode.STREAMING)] is DeploymentState.SERVING
    promoted = next(d for d in everything if d.version == 2 and d.stage == "PROD")
    assert promoted.details["standby"] is False
