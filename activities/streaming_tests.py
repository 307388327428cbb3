"""Stage tests of streaming deployments: smoke and metrics over the deployment's topics.

The records go to the deployment's own test topics (``mlc-test.<deployment>.in``), which
its consumers score next to (or, in standby, instead of) the business input topic, so a
test never writes to a topic that downstream systems read. Smoke produces the manifest's
samples and compares their outputs with the expected ones; metrics streams the labelled
set and computes the thresholds' metrics from what comes back. Both run in one pass. When
nothing arrives within the runtime's ``kafka.test_timeout_seconds`` every requested test
fails with a result saying so and where to look, rather than the activity hanging.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence

from mlc.domain import Deployment, Runtime, TestKind, TestResult
from mlc.errors import DeploymentFailedError
from mlc.evaluation import EvaluationSet, check_samples, evaluate_outputs
from mlc.manifest import ModelManifest
from mlc.streaming.probe import ProbeResult, stream_through
from mlc.streaming.settings import test_topics, with_secret
from mlc.streaming.topics import kafka_errors

HEARTBEAT_SECONDS = 1.0


async def run_streaming_tests(
    runtime: Runtime,
    deployment: Deployment,
    manifest: ModelManifest,
    evaluation: EvaluationSet,
    tests: Sequence[TestKind],
    heartbeat: Callable[[str], None],
) -> list[TestResult]:
    """One result per requested test, in order.

    Raises:
        DeploymentFailedError: the runtime has no kafka settings or its password variable is unset.
        RuntimeUnavailableError: the broker cannot be reached (the activity retries).
    """
    kafka = runtime.kafka
    if kafka is None:
        raise DeploymentFailedError(
            f"runtime {runtime.name} has no kafka settings to test {deployment.id} with"
        )
    try:
        client = with_secret(kafka.client_config(), kafka.sasl_password_env, os.environ)
    except ValueError as exc:
        raise DeploymentFailedError(str(exc)) from None
    test_in, test_out = test_topics(deployment.id)
    samples = [dict(s.input) for s in manifest.samples] if TestKind.SMOKE in tests else []
    labelled = evaluation.records if TestKind.METRICS in tests else []
    records = [*samples, *labelled]
    if not records:
        return [_verdict(kind, manifest, evaluation, [], deployment) for kind in tests]
    with kafka_errors(kafka.bootstrap_servers, f"test deployment {deployment.id}"):
        probe = asyncio.ensure_future(
            asyncio.to_thread(
                stream_through, client, test_in, test_out, records, timeout=kafka.test_timeout_seconds
            )
        )
        while not probe.done():
            heartbeat(f"streaming {len(records)} test records through {deployment.id}")
            await asyncio.wait({probe}, timeout=HEARTBEAT_SECONDS)
        result: ProbeResult = probe.result()
    if result.received == 0:
        why = (
            f"no output arrived on {test_out} within {kafka.test_timeout_seconds:.0f} s for any of the "
            f"{len(records)} records produced to {test_in}: is the consumer of deployment "
            f"{deployment.id} running? Its log is named in `mlc deployments --json` (details.logs or "
            "details.container_names); raise the runtime's kafka.test_timeout_seconds for a slow model"
        )
        return [
            TestResult(test=kind, deployment_id=deployment.id, passed=False, summary=why) for kind in tests
        ]
    answers = list(result.answers)
    return [
        _verdict(
            kind,
            manifest,
            evaluation,
            answers[: len(samples)] if kind is TestKind.SMOKE else answers[len(samples) :],
            deployment,
        )
        for kind in tests
    ]


def _verdict(
    kind: TestKind,
    manifest: ModelManifest,
    evaluation: EvaluationSet,
    answers: list[object],
    deployment: Deployment,
) -> TestResult:
    if kind is TestKind.SMOKE:
        return check_samples(manifest, answers, deployment_id=deployment.id)
    return evaluate_outputs(manifest, evaluation.labels, answers, deployment_id=deployment.id)
