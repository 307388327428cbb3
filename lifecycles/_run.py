"""One lifecycle run's state and plumbing, private to the workflows.

:class:`LifecycleRun` holds what the workflow's message handlers read and change (stage,
state, pending gate, decisions, test reports, deployments, grants) and schedules every
activity through its contract. Lifecycle code never gets this object: it gets the
:class:`lifecycles.api.Lifecycle` facade, which exposes the documented operations only,
so uploaded code can neither set run state nor call an activity with a payload of its own.

Inventory activities go to the main task queue, computed from the queue the workflow
runs on (:func:`mlc.names.main_task_queue`): uploaded lifecycles run on the sandboxed
lifecycle worker's queue, and their side effects happen on trusted workers only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from weakref import WeakKeyDictionary

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from mlc import names
    from mlc.contracts import inventory as inv
    from mlc.contracts import runtime as rt
    from mlc.contracts import traffic as tr
    from mlc.contracts.base import ActivityContract, In, Out
    from mlc.contracts.lifecycle import EVIDENCE_NOTE, LifecycleStatus, PendingGate
    from mlc.domain import (
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
        TrafficRoute,
    )
    from mlc.statements import Envelope, decision_of, digest


LOCAL_INVENTORY_PATCH = "local-inventory-activities"
"""``workflow.patched`` id: runs that began before inventory calls became local activities
replay them as the scheduled activities their histories hold."""

LOCAL_FAILURES_PATCH = "local-inventory-failures"
"""``workflow.patched`` id: a failed local inventory activity is raised as an ``ActivityError``
(as a scheduled one's is), so the run's failure handling catches it; runs that failed
before this replay their bare ``ApplicationError``."""

STABLE_ENDPOINTS_PATCH = "stable-endpoints"
"""``workflow.patched`` id: a promotion on a runtime with a gateway routes its stable
endpoint to the new deployment (blue/green) instead of retiring the older ones."""

PROMOTE_CAUSE = "promote"
"""The audit trail's cause of the traffic change a promotion makes."""


class LifecycleFailure(Exception):
    """Raised by ``mlc.fail``: ends the run as failed with a readable reason."""

    def __init__(self, reason: str, *, kind: str = "LifecycleFailed") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


_RUNS: WeakKeyDictionary[object, LifecycleRun] = WeakKeyDictionary()
"""Facade -> run: the facade carries no attribute a lifecycle could read or set."""


def attach(facade: object, run: LifecycleRun) -> None:
    """Make ``facade`` (a :class:`lifecycles.api.Lifecycle`) operate on ``run``."""
    _RUNS[facade] = run


def run_of(facade: object) -> LifecycleRun:
    """The run behind a facade; a facade made by lifecycle code itself has none."""
    try:
        return _RUNS[facade]
    except KeyError:
        raise RuntimeError("this Lifecycle belongs to no run: use the `mlc` your run() receives") from None


class LifecycleRun:
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
        self._queue = names.main_task_queue(workflow.info().task_queue)
        self._pending: PendingGate | None = None
        self._gate_entries: tuple[str, ...] = ()
        self._decision: ApprovalRecord | None = None
        self._decisions: list[ApprovalRecord] = []
        self._deciding = asyncio.Lock()
        self._reports: dict[str, StageTestReport] = {}
        self._deployments: dict[str, Deployment] = {}
        self._test_grants: dict[str, Envelope] = {}
        self._evidence: dict[str, tuple[Envelope, ...]] = {}
        """Per stage: the runtimes' signed results behind its report."""
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
        """Deploy the snapshot to every runtime of ``stage`` serving its service tags."""
        spec = self.spec.stage(stage)
        if mode is None and len(spec.deploy_modes) > 1:
            return await self._deploy_modes(stage, spec.deploy_modes)
        chosen = mode or spec.mode
        self._enter(stage, LifecycleState.DEPLOYING, f"Deploying to {stage} ({chosen.value})")
        await self.record_run(scheduled=True)  # ends the workflow task that entered the stage
        resolved = await self._inventory(
            inv.RESOLVE_RUNTIMES, inv.ResolveRuntimesInput(stage=stage, mode=chosen)
        )
        self._runtimes.update((r.name, r) for r in resolved.runtimes)
        return list(
            await asyncio.gather(*(self._deploy_one(stage, chosen, runtime) for runtime in resolved.runtimes))
        )

    async def deploy_to(self, stage: str, runtime: Runtime, *, mode: Mode = Mode.ONLINE) -> Deployment:
        """Deploy the snapshot to one runtime of ``stage`` (a rollback redeploying where it is cold).

        The inventory decides, as for :meth:`deploy`, whether this run may deploy there.
        """
        self._runtimes[runtime.name] = runtime
        return await self._deploy_one(stage, mode, runtime)

    async def _deploy_modes(self, stage: str, modes: tuple[Mode, ...]) -> list[Deployment]:
        """Deploy in each mode where a runtime of ``stage`` serves it (``StageSpec.modes``)."""
        self._enter(stage, LifecycleState.DEPLOYING, f"Deploying to {stage} ({', '.join(modes)})")
        await self.record_run()
        chosen: list[tuple[Mode, Runtime]] = []
        missing: list[str] = []
        for mode in modes:
            try:
                resolved = await self._inventory(
                    inv.RESOLVE_RUNTIMES, inv.ResolveRuntimesInput(stage=stage, mode=mode)
                )
            except ActivityError as exc:
                if not isinstance(exc.cause, ApplicationError) or exc.cause.type != "NoRuntimeError":
                    raise
                missing.append(cause_message(exc))
                continue
            self._runtimes.update((r.name, r) for r in resolved.runtimes)
            chosen += [(mode, r) for r in resolved.runtimes]
        if not chosen:
            raise LifecycleFailure("; ".join(missing), kind="NoRuntimeError")
        return list(await asyncio.gather(*(self._deploy_one(stage, m, r) for m, r in chosen)))

    async def test(
        self,
        stage: str,
        deployments: Sequence[Deployment],
        *,
        tests: Sequence[TestKind] | None = None,
    ) -> StageTestReport:
        """Run the stage's tests (or ``tests``) against each deployment and record them."""
        own = self._own(deployments)
        kinds = tuple(tests if tests is not None else self.spec.stage(stage).tests)
        self._enter(stage, LifecycleState.TESTING, f"Testing in {stage}: {', '.join(kinds)}")
        await self.record_run()
        outcomes = await asyncio.gather(*(self._test_one(stage, d, kinds) for d in own))
        report = StageTestReport(
            stage=stage, results=tuple(r for outcome in outcomes for r in outcome.results)
        )
        signed = tuple(o.evidence for o in outcomes if o.evidence is not None)
        self._evidence[stage] = signed
        return await self.record_report(report, signed)

    async def record_report(self, report: StageTestReport, signed: tuple[Envelope, ...]) -> StageTestReport:
        """Record ``report`` with the runtimes' signed results behind it; keep what the
        inventory recorded (results nobody signed come back refused) for the gate."""
        self._reports[report.stage] = report
        recorded: inv.RecordTestsResult | None = await self._inventory(
            inv.RECORD_TESTS, inv.RecordTestsInput(report=report, evidence=signed)
        )
        if recorded is not None:  # None in histories from before signed evidence
            self._reports[report.stage] = recorded.report
            self._refused.extend(f"{EVIDENCE_NOTE}{why}" for why in recorded.refused)
        return self._reports[report.stage]

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
            inv.RESOLVE_APPROVERS, inv.ResolveApproversInput(stage=stage, entries=gate.approvers)
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
                await self._inventory(inv.RECORD_DECISION, inv.RecordDecisionInput(record=record))
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
        """Remove this run's deployments from their runtimes and mark them retired."""
        live = [
            d
            for d in self._own(deployments)
            if d.state in (DeploymentState.DEPLOYING, DeploymentState.SERVING)
        ]
        await asyncio.gather(*(self._retire(d) for d in live))

    async def promote(self, stage: str, deployments: Sequence[Deployment]) -> list[Deployment]:
        """Make ``deployments`` the model's version in ``stage``.

        Blue/green: on a runtime with a gateway, the model's stable endpoint sends all
        traffic to the new online deployment; the versions it answered with before stay
        warm for the stage's ``grace``, then the runtime's reconciler retires them (a
        version whose own lifecycle still runs stays until that lifecycle ends). On a
        runtime without a gateway the older versions there are retired now. The new
        deployments are healthy and tested by now, so consumers move from old to new
        without a gap; returns the deployments retired now.
        """
        self._enter(stage, LifecycleState.PROMOTING, f"Promoting in {stage}")
        found = await self._inventory(
            inv.FIND_DEPLOYMENTS,
            inv.FindDeploymentsInput(stage=stage, exclude_ids=tuple(d.id for d in deployments)),
        )
        gated = self._gated(stage, deployments)
        if gated and workflow.patched(STABLE_ENDPOINTS_PATCH):
            await self.route(stage, gated, PROMOTE_CAUSE)
        await asyncio.gather(*(self._retire(d) for d in found.deployments))
        # A streaming deployment made while an older version owned the input topic waits in
        # standby; now that the older one has stopped (committed, left the group), it takes
        # the topic over from the committed offsets.
        for given in deployments:
            mine = self._deployments.get(given.id)
            if mine is not None and mine.mode is Mode.STREAMING and mine.details.get("standby"):
                await self._deploy_one(stage, Mode.STREAMING, await self._runtime_of(mine))
        return list(found.deployments)

    # --- stable endpoints ---------------------------------------------------------------

    async def current_routes(self, stage: str) -> dict[str, tuple[TrafficRoute, ...]]:
        """Runtime name -> routes now live for this run's model on each gateway runtime of the stage."""
        read = await self._inventory(tr.READ_TRAFFIC, tr.ReadTrafficInput(stage=stage))
        return {table.runtime: table.routes for table in read.tables}

    async def route(
        self, stage: str, routes: dict[str, tuple[TrafficRoute, ...]], cause: str
    ) -> dict[str, str]:
        """Set which deployments answer this run's model's stable endpoint on each runtime.

        Per runtime: authorize (the trusted inventory checks the routes and signs a grant),
        apply (the runtime's driver rewrites and reloads its gateway), record (the traffic
        table and a ``traffic`` entry in the audit trail with ``cause``). Runtimes are
        changed concurrently. Returns runtime -> stable endpoint.
        """
        names_ = sorted(routes)
        endpoints = await asyncio.gather(
            *(self._route_one(stage, name, routes[name], cause) for name in names_)
        )
        return dict(zip(names_, endpoints, strict=True))

    async def observe(
        self,
        stage: str,
        runtime: str,
        routes: tuple[TrafficRoute, ...],
        since: datetime,
        until: datetime,
    ) -> tr.TrafficObservation:
        """What ``runtime``'s gateway saw for ``routes`` of this run's model in a time window."""
        granted = await self._inventory(
            tr.AUTHORIZE_TRAFFIC,
            tr.AuthorizeTrafficInput(stage=stage, runtime=runtime, routes=routes, action="observe_traffic"),
        )
        target = await self._gateway_runtime(stage, runtime)
        return await tr.OBSERVE_TRAFFIC.execute(
            tr.ObserveTrafficInput(grant=granted.grant, since=since, until=until),
            task_queue=target.task_queue,
        )

    async def verified(self, stage: str, observations: Sequence[tr.TrafficObservation]) -> None:
        """Have the inventory verify that ``observations`` are what the gateway runtimes
        signed; a refusal fails the run (callers give the traffic back first)."""
        try:
            await self._inventory(
                tr.VERIFY_OBSERVATIONS,
                tr.VerifyObservationsInput(stage=stage, observations=tuple(observations)),
            )
        except ActivityError as exc:
            raise LifecycleFailure(
                f"the traffic observed in {stage} is refused: {cause_message(exc)}", kind="EvidenceRefused"
            ) from exc

    async def _route_one(self, stage: str, runtime: str, routes: tuple[TrafficRoute, ...], cause: str) -> str:
        """Authorize, apply and record one runtime's routes; a failure fails the run, naming them."""
        target = await self._gateway_runtime(stage, runtime)
        try:
            granted = await self._inventory(
                tr.AUTHORIZE_TRAFFIC, tr.AuthorizeTrafficInput(stage=stage, runtime=runtime, routes=routes)
            )
            applied = await tr.ROUTE_TRAFFIC.execute(
                rt.RuntimeActionInput(grant=granted.grant), task_queue=target.task_queue
            )
            await self._inventory(
                tr.RECORD_TRAFFIC,
                tr.RecordTrafficInput(
                    stage=stage,
                    runtime=runtime,
                    routes=routes,
                    endpoint=applied.endpoint,
                    cause=cause,
                    grace=self._grace(stage),
                    grant=granted.grant,
                ),
            )
        except ActivityError as exc:
            shares = ", ".join(f"v{r.version} {'shadow' if r.shadow else f'{r.weight}%'}" for r in routes)
            raise LifecycleFailure(
                f"routing {self.model}'s stable endpoint on runtime {runtime} in {stage} to "
                f"{shares or 'nothing'} ({cause}) failed: {cause_message(exc)}",
                kind="TrafficFailed",
            ) from exc
        return applied.endpoint

    def _gated(self, stage: str, deployments: Sequence[Deployment]) -> dict[str, tuple[TrafficRoute, ...]]:
        """Blue/green routes for ``deployments``: each online one on a runtime with a gateway
        takes all of its runtime's traffic."""
        gated: dict[str, tuple[TrafficRoute, ...]] = {}
        for given in deployments:
            d = self._deployments.get(given.id)
            if d is None:
                continue  # not this run's: the inventory would refuse to route it anyway
            runtime = self._runtimes.get(d.runtime)
            live = d.state is DeploymentState.SERVING and d.mode is Mode.ONLINE and d.stage == stage
            if live and runtime is not None and runtime.gateway is not None:
                gated[d.runtime] = (TrafficRoute(deployment_id=d.id, version=d.version, weight=100),)
        return gated

    def _grace(self, stage: str) -> timedelta:
        try:
            return self.spec.stage(stage).grace
        except KeyError:
            return tr.DEFAULT_GRACE

    async def _gateway_runtime(self, stage: str, name: str) -> Runtime:
        """Runtime ``name`` of ``stage`` (as resolved by this run), which must have a gateway."""
        runtime = self._runtimes.get(name)
        if runtime is None:
            resolved = await self._inventory(
                inv.RESOLVE_RUNTIMES, inv.ResolveRuntimesInput(stage=stage, mode=Mode.ONLINE)
            )
            self._runtimes.update((r.name, r) for r in resolved.runtimes)
            runtime = self._runtimes.get(name)
        if runtime is None or runtime.stage != stage or runtime.gateway is None:
            raise LifecycleFailure(
                f"runtime {name} is not a runtime of {stage} with a gateway serving {self.model}; "
                "see `mlc runtime list`",
                kind="NoRuntimeError",
            )
        return runtime

    async def notify(self, message: str) -> None:
        """Tell the people following this lifecycle (stored and logged by an activity)."""
        await self._inventory(inv.NOTIFY, inv.NotifyInput(message=message))

    async def sleep(self, duration: timedelta) -> None:
        """A durable timer (survives worker restarts)."""
        await workflow.sleep(duration)

    def log(self, message: str) -> None:
        """Write to the worker's log (not repeated on replay)."""
        workflow.logger.info("%s@%s: %s", self.model, self.version, message)

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
            self.check_decision(envelope, decision)
            assert self._pending is not None
            try:
                verified = await self._inventory(
                    inv.VERIFY_DECISION,
                    inv.VerifyDecisionInput(envelope=envelope, gate_approvers=self._gate_entries),
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

    def _own(self, deployments: Sequence[Deployment]) -> list[Deployment]:
        """This run's current record of each deployment; one it did not make is refused."""
        own = []
        for d in deployments:
            mine = self._deployments.get(d.id)
            if mine is None:
                raise ValueError(
                    f"deployment {d.id} was not made by this run; pass the deployments `mlc.deploy` returned"
                )
            own.append(mine)
        return own

    def _enter(self, stage: str, state: LifecycleState, details: str) -> None:
        if stage != self.stage:
            workflow.upsert_search_attributes([names.SA_STAGE.value_set(stage)])
        self.stage = stage
        self.state = state
        workflow.set_current_details(f"**{self.model}@{self.version}**, {self.name}: {details}")

    async def record_run(self, *, ended: bool = False, scheduled: bool = False) -> None:
        """Write the run's state and stage to the inventory (``ended`` frees the snapshot)."""
        await self._inventory(
            inv.RECORD_RUN,
            inv.RecordRunInput(state=self.state, stage=self.stage, reason=self.reason, ended=ended),
            scheduled=scheduled,
        )

    async def _inventory(
        self, contract: ActivityContract[In, Out], arg: In, *, scheduled: bool = False
    ) -> Out:
        """An inventory activity, always on the trusted main queue.

        A built-in lifecycle runs on the trusted main worker itself, which serves these
        activities: there they run as local activities, in the workflow task that needs
        them, with no task queue round trip. A workflow task answers its Workflow Update
        (and queries see its state) only when it ends, so the call right after entering a
        stage is ``scheduled`` as a normal activity: an approval's update returns as soon
        as the run is in the next stage (see bench/bench_load.py). Uploaded lifecycles run
        on the sandboxed worker and always schedule these on the main queue.
        """
        info = workflow.info()
        trusted = info.task_queue == self._queue and info.workflow_type in names.BUILT_IN_LIFECYCLES
        if trusted and not scheduled and workflow.patched(LOCAL_INVENTORY_PATCH):
            try:
                return await contract.execute_local(arg)
            except ApplicationError as exc:
                # A local activity's non-retryable failure reaches the workflow as its bare
                # ApplicationError, not wrapped in an ActivityError like a scheduled one's:
                # wrap it, so every `except ActivityError` (and the run's failure handling:
                # undeploy, record, notify) treats both alike.
                if not workflow.patched(LOCAL_FAILURES_PATCH):
                    raise
                raise ActivityError(
                    "Activity task failed",
                    scheduled_event_id=0,
                    started_event_id=0,
                    identity="",
                    activity_type=contract.name,
                    activity_id="",
                    retry_state=None,
                ) from exc
        return await contract.execute(arg, task_queue=self._queue)

    async def _record(
        self,
        deployment: Deployment,
        state: DeploymentState,
        *,
        endpoint: str | None = None,
        details: dict[str, Any] | None = None,
        evidence: Envelope | None = None,
    ) -> Deployment:
        """Record a deployment's new state; the inventory decides whether this run may
        (and records a serving or completed one only with its runtime's signed result)."""
        recorded = await self._inventory(
            inv.RECORD_DEPLOYMENT,
            inv.RecordDeploymentInput(
                deployment_id=deployment.id,
                state=state,
                endpoint=endpoint,
                details=details or {},
                evidence=evidence,
            ),
        )
        self._deployments[recorded.deployment.id] = recorded.deployment
        if recorded.test_grant is not None:
            self._test_grants[recorded.deployment.id] = recorded.test_grant
        return recorded.deployment

    async def _deploy_one(self, stage: str, mode: Mode, runtime: Runtime) -> Deployment:
        authorized = await self._inventory(
            inv.AUTHORIZE_DEPLOYMENT,
            inv.AuthorizeDeploymentInput(stage=stage, runtime=runtime.name, mode=mode),
        )
        deployment = authorized.deployment
        self._deployments[deployment.id] = deployment
        granted = rt.RuntimeActionInput(grant=authorized.grant)
        try:
            if mode is Mode.ONLINE:
                online = await rt.DEPLOY_ONLINE.execute(granted, task_queue=runtime.task_queue)
                return await self._record(
                    deployment,
                    DeploymentState.SERVING,
                    endpoint=online.endpoint,
                    details={**deployment.details, **online.details},
                    evidence=online.evidence,
                )
            if mode is Mode.STREAMING:
                streaming = await rt.DEPLOY_STREAMING.execute(granted, task_queue=runtime.task_queue)
                return await self._record(
                    deployment,
                    DeploymentState.SERVING,
                    endpoint=streaming.endpoint,
                    details={**deployment.details, **streaming.details},
                    evidence=streaming.evidence,
                )
            batch = await rt.RUN_BATCH_JOB.execute(granted, task_queue=runtime.task_queue)
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
            evidence=batch.evidence,
        )

    async def _test_one(
        self, stage: str, deployment: Deployment, kinds: tuple[TestKind, ...]
    ) -> rt.RunStageTestsResult:
        runtime = await self._runtime_of(deployment)
        try:
            return await rt.RUN_STAGE_TESTS.execute(
                rt.RunStageTestsInput(
                    stage=stage,
                    snapshot=self._snap,
                    deployment=deployment,
                    tests=kinds,
                    batch_output=deployment.details.get("output_path"),
                    grant=self._test_grants.get(deployment.id),
                    max_auc_drop=next((s.max_auc_drop for s in self.stages if s.name == stage), 0.01),
                ),
                task_queue=runtime.task_queue,
            )
        except ActivityError as exc:
            return rt.RunStageTestsResult(
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
        if deployment.mode in (Mode.ONLINE, Mode.STREAMING):
            runtime = await self._runtime_of(deployment)
            granted = await self._inventory(
                inv.AUTHORIZE_UNDEPLOY, inv.AuthorizeUndeployInput(deployment_id=deployment.id)
            )
            await rt.UNDEPLOY.execute(
                rt.RuntimeActionInput(grant=granted.grant), task_queue=runtime.task_queue
            )
        await self._record(deployment, DeploymentState.RETIRED)

    async def _runtime_of(self, deployment: Deployment) -> Runtime:
        if deployment.runtime in self._runtimes:
            return self._runtimes[deployment.runtime]
        resolved = await self._inventory(
            inv.RESOLVE_RUNTIMES, inv.ResolveRuntimesInput(stage=deployment.stage, mode=deployment.mode)
        )
        for runtime in resolved.runtimes:
            if runtime.name == deployment.runtime:
                return runtime
        raise LifecycleFailure(
            f"runtime {deployment.runtime} no longer serves {self.model} in {deployment.stage}"
        )


def cause_message(exc: BaseException) -> str:
    """The innermost application error's message: what actually went wrong."""
    message = str(exc)
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, ApplicationError):
            message = current.message
        current = current.__cause__
    return message
