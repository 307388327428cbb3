"""The authoring API: the building blocks every lifecycle is written with.

A lifecycle is an ``async def run(mlc: Lifecycle) -> None`` function. The built-in
lifecycles and uploaded ones use exactly this API, so whatever the standard lifecycle
can do, a custom one can too. Everything here runs inside a Temporal workflow: it is
deterministic, and every side effect is an activity.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.runtimes.base import BatchJobResult, OnlineDeployResult
    from mlc import names
    from mlc.domain import (
        ApprovalGate,
        ApprovalRecord,
        Decision,
        Deployment,
        DeploymentState,
        LifecycleSpec,
        LifecycleState,
        Mode,
        ModelSnapshot,
        Runtime,
        StageSpec,
        StageTestReport,
        TestKind,
        TestResult,
    )
    from mlc.payloads import (
        AuthorizeDeploymentInput,
        AuthorizeDeploymentResult,
        AuthorizeUndeployInput,
        FindDeploymentsInput,
        FindDeploymentsResult,
        LifecycleStatus,
        NotifyInput,
        PendingGate,
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
        VerifyDecisionInput,
        VerifyDecisionResult,
    )
    from mlc.test_payloads import RunStageTestsInput, RunStageTestsResult
    from mlc.trust.statements import Envelope, decision_of, digest

__all__ = [
    "ApprovalGate",
    "ApprovalRecord",
    "Decision",
    "Deployment",
    "Lifecycle",
    "LifecycleFailure",
    "LifecycleSpec",
    "Mode",
    "StageSpec",
    "StageTestReport",
    "TestKind",
]

INVENTORY_TIMEOUT = timedelta(seconds=30)
DEPLOY_TIMEOUT = timedelta(minutes=30)
"""Generous: a first docker deployment builds an image; heartbeats catch a dead worker."""
TEST_TIMEOUT = timedelta(minutes=15)
UNDEPLOY_TIMEOUT = timedelta(minutes=2)
HEARTBEAT_TIMEOUT = timedelta(seconds=60)
RETRY = RetryPolicy(maximum_interval=timedelta(seconds=30), maximum_attempts=10)

R = TypeVar("R")


class LifecycleFailure(Exception):
    """Raised by :meth:`Lifecycle.fail`: ends the run as failed with a readable reason."""

    def __init__(self, reason: str, *, kind: str = "LifecycleFailed") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class Lifecycle:
    """One run's state and the operations a lifecycle composes.

    Message handlers (approve, reject, status) read and change the same object, so the
    Web UI, the CLI and the lifecycle code always see one truth.
    """

    def __init__(self, *, name: str, model: str, version: int, spec: LifecycleSpec) -> None:
        self.name = name
        self.model = model
        self.version = version
        self.spec = spec
        self.snapshot: ModelSnapshot | None = None
        self.state = LifecycleState.STARTING
        self.stage: str | None = None
        self.reason: str | None = None
        self._pending: PendingGate | None = None
        self._gate_entries: tuple[str, ...] = ()
        self._decision: ApprovalRecord | None = None
        self._decisions: list[ApprovalRecord] = []
        self._deciding = asyncio.Lock()
        self._reports: dict[str, StageTestReport] = {}
        self._deployments: dict[str, Deployment] = {}
        self._refused: list[str] = []
        self._runtimes: dict[str, Runtime] = {}

    # --- reading state ------------------------------------------------------------------

    @property
    def stages(self) -> tuple[StageSpec, ...]:
        """The stages of this run, in promotion order."""
        return self.spec.stages

    def report(self, stage: str) -> StageTestReport | None:
        """The latest test report of ``stage``, if its tests ran."""
        return self._reports.get(stage)

    def deployments(self, stage: str | None = None, *, live: bool = True) -> list[Deployment]:
        """Deployments this run made, optionally of one stage; by default only live ones."""
        return [
            d
            for d in self._deployments.values()
            if (stage is None or d.stage == stage)
            and (not live or d.state in (DeploymentState.DEPLOYING, DeploymentState.SERVING))
        ]

    def status(self) -> LifecycleStatus:
        """A snapshot of the run for the ``status`` query."""
        return LifecycleStatus(
            model=self.model,
            version=self.version,
            lifecycle=self.name,
            state=self.state,
            stage=self.stage,
            stages=tuple(s.name for s in self.spec.stages),
            pending_gate=self._pending,
            reports=tuple(self._reports.values()),
            decisions=tuple(self._decisions),
            deployments=tuple(self._deployments.values()),
            reason=self.reason,
            refused=tuple(self._refused),
        )

    @property
    def finished(self) -> bool:
        """True once the run succeeded or failed."""
        return self.state in (LifecycleState.SUCCEEDED, LifecycleState.FAILED)

    # --- building blocks ----------------------------------------------------------------

    async def deploy(self, stage: str, *, mode: Mode | None = None) -> list[Deployment]:
        """Deploy the snapshot to every runtime of ``stage`` serving its service tags.

        Online deployments return once healthy; batch deployments return once the job
        has scored the test dataset and the runtime is cleared (state ``completed``).
        """
        spec = self.spec.stage(stage)
        chosen = mode or spec.mode
        self._enter(stage, LifecycleState.DEPLOYING, f"Deploying to {stage} ({chosen.value})")
        await self.record_run()
        resolved = await self._inventory(
            names.RESOLVE_RUNTIMES,
            ResolveRuntimesInput(stage=stage, mode=chosen),
            ResolveRuntimesResult,
        )
        self._runtimes.update((r.name, r) for r in resolved.runtimes)
        return list(
            await asyncio.gather(*(self._deploy_one(stage, chosen, runtime) for runtime in resolved.runtimes))
        )

    async def test(
        self,
        stage: str,
        deployments: Sequence[Deployment],
        *,
        tests: Sequence[TestKind] | None = None,
    ) -> StageTestReport:
        """Run the stage's tests (or ``tests``) against each deployment and record them."""
        kinds = tuple(tests if tests is not None else self.spec.stage(stage).tests)
        self._enter(stage, LifecycleState.TESTING, f"Testing in {stage}: {', '.join(kinds)}")
        await self.record_run()
        outcomes = await asyncio.gather(*(self._test_one(stage, d, kinds) for d in deployments))
        report = StageTestReport(
            stage=stage, results=tuple(r for outcome in outcomes for r in outcome.results)
        )
        self._reports[stage] = report
        await self._inventory(
            names.RECORD_TESTS,
            RecordTestsInput(report=report),
        )
        return report

    async def approval(self, stage: str) -> ApprovalRecord:
        """Wait at ``stage``'s gate for a decision; an unanswered gate expires.

        Decisions are signed statements, verified and recorded by a trusted activity
        before they reach this run. When the stage's policy needs several distinct
        approvers the gate stays open until enough have approved; any rejection ends
        the wait. Returns the deciding record (approved, rejected or expired).
        """
        gate = self.spec.stage(stage).gate
        if gate is None:
            raise ValueError(f"stage {stage} has no approval gate")
        resolved = await self._inventory(
            names.RESOLVE_APPROVERS,
            ResolveApproversInput(stage=stage, entries=gate.approvers),
            ResolveApproversResult,
        )
        who = ", ".join(resolved.identities) or f"nobody holds {', '.join(gate.approvers)}"
        deadline = workflow.now() + gate.timeout
        self._gate_entries = gate.approvers
        self._pending = PendingGate(
            stage=stage, approvers=resolved.identities, deadline=deadline, needed=resolved.needed
        )
        await self.notify(f"{self.model}@{self.version} waits for approval at {stage} by {who}")
        while True:
            self._enter(
                stage,
                LifecycleState.AWAITING_APPROVAL,
                f"Waiting for approval at {stage} by {who} until {deadline:%Y-%m-%d %H:%M} UTC "
                f"({len(self._pending.approved_by)} of {self._pending.needed} approvals).\n\n"
                f"`mlc approve {self.model}@{self.version} --stage {stage}`",
            )
            await self.record_run()
            try:
                await workflow.wait_condition(
                    lambda: self._decision is not None,
                    timeout=max(deadline - workflow.now(), timedelta(seconds=1)),
                )
            except TimeoutError:
                record = ApprovalRecord(
                    stage=stage,
                    decision=Decision.EXPIRED,
                    approver="system",
                    comment=f"no decision within {gate.timeout}",
                    decided_at=workflow.now(),
                    evidence=self._reports.get(stage),
                )
                await self._inventory(names.RECORD_DECISION, RecordDecisionInput(record=record))
                self._decisions.append(record)
                break
            decided = self._decision
            assert decided is not None
            record, self._decision = decided, None
            if (
                record.decision is not Decision.APPROVED
                or len(self._pending.approved_by) >= self._pending.needed
            ):
                break
        self._pending = None
        return record

    async def undeploy(self, deployments: Sequence[Deployment]) -> None:
        """Remove deployments from their runtimes and mark them retired."""
        live = [d for d in deployments if d.state in (DeploymentState.DEPLOYING, DeploymentState.SERVING)]
        await asyncio.gather(*(self._retire(d) for d in live))

    async def promote(self, stage: str, deployments: Sequence[Deployment]) -> list[Deployment]:
        """Make ``deployments`` the model's version in ``stage``: retire the others there.

        The new deployments are healthy and tested by now, so consumers move from old to
        new without a gap; returns the retired deployments.
        """
        self._enter(stage, LifecycleState.PROMOTING, f"Promoting in {stage}")
        found = await self._inventory(
            names.FIND_DEPLOYMENTS,
            FindDeploymentsInput(stage=stage, exclude_ids=tuple(d.id for d in deployments)),
            FindDeploymentsResult,
        )
        await asyncio.gather(*(self._retire(d) for d in found.deployments))
        return list(found.deployments)

    async def notify(self, message: str) -> None:
        """Tell the people following this lifecycle (stored and logged by an activity)."""
        await self._inventory(
            names.NOTIFY,
            NotifyInput(message=message),
        )

    async def sleep(self, duration: timedelta) -> None:
        """A durable timer (survives worker restarts)."""
        await workflow.sleep(duration)

    def log(self, message: str) -> None:
        """Write to the worker's log (not repeated on replay)."""
        workflow.logger.info("%s@%s: %s", self.model, self.version, message)

    def fail(self, reason: str) -> NoReturn:
        """End the run as failed with ``reason`` (shown in the Web UI and the CLI)."""
        raise LifecycleFailure(reason)

    # --- decisions (called by the workflow's update and signal handlers) -----------------

    def check_decision(self, envelope: Envelope, decision: Decision) -> None:
        """Refuse at once a decision that cannot fit this run's current gate (raises ValueError).

        Only the statement's shape and binding are checked here; its signature, key,
        roles and policy are checked by the trusted ``verify_decision`` activity.
        """
        ref = f"{self.model}@{self.version}"
        if self.finished:
            raise ValueError(f"{ref}: the lifecycle has already finished ({self.state.value})")
        gate = self._pending
        if gate is None or self._decision is not None:
            doing = f"{self.state.value} in {self.stage}" if self.stage else self.state.value
            raise ValueError(f"{ref} is not waiting for a decision (it is {doing})")
        statement, claim = decision_of(envelope)
        if claim.decision != decision.value:
            raise ValueError(f"the statement says {claim.decision}; send it as that decision")
        if claim.stage != gate.stage:
            raise ValueError(f"{ref} is waiting for a decision at {gate.stage}, not {claim.stage}")
        info = workflow.info()
        if (claim.workflow_id, claim.run_id) != (info.workflow_id, info.run_id):
            raise ValueError(f"the statement is for run {claim.workflow_id}/{claim.run_id}, not this run")
        sha = [s.digest.get("sha256") for s in statement.subject]
        if (claim.model, claim.version) != (self.model, self.version) or sha != [self._snap.sha256]:
            raise ValueError(f"the statement is for {claim.model}@{claim.version} ({sha}), not {ref}")
        shown = self._reports.get(gate.stage)
        if digest(shown.model_dump(mode="json") if shown else None) != claim.evidence_sha256:
            raise ValueError(
                f"the statement was signed on other evidence than {ref}'s {gate.stage} test report"
            )

    async def submit_decision(self, envelope: Envelope, decision: Decision) -> ApprovalRecord:
        """Check, verify (trusted activity, which records it) and accept a signed decision.

        Raises:
            ApplicationError: the decision was refused; the message names the failed check.
        """
        async with self._deciding:
            try:  # again: a decision accepted just before this one may have closed the gate
                self.check_decision(envelope, decision)
            except ValueError as exc:
                raise ApplicationError(str(exc), type="DecisionRefused", non_retryable=True) from None
            assert self._pending is not None
            try:
                verified = await self._inventory(
                    names.VERIFY_DECISION,
                    VerifyDecisionInput(envelope=envelope, gate_approvers=self._gate_entries),
                    VerifyDecisionResult,
                )
            except ActivityError as exc:
                raise ApplicationError(
                    cause_message(exc), type="DecisionRefused", non_retryable=True
                ) from None
            self._pending = self._pending.model_copy(update={"approved_by": verified.approvers})
            self._decisions.append(verified.record)
            self._decision = verified.record
            return verified.record

    def refuse(self, message: str) -> None:
        """Remember a refused signal so ``status`` can show it."""
        workflow.logger.warning("refused decision: %s", message)
        self._refused.append(message)

    # --- plumbing -----------------------------------------------------------------------

    @property
    def _snap(self) -> ModelSnapshot:
        if self.snapshot is None:
            raise RuntimeError("the snapshot is not loaded yet")
        return self.snapshot

    def _enter(self, stage: str, state: LifecycleState, details: str) -> None:
        if stage != self.stage:
            workflow.upsert_search_attributes([names.SA_STAGE.value_set(stage)])
        self.stage = stage
        self.state = state
        workflow.set_current_details(f"**{self.model}@{self.version}**, {self.name}: {details}")

    async def record_run(self, *, ended: bool = False) -> None:
        """Write the run's state and stage to the inventory (``ended`` frees the snapshot)."""
        await self._inventory(
            names.RECORD_RUN,
            RecordRunInput(
                state=self.state,
                stage=self.stage,
                reason=self.reason,
                ended=ended,
            ),
        )

    async def _inventory(self, activity: str, arg: Any, result_type: type[R] | None = None) -> R:
        result: R = await workflow.execute_activity(
            activity,
            arg,
            result_type=result_type,
            start_to_close_timeout=INVENTORY_TIMEOUT,
            retry_policy=RETRY,
        )
        return result

    async def _record(
        self,
        deployment: Deployment,
        state: DeploymentState,
        *,
        endpoint: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> Deployment:
        """Record a deployment's new state; the inventory decides whether this run may."""
        recorded = await self._inventory(
            names.RECORD_DEPLOYMENT,
            RecordDeploymentInput(
                deployment_id=deployment.id, state=state, endpoint=endpoint, details=details or {}
            ),
            RecordDeploymentResult,
        )
        self._deployments[recorded.deployment.id] = recorded.deployment
        return recorded.deployment

    async def _deploy_one(self, stage: str, mode: Mode, runtime: Runtime) -> Deployment:
        authorized = await self._inventory(
            names.AUTHORIZE_DEPLOYMENT,
            AuthorizeDeploymentInput(stage=stage, runtime=runtime.name, mode=mode),
            AuthorizeDeploymentResult,
        )
        deployment = authorized.deployment
        self._deployments[deployment.id] = deployment
        granted = RuntimeActionInput(grant=authorized.grant)
        try:
            if mode is Mode.ONLINE:
                online = await self._runtime_call(
                    runtime, names.DEPLOY_ONLINE, DEPLOY_TIMEOUT, OnlineDeployResult, granted
                )
                return await self._record(
                    deployment,
                    DeploymentState.SERVING,
                    endpoint=online.endpoint,
                    details={**deployment.details, **online.details},
                )
            batch = await self._runtime_call(
                runtime, names.RUN_BATCH_JOB, DEPLOY_TIMEOUT, BatchJobResult, granted
            )
        except ActivityError as exc:
            await self._record(
                deployment,
                DeploymentState.FAILED,
                details={**deployment.details, "error": cause_message(exc)},
            )
            raise LifecycleFailure(
                f"deploying {self.model}@{self.version} to runtime {runtime.name} in {stage} "
                f"failed: {cause_message(exc)}",
                kind="DeploymentFailed",
            ) from exc
        return await self._record(
            deployment,
            DeploymentState.COMPLETED,
            details={
                **deployment.details,
                **batch.details,
                "output_path": batch.output_path,
                "records": batch.records,
                "seconds": batch.seconds,
            },
        )

    async def _test_one(
        self, stage: str, deployment: Deployment, kinds: tuple[TestKind, ...]
    ) -> RunStageTestsResult:
        runtime = await self._runtime_of(deployment)
        try:
            return await self._runtime_call(
                runtime,
                names.RUN_STAGE_TESTS,
                TEST_TIMEOUT,
                RunStageTestsResult,
                RunStageTestsInput(
                    stage=stage,
                    snapshot=self._snap,
                    deployment=deployment,
                    tests=kinds,
                    batch_output=deployment.details.get("output_path"),
                ),
            )
        except ActivityError as exc:
            return RunStageTestsResult(
                results=tuple(
                    TestResult(
                        test=k,
                        deployment_id=deployment.id,
                        passed=False,
                        summary=f"could not run: {cause_message(exc)}",
                    )
                    for k in kinds
                )
            )

    async def _retire(self, deployment: Deployment) -> None:
        if deployment.mode is Mode.ONLINE:
            runtime = await self._runtime_of(deployment)
            granted = await self._inventory(
                names.AUTHORIZE_UNDEPLOY,
                AuthorizeUndeployInput(deployment_id=deployment.id),
                RuntimeGrantResult,
            )
            await self._runtime_call(
                runtime, names.UNDEPLOY, UNDEPLOY_TIMEOUT, None, RuntimeActionInput(grant=granted.grant)
            )
        await self._record(deployment, DeploymentState.RETIRED)

    async def _runtime_of(self, deployment: Deployment) -> Runtime:
        if deployment.runtime in self._runtimes:
            return self._runtimes[deployment.runtime]
        resolved = await self._inventory(
            names.RESOLVE_RUNTIMES,
            ResolveRuntimesInput(stage=deployment.stage, mode=deployment.mode),
            ResolveRuntimesResult,
        )
        for runtime in resolved.runtimes:
            if runtime.name == deployment.runtime:
                return runtime
        raise LifecycleFailure(
            f"runtime {deployment.runtime} no longer serves {self.model} in {deployment.stage}"
        )

    async def _runtime_call(
        self,
        runtime: Runtime,
        activity: str,
        timeout: timedelta,
        result_type: type[R] | None,
        arg: Any,
    ) -> R:
        result: R = await workflow.execute_activity(
            activity,
            arg,
            result_type=result_type,
            task_queue=runtime.task_queue,
            start_to_close_timeout=timeout,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            retry_policy=RETRY,
        )
        return result


def cause_message(exc: BaseException) -> str:
    """The innermost application error's message: what actually went wrong."""
    message = str(exc)
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, ApplicationError):
            message = current.message
        current = current.__cause__
    return message
