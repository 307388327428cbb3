"""The ``run_stage_tests`` activity: smoke and metrics tests against a deployment.

Online deployments are tested through their HTTP endpoint and batch deployments through
the job's output file; either way the verdicts come from :mod:`mlc.evaluation`. A test
that fails is a result with ``passed=False`` for the approval gate to show, never an
exception: exceptions are for "could not test" (retryable when the endpoint is
unreachable, final when the snapshot's artifact is missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any, ClassVar

import httpx
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.boundary import calling_run
from activities.runtimes.registry import driver_for
from activities.streaming_tests import run_streaming_tests
from mlc import endpoints
from mlc.artifacts import ArtifactStore
from mlc.config import Settings
from mlc.contracts import runtime as rt
from mlc.contracts.runtime import RunStageTestsInput, RunStageTestsResult
from mlc.domain import Deployment, DeploymentState, Mode, Runtime, TestKind, TestResult
from mlc.errors import MLCError, RefusedError
from mlc.evaluation import (
    EvaluationSet,
    check_samples,
    compare_champion,
    evaluate_outputs,
    load_evaluation,
)
from mlc.manifest import ModelManifest, load_manifest
from mlc.trust import evidence, grants

METRICS_CHUNK_SIZE = 500
"""Evaluation records per ``POST /score`` array."""

HTTP_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
Link = tuple[httpx.AsyncClient, str]
"""A client reaching one deployment and its base URL (see :func:`mlc.endpoints.connect`)."""

_UNAVAILABLE_STATUS = frozenset({502, 503, 504})
TESTS_DIR = "_tests"
"""``<runtime_dir>/_tests/<sha256>``: packages unpacked for their stage tests, which hold
the model's weights and labelled evaluation data: the worker's alone (0700), never readable
by a model's user or another local account through the runtimes' folder (0711)."""


class TestingActivities:
    """Runs stage tests; owns the HTTP client it scores through."""

    __test__: ClassVar[bool] = False  # not a pytest test class

    def __init__(self, settings: Settings, *, client: httpx.AsyncClient | None = None) -> None:
        """Create the activities.

        Args:
            settings: Where artifacts are and where to unpack them.
            client: Shared HTTP client (the worker opens and closes it); None makes one
                per activity run.
        """
        self.settings = settings
        self.client = client
        self._public: Ed25519PublicKey | None = None
        self._runtimes: dict[str, Runtime] = {}
        """Granted runtime of each streaming deployment under test (its kafka settings)."""

    @rt.RUN_STAGE_TESTS.implement
    async def run_stage_tests(self, input: RunStageTestsInput) -> RunStageTestsResult:
        """Run ``input.tests`` against the granted deployment and return one result each.

        The deployment, runtime and snapshot come from the platform's grant, and where the
        deployment answers (endpoint or batch output) from the runtime's own driver: a
        payload from workflow code names neither a URL nor a path this worker would use.

        Raises:
            ApplicationError: non-retryable when the grant is missing or does not verify,
                the artifact or package is bad, or the deployment cannot be found on this
                runtime; retryable when the endpoint cannot be reached.
        """
        try:
            input, grant = await self._granted(input)
        except MLCError as exc:
            raise _final(exc, f"stage {input.stage}: ") from exc
        result = await self._run_tests(input)
        signed = evidence.sign_granted(self.settings.home, grant, "stage_tests", list(result.results))
        return result.model_copy(update={"evidence": signed})

    async def _run_tests(self, input: RunStageTestsInput) -> RunStageTestsResult:
        """The granted tests' results (signed by the caller)."""
        deployment = input.deployment
        manifest, evaluation = await asyncio.to_thread(self._prepare, input)
        if deployment.mode is Mode.STREAMING:
            return await self._streaming(input, manifest, evaluation)
        if deployment.mode is Mode.BATCH:
            outputs = await asyncio.to_thread(self._read_batch_output, input)
            split = len(manifest.samples)
            sample_outputs, eval_outputs = outputs[:split], outputs[split:]
            results = [
                check_samples(manifest, sample_outputs, deployment_id=deployment.id)
                if kind is TestKind.SMOKE
                else evaluate_outputs(manifest, evaluation.labels, eval_outputs, deployment_id=deployment.id)
                if kind is TestKind.METRICS
                else _online_only(kind, deployment)
                for kind in input.tests
            ]
            return RunStageTestsResult(results=tuple(results))
        if not deployment.endpoint:
            raise ApplicationError(
                f"stage {input.stage}: online deployment {deployment.id} of "
                f"{input.snapshot.ref} has no endpoint to test; was it deployed?",
                type="NotFoundError",
                non_retryable=True,
            )
        async with contextlib.AsyncExitStack() as stack:
            links: dict[str, Link] = {}
            for one in (deployment, input.champion):
                if one is not None and one.endpoint:
                    links[one.id] = (
                        (self.client, one.endpoint.rstrip("/"))
                        if self.client is not None
                        else await stack.enter_async_context(
                            endpoints.connect(one.endpoint, timeout=HTTP_TIMEOUT)
                        )
                    )
            return await self._online(links, input, manifest, evaluation.records, evaluation.labels)

    async def _granted(self, request: RunStageTestsInput) -> tuple[RunStageTestsInput, grants.RuntimeGrant]:
        """The request rebuilt from its verified grant and the driver's view of the deployment."""
        if request.grant is None:
            raise RefusedError(
                "testing a deployment needs the platform's grant (from record_deployment); "
                "test the deployments `mlc.deploy` returned"
            )
        if self._public is None:
            self._public = grants.platform_public_key(self.settings.platform_key_path)
        grant = grants.check(
            request.grant, self._public, action="run_stage_tests", run_id=calling_run().run_id
        )
        if grant.snapshot is None:
            raise RefusedError("the grant names no snapshot")
        driver = driver_for(grant.runtime, self.settings)
        online = grant.mode is Mode.ONLINE
        if grant.mode is Mode.STREAMING:  # tested through its own topics, named by the grant's runtime
            self._runtimes[grant.deployment_id] = grant.runtime
        champion = None
        if online and grant.routes and TestKind.CHAMPION_CHALLENGER in request.tests:
            chosen = grant.routes[0]  # the inventory's choice, located by this runtime's driver
            champion = Deployment(
                id=chosen.deployment_id,
                model=grant.snapshot.model,
                version=chosen.version,
                runtime=grant.runtime.name,
                stage=grant.stage,
                mode=Mode.ONLINE,
                state=DeploymentState.SERVING,
                endpoint=await driver.locate(grant.runtime, chosen.deployment_id),
            )
        deployment = Deployment(
            id=grant.deployment_id,
            model=grant.snapshot.model,
            version=grant.snapshot.version,
            runtime=grant.runtime.name,
            stage=grant.stage,
            mode=grant.mode,
            state=DeploymentState.COMPLETED if grant.mode is Mode.BATCH else DeploymentState.SERVING,
            endpoint=await driver.locate(grant.runtime, grant.deployment_id) if online else None,
        )
        rebuilt = RunStageTestsInput(
            stage=grant.stage,
            snapshot=grant.snapshot,
            deployment=deployment,
            tests=request.tests,
            batch_output=(
                str(driver.batch_output(grant.runtime, grant.deployment_id))
                if grant.mode is Mode.BATCH
                else None
            ),
            max_auc_drop=request.max_auc_drop,
            champion=champion,
        )
        return rebuilt, grant

    async def _streaming(
        self, input: RunStageTestsInput, manifest: ModelManifest, evaluation: EvaluationSet
    ) -> RunStageTestsResult:
        """Smoke and metrics through the deployment's test topics (:mod:`activities.streaming_tests`)."""
        runtime = self._runtimes.pop(input.deployment.id)
        kinds = tuple(k for k in input.tests if k in (TestKind.SMOKE, TestKind.METRICS))
        try:
            results = await run_streaming_tests(
                runtime, input.deployment, manifest, evaluation, kinds, activity.heartbeat
            )
        except MLCError as exc:
            raise _final(exc, f"stage {input.stage}: ") from exc
        by_kind: dict[TestKind, TestResult] = dict(zip(kinds, results, strict=True))
        return RunStageTestsResult(
            results=tuple(by_kind.get(k) or _online_only(k, input.deployment) for k in input.tests)
        )

    def _prepare(self, input: RunStageTestsInput) -> tuple[ModelManifest, EvaluationSet]:
        """Unpack the snapshot's package and read its manifest and evaluation data."""
        sha = input.snapshot.sha256
        tests_dir = self.settings.runtime_dir / TESTS_DIR
        try:
            tests_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(tests_dir, 0o700)  # not 0755, even where an older worker made it so
            package_dir = ArtifactStore(self.settings.artifact_dir).unpack(sha, tests_dir / sha)
            manifest = load_manifest(package_dir)
            return manifest, load_evaluation(manifest, package_dir)
        except MLCError as exc:
            raise _final(exc, f"cannot test {input.snapshot.ref} in stage {input.stage}: ") from exc

    def _read_batch_output(self, input: RunStageTestsInput) -> list[Any]:
        path = input.batch_output
        if path is None:
            raise ApplicationError(
                f"stage {input.stage}: batch deployment {input.deployment.id} of "
                f"{input.snapshot.ref} has no batch_output to test",
                type="NotFoundError",
                non_retryable=True,
            )
        try:
            with open(path, "rb") as lines:
                return [_decode(line) for line in lines if line.strip()]
        except FileNotFoundError as exc:
            raise ApplicationError(
                f"stage {input.stage}: batch output {path} of deployment {input.deployment.id} "
                "is missing on this worker; tests must run on the runtime's task queue",
                type="NotFoundError",
                non_retryable=True,
            ) from exc

    async def _online(
        self,
        links: dict[str, Link],
        input: RunStageTestsInput,
        manifest: ModelManifest,
        records: list[dict[str, Any]],
        labels: list[int],
    ) -> RunStageTestsResult:
        deployment = input.deployment
        client, base = links[deployment.id]
        url = f"{base}/score"
        results: list[TestResult] = []
        for kind in input.tests:
            if kind is TestKind.SMOKE:
                outputs: list[Any] = []
                for index, case in enumerate(manifest.samples):
                    activity.heartbeat(f"smoke: sample {index + 1}/{len(manifest.samples)}")
                    outputs.append(await _post(client, url, case.input, deployment))
                results.append(check_samples(manifest, outputs, deployment_id=deployment.id))
            elif kind is TestKind.METRICS:
                results.append(await self._online_metrics(client, url, input, manifest, records, labels))
            elif kind is TestKind.CHAMPION_CHALLENGER:
                results.append(await self._champion_challenger(links, input, manifest, records, labels))
            else:
                results.append(_online_only(kind, deployment))
        return RunStageTestsResult(results=tuple(results))

    async def _online_metrics(
        self,
        client: httpx.AsyncClient,
        url: str,
        input: RunStageTestsInput,
        manifest: ModelManifest,
        records: list[dict[str, Any]],
        labels: list[int],
    ) -> TestResult:
        deployment = input.deployment
        outputs: list[Any] = []
        for start in range(0, len(records), METRICS_CHUNK_SIZE):
            activity.heartbeat(f"metrics: {start}/{len(records)} records scored")
            chunk = records[start : start + METRICS_CHUNK_SIZE]
            answer = await _post(client, url, chunk, deployment)
            if not isinstance(answer, list):
                return TestResult(
                    test=TestKind.METRICS,
                    deployment_id=deployment.id,
                    passed=False,
                    summary=f"scoring evaluation records {start}-{start + len(chunk) - 1} failed: {answer}",
                )
            outputs.extend(answer)
        return evaluate_outputs(manifest, labels, outputs, deployment_id=deployment.id)

    async def _champion_challenger(
        self,
        links: dict[str, Link],
        input: RunStageTestsInput,
        manifest: ModelManifest,
        records: list[dict[str, Any]],
        labels: list[int],
    ) -> TestResult:
        """Score the same labelled records with the challenger and the champion; compare AUCs."""
        deployment, champion = input.deployment, input.champion
        kind = TestKind.CHAMPION_CHALLENGER
        mine = await _score_all(links[deployment.id], deployment, records, "challenger")
        if isinstance(mine, str):
            return TestResult(test=kind, deployment_id=deployment.id, passed=False, summary=mine)
        theirs: list[Any] | None = None
        name = None
        if champion is not None:
            name = f"{champion.model}@{champion.version} ({champion.id})"
            scored = await _score_all(links[champion.id], champion, records, f"champion {name}")
            if isinstance(scored, str):
                return TestResult(test=kind, deployment_id=deployment.id, passed=False, summary=scored)
            theirs = scored
        return compare_champion(
            manifest,
            labels,
            mine,
            theirs,
            max_auc_drop=input.max_auc_drop,
            deployment_id=deployment.id,
            champion=name,
        )


async def _score_all(
    link: Link, deployment: Deployment, records: list[dict[str, Any]], who: str
) -> list[Any] | str:
    """Every record's answer from ``deployment``, or a one-line failure naming ``who``."""
    client, base = link
    outputs: list[Any] = []
    for start in range(0, len(records), METRICS_CHUNK_SIZE):
        activity.heartbeat(f"{who}: {start}/{len(records)} records scored")
        chunk = records[start : start + METRICS_CHUNK_SIZE]
        answer = await _post(client, f"{base}/score", chunk, deployment)
        if not isinstance(answer, list):
            return f"{who}: scoring evaluation records {start}-{start + len(chunk) - 1} failed: {answer}"
        outputs.extend(answer)
    return outputs


def _online_only(kind: TestKind, deployment: Deployment) -> TestResult:
    """A test this deployment cannot run here: champion/challenger of a batch or streaming
    deployment (it compares live endpoints), or shadow (recorded by ``mlc.shadow``)."""
    if kind is TestKind.SHADOW:
        why = "shadow comparisons are recorded by a shadow rollout (mlc.shadow), not run as a test"
    else:
        why = f"{kind.value} compares online deployments; {deployment.id} is {deployment.mode.value}"
    return TestResult(test=kind, deployment_id=deployment.id, passed=False, summary=why)


async def _post(client: httpx.AsyncClient, url: str, body: Any, deployment: Deployment) -> Any:
    """POST ``body`` as JSON; return the decoded answer, or a one-line error text for 4xx/5xx.

    Raises:
        ApplicationError: retryable, when the endpoint cannot be reached or is overloaded.
    """
    try:
        response = await client.post(
            url, content=orjson.dumps(body), headers={"content-type": "application/json"}
        )
    except httpx.TransportError as exc:
        raise ApplicationError(
            f"deployment {deployment.id} at {deployment.endpoint} is unreachable: "
            f"{type(exc).__name__}: {exc}",
            type="RuntimeUnavailableError",
        ) from exc
    if response.status_code in _UNAVAILABLE_STATUS:
        raise ApplicationError(
            f"deployment {deployment.id} at {deployment.endpoint} answered "
            f"{response.status_code}; will retry",
            type="RuntimeUnavailableError",
        )
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return f"HTTP 200 with a body that is not JSON: {response.text[:100]!r}"


def _decode(line: bytes) -> Any:
    """One output line; a line that is not JSON becomes a text the tests report."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return f"not JSON: {line[:100]!r}"


def _final(exc: MLCError, prefix: str = "") -> ApplicationError:
    """A non-retryable ApplicationError typed after the project error it wraps."""
    return ApplicationError(f"{prefix}{exc}", type=type(exc).__name__, non_retryable=not exc.retryable)
