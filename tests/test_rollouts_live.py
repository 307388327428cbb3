"""Canary and shadow rollouts end to end, through a runtime's real nginx gateway.

Real Temporal, PostgreSQL, model servers and nginx (a local DEV runtime with a gateway),
with consumers scoring through the model's stable endpoint the whole time: a canary of a
version failing on a share of inputs is rolled back by itself, a healthy canary goes
through every step to all of the traffic, and a shadow's comparison of both versions'
answers to the same live requests becomes the evidence its gate's approver signs.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import WorkflowFailureError, WorkflowHandle

from activities.inventory import RETIRING
from activities.runtimes.gateway.nginx import DEPLOYMENT_HEADER
from mlc.domain import (
    ApprovalGate,
    DeploymentState,
    DockerSettings,
    LifecycleSpec,
    ModelSnapshot,
    Rollout,
    RolloutStrategy,
    Runtime,
    RuntimeKind,
    StageSpec,
    TestKind,
)
from mlc.lifecycle_client import read_status
from mlc.store import deployments, runs, traffic, trail
from tests.conftest import DOCKER_BASE_IMAGE, FIXTURES, Stack, gateway_settings
from tests.lifecycle_helpers import keep_history, wait_for_gate
from tests.test_stable_endpoints import answering_version, approve

FLAKY = FIXTURES / "models" / "cc-fraud-flaky"
"""cc-fraud answering 500 to records with velocity_24h >= 30 (passes its smoke samples)."""
WEAK = FIXTURES / "models" / "cc-fraud-weak"
"""cc-fraud without dependencies (the same answer for every record)."""
ORDINARY = {
    "amount": 48.9,
    "hour": 10,
    "merchant_risk": 0.12,
    "distance_from_home": 5.5,
    "foreign": False,
    "card_present": True,
    "velocity_24h": 2,
}
BUSY = {**ORDINARY, "velocity_24h": 40}
"""A record the flaky version fails on (every third request a consumer sends)."""
BLUE_GREEN = LifecycleSpec(stages=(StageSpec(name="DEV", tests=(TestKind.SMOKE,)),))
"""v1's run: DEV without a gate, all traffic at once."""


def canary(window: float = 3.0) -> LifecycleSpec:
    """DEV without a gate, rolled out as a canary of 25 % then 50 %, ``window`` s each."""
    return LifecycleSpec(
        stages=(
            StageSpec(
                name="DEV",
                tests=(TestKind.SMOKE,),
                rollout=Rollout(
                    strategy=RolloutStrategy.CANARY,
                    steps=(25, 50),
                    window=timedelta(seconds=window),
                    max_error_rate_increase=0.05,
                    min_requests=10,
                ),
            ),
        )
    )


SHADOW = LifecycleSpec(
    stages=(
        StageSpec(
            name="DEV",
            tests=(TestKind.SMOKE,),
            rollout=Rollout(
                strategy=RolloutStrategy.SHADOW,
                duration=timedelta(seconds=3),
                min_pairs=10,
                min_agreement=0.95,
            ),
            gate=ApprovalGate(),
        ),
    )
)
"""DEV with a shadow before its gate."""


@dataclass(frozen=True)
class Answer:
    """One request of a consumer: when it was answered, the status and who answered."""

    at: float
    status: int
    deployment: str


class Consumer:
    """Clients configured once with a stable endpoint, scoring in a loop and keeping every answer."""

    def __init__(self, endpoint: str, clients: int = 3) -> None:
        self.url = f"{endpoint}/score"
        self.clients = clients
        self.answers: list[Answer] = []
        self.failures: list[str] = []
        """Requests that got no HTTP answer at all (reset, refused, timeout)."""
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self) -> None:
        sent = 0
        async with httpx.AsyncClient(trust_env=False, timeout=30.0) as http:
            while not self._stop.is_set():
                sent += 1
                record = BUSY if sent % 3 == 0 else ORDINARY
                try:
                    response = await http.post(self.url, json=record)
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                deployment = response.headers.get(DEPLOYMENT_HEADER, "?")
                self.answers.append(Answer(time.monotonic(), response.status_code, deployment))

    async def __aenter__(self) -> Consumer:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def wait(self, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` more answers have come."""
        target = len(self.answers) + count
        deadline = time.monotonic() + timeout
        while len(self.answers) < target:
            assert time.monotonic() < deadline, f"only {len(self.answers)} answers of {target}"
            await asyncio.sleep(0.05)

    def by(self, deployment: str) -> list[Answer]:
        """Answers from ``deployment``."""
        return [a for a in self.answers if a.deployment == deployment]


async def snapshot_of(stack: Stack, package: Path, tmp_path: Path, name: str) -> ModelSnapshot:
    """Register a copy of ``package`` (new content, so a new version)."""
    copy = tmp_path / name
    shutil.copytree(package, copy)
    (copy / "NOTES.md").write_text(f"{name}\n")
    return await stack.register(copy)


async def dev_deployment(stack: Stack, snap: ModelSnapshot) -> str:
    """The id of ``snap``'s (only) DEV deployment, whatever its state."""
    found = await deployments.read_deployments(stack.pool, model=snap.model, stage="DEV", live_only=False)
    (mine,) = [d.id for d in found if d.version == snap.version]
    return mine


async def promoted_v1(
    stack: Stack, package: Path, tmp_path: Path, *, runtime: Runtime | None = None
) -> tuple[ModelSnapshot, str, str]:
    """v1 promoted to DEV (all traffic) on ``runtime`` (default: a local one with a gateway):
    the snapshot, its deployment and the stable endpoint."""
    if runtime is None:
        await stack.add_local_runtimes(("DEV",), gateway=True)
    else:
        await stack.add_runtime(runtime)
    v1 = await snapshot_of(stack, package, tmp_path, "v1")
    await (await stack.start(v1, spec=BLUE_GREEN)).result()
    (table,) = await traffic.read_traffic(stack.pool, model=v1.model, stage="DEV")
    return v1, await dev_deployment(stack, v1), table.endpoint


async def history(stack: Stack, model: str) -> list[dict[str, str]]:
    """``mlc history MODEL --stage DEV --json``: every traffic change with cause and actor."""
    shown = await stack.mlc("history", model, "--stage", "DEV", "--json")
    assert shown.returncode == 0, shown.stderr
    rows: list[dict[str, str]] = json.loads(shown.stdout)
    assert all(r["actor"] and r["when"] for r in rows), rows
    return rows


async def assert_failed_run_recorded(stack: Stack, handle: WorkflowHandle[Any, Any]) -> None:
    """The inventory knows the run failed and ended (its failure handling ran)."""
    run = await runs.read_run(stack.pool, handle.id, (await handle.describe()).run_id)
    assert run is not None and run["state"] == "failed" and run["ended_at"] is not None, run


def longest_gap(answers: list[Answer]) -> float:
    """The longest time between two successive answers (seconds)."""
    times = [a.at for a in answers]
    return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


async def test_canary_failing_on_a_share_of_inputs_rolls_back_by_itself(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    await canary_rolls_back(stack, example_package, tmp_path)


async def test_docker_canary_rolls_back_by_itself(stack: Stack, tmp_path: Path, docker_engine: Any) -> None:
    docker_dev = Runtime(
        name=f"docker-dev-{uuid.uuid4().hex[:6]}",  # gateway containers are named by runtime
        kind=RuntimeKind.DOCKER,
        stage="DEV",
        task_queue=stack.task_queue,
        docker=DockerSettings(base_image=DOCKER_BASE_IMAGE, network_mode="host", memory="512m"),
        gateway=gateway_settings(),
    )
    # v1 is the dependency-free cc-fraud of the champion/challenger tests: small images
    await canary_rolls_back(stack, WEAK, tmp_path, runtime=docker_dev)


async def canary_rolls_back(
    stack: Stack, v1_package: Path, tmp_path: Path, *, runtime: Runtime | None = None
) -> None:
    """v1 serves DEV; the flaky v2's canary, under live traffic, is rolled back by itself."""
    where = runtime.name if runtime else "local-dev"
    v1, v1_id, endpoint = await promoted_v1(stack, v1_package, tmp_path, runtime=runtime)
    v2 = await snapshot_of(stack, FLAKY, tmp_path, "v2-flaky")
    async with Consumer(endpoint) as consumer:
        await consumer.wait(30)
        handle = await stack.start(v2, spec=canary())
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
        rolled_back = len(consumer.answers)
        await consumer.wait(60)

    # the run failed by itself, naming the step and the error rate against v1's
    message = str(failure.value.cause)
    assert f"canary in DEV rolled back: at 25% on {where}: error rate" in message, message
    assert "against 0.0% of the current version, more than 5.0% higher" in message, message
    status = await read_status(handle)
    assert status is not None and status.reason is not None and "canary in DEV rolled back" in status.reason
    await assert_failed_run_recorded(stack, handle)
    if runtime is None:
        await keep_history(handle, "ModelLifecycle", "canary_rolled_back")

    # v2's deployment is retired, and the same consumers get v1 only, for every record
    v2_id = await dev_deployment(stack, v2)
    found = await deployments.read_deployment(stack.pool, v2_id)
    assert found is not None and found.state is DeploymentState.RETIRED
    assert await answering_version(endpoint) == v1.version
    after = consumer.answers[rolled_back:]
    assert after and {(a.deployment, a.status) for a in after} == {(v1_id, 200)}

    # what the consumers saw: v1 answered every request it got, throughout; errors came
    # from v2 only, while it had its share (about a third of its requests); no request was lost
    assert consumer.failures == [], consumer.failures[:5]
    assert {a.deployment for a in consumer.answers} == {v1_id, v2_id}
    assert {a.status for a in consumer.by(v1_id)} == {200}
    assert longest_gap(consumer.by(v1_id)) < 2.0, "v1 kept answering during the canary"
    from_v2 = Counter(a.status for a in consumer.by(v2_id))
    assert set(from_v2) == {200, 500} and 0.15 < from_v2[500] / from_v2.total() < 0.5, from_v2

    # the audit trail: the promotion, the canary step and the rollback with its cause
    rows = await history(stack, v1.model)
    assert [(r["versions"], r["cause"]) for r in rows[:2]] == [
        (f"v{v1.version} 100%", "promote"),
        (f"v{v2.version} 25%, v{v1.version} 75%", "canary 25%"),
    ]
    assert len(rows) == 3 and rows[2]["versions"] == f"v{v1.version} 100%", rows
    assert rows[2]["cause"].startswith(f"canary rolled back: at 25% on {where}: error rate"), rows[2]
    assert rows[1]["workflow_id"] == rows[2]["workflow_id"] == handle.id


async def test_healthy_canary_goes_through_every_step(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    v1, v1_id, endpoint = await promoted_v1(stack, example_package, tmp_path)
    v2 = await snapshot_of(stack, example_package, tmp_path, "v2")
    async with Consumer(endpoint) as consumer:
        await consumer.wait(30)
        handle = await stack.start(v2, spec=canary(window=2.0))
        await handle.result()
        await keep_history(handle, "ModelLifecycle", "canary_promotion")
        promoted = len(consumer.answers)
        await consumer.wait(30)

    v2_id = await dev_deployment(stack, v2)
    assert await answering_version(endpoint) == v2.version
    assert consumer.failures == [], consumer.failures[:5]
    assert {a.status for a in consumer.answers} == {200}, "a healthy canary costs no request"
    assert {a.deployment for a in consumer.answers[promoted:]} == {v2_id}
    assert len(consumer.by(v1_id)) > 0 and len(consumer.by(v2_id)) > 0

    rows = await history(stack, v1.model)
    assert [(r["versions"], r["cause"]) for r in rows] == [
        (f"v{v1.version} 100%", "promote"),
        (f"v{v2.version} 25%, v{v1.version} 75%", "canary 25%"),
        (f"v{v2.version} 50%, v{v1.version} 50%", "canary 50%"),
        (f"v{v2.version} 100%", "promote"),
    ]
    assert {r["workflow_id"] for r in rows[1:]} == {handle.id}


async def test_shadow_comparison_is_evidence_for_the_gate(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    v1, v1_id, endpoint = await promoted_v1(stack, example_package, tmp_path)
    v2 = await snapshot_of(stack, example_package, tmp_path, "v2")
    async with Consumer(endpoint) as consumer:
        await consumer.wait(30)
        handle = await stack.start(v2, spec=SHADOW)
        await wait_for_gate(handle, "DEV")
        shadowed = list(consumer.answers)
        await approve(stack, v2, "DEV")
        await handle.result()
        await keep_history(handle, "ModelLifecycle", "shadow_then_gate")
        promoted = len(consumer.answers)
        await consumer.wait(30)

    # until the approval every answer came from v1: the shadow's were discarded
    v2_id = await dev_deployment(stack, v2)
    assert consumer.failures == [], consumer.failures[:5]
    assert shadowed and {(a.deployment, a.status) for a in shadowed} == {(v1_id, 200)}
    assert {(a.deployment, a.status) for a in consumer.answers[promoted:]} == {(v2_id, 200)}
    assert await answering_version(endpoint) == v2.version

    # the comparison is in the stage's test report, in the run's status and the audit trail
    status = await read_status(handle)
    assert status is not None
    (report,) = [r for r in status.reports if r.stage == "DEV"]
    (result,) = [r for r in report.results if r.test is TestKind.SHADOW]
    assert result.passed and result.deployment_id == v2_id, result
    assert result.metrics["pairs"] >= 10 and result.metrics["agreement_rate"] == 1.0, result
    assert result.metrics["shadow_errors"] == 0 and "within limits" in result.summary
    recorded = await trail.read_entries(
        stack.pool, kinds=(trail.TEST_REPORT,), model=v2.model, workflow_id=handle.id
    )
    shadow_results = [
        r for e in recorded for r in e.data()["report"]["results"] if r["test"] == TestKind.SHADOW.value
    ]
    assert shadow_results and shadow_results[-1]["metrics"] == result.metrics

    rows = await history(stack, v1.model)
    assert [(r["versions"], r["cause"]) for r in rows] == [
        (f"v{v1.version} 100%", "promote"),
        (f"v{v1.version} 100%, v{v2.version} shadow", f"shadow v{v2.version}"),
        (f"v{v1.version} 100%", "shadow ended"),
        (f"v{v2.version} 100%", "promote"),
    ]


async def test_a_canary_step_that_fails_gives_the_traffic_back(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    v1, v1_id, endpoint = await promoted_v1(stack, example_package, tmp_path)
    v2 = await snapshot_of(stack, example_package, tmp_path, "v2")
    async with Consumer(endpoint) as consumer:
        await consumer.wait(30)
        handle = await stack.start(v2, spec=canary(window=4.0))
        deadline = time.monotonic() + 60
        while not any(r["cause"] == "canary 25%" for r in await history(stack, v1.model)):
            assert time.monotonic() < deadline, "the canary did not start"
            await asyncio.sleep(0.2)
        # mid-window, the inventory stops counting v2 as live (as when its runtime's
        # reconciler retires it): observing the window is refused, and the run fails
        v2_id = await dev_deployment(stack, v2)
        await deployments.update_serving(
            stack.pool, v2_id, state=DeploymentState.SERVING, details={RETIRING: True}
        )
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
        failed = len(consumer.answers)
        await consumer.wait(60)

    message = str(failure.value.cause)
    assert f"deployment {v2_id} is not a live online deployment (being retired)" in message, message
    await assert_failed_run_recorded(stack, handle)
    await keep_history(handle, "ModelLifecycle", "canary_step_failed")
    found = await deployments.read_deployment(stack.pool, v2_id)
    assert found is not None and found.state is DeploymentState.RETIRED

    # before the failed run undeployed v2, it gave all traffic back to v1: nobody is sent to v2
    rows = await history(stack, v1.model)
    assert [r["versions"] for r in rows] == [
        f"v{v1.version} 100%",
        f"v{v2.version} 25%, v{v1.version} 75%",
        f"v{v1.version} 100%",
    ]
    assert rows[2]["cause"].startswith("canary stopped at 25%: "), rows[2]
    assert consumer.failures == [], consumer.failures[:5]
    assert {(a.deployment, a.status) for a in consumer.answers[failed:]} == {(v1_id, 200)}
    assert {a.status for a in consumer.answers} == {200}


async def test_a_cancelled_canary_gives_the_traffic_back(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    """Cancelled mid-step (Web UI, `temporal workflow cancel`): the current version gets all
    the traffic back, the new one is undeployed and the run is recorded as ended."""
    v1, v1_id, endpoint = await promoted_v1(stack, example_package, tmp_path)
    v2 = await snapshot_of(stack, example_package, tmp_path, "v2")
    async with Consumer(endpoint) as consumer:
        handle = await stack.start(v2, spec=canary(window=120.0))

        async def split() -> bool:
            (table,) = await traffic.read_traffic(stack.pool, model=v1.model, stage="DEV")
            return len([r for r in table.routes if r.weight > 0]) == 2

        deadline = time.monotonic() + 60
        while not await split():
            assert time.monotonic() < deadline, "the canary never took a share"
            await asyncio.sleep(0.2)
        await consumer.wait(20)
        await handle.cancel()
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        cancelled = len(consumer.answers)
        await consumer.wait(20)

    (table,) = await traffic.read_traffic(stack.pool, model=v1.model, stage="DEV")
    assert [(r.deployment_id, r.weight) for r in table.routes] == [(v1_id, 100)]
    assert {a.deployment for a in consumer.answers[cancelled:]} == {v1_id}
    assert consumer.failures == [] and {a.status for a in consumer.answers} == {200}
    v2_deployment = await deployments.read_deployment(stack.pool, await dev_deployment(stack, v2))
    assert v2_deployment is not None and v2_deployment.state is DeploymentState.RETIRED
    await assert_failed_run_recorded(stack, handle)
    rows = await history(stack, v1.model)
    assert rows[-1]["cause"] == "canary stopped at 25%: the run was cancelled", rows[-1]
