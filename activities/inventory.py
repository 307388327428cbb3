"""Inventory activities: the only way workflows read or write PostgreSQL.

Every input from workflow code is treated as hostile: the run (workflow id, run id,
model, version) comes from Temporal's activity info and the inventory, runtimes and
principals from the verified governance state, and decisions count only when their
signatures verify here, now.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

import asyncpg
from temporalio import activity

from activities import admission
from activities.admission import RunContext
from activities.boundary import calling_run, mlc_errors
from activities.reconciler_runs import ensure_reconciler
from activities.runtimes.base import check_deployment_id
from mlc import names
from mlc.config import Settings
from mlc.contracts import inventory as inv
from mlc.domain import (
    ApprovalRecord,
    Decision,
    Deployment,
    DeploymentState,
    Mode,
    Runtime,
    StageTestReport,
    TestKind,
    TestResult,
    TrafficRoute,
)
from mlc.errors import NoRuntimeError, NotFoundError, RefusedError
from mlc.statements import Envelope, digest
from mlc.store import audit, deployments, lifecycle_definitions, runs, snapshots, traffic, trail
from mlc.store.governance import GovernanceCache
from mlc.trust import evidence, grants
from mlc.trust.governance import Governance

CODE_EVENT = "code"
"""RUN trail event naming the uploaded lifecycle version a run executes."""

RETIRING = "retiring"
"""Deployment detail set when its lifecycle is granted to remove it: the runtime's
reconciler then neither restarts nor fails it (it is going away on purpose)."""


class InventoryActivities:
    """Activities over one asyncpg pool (the workers' least-privilege role)."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.governance = GovernanceCache(pinned_root=settings.trust_root, author_role=settings.author_role)
        self._platform_key = grants.platform_key(settings.platform_key_path)

    # --- runs ---------------------------------------------------------------------------

    @inv.BEGIN_RUN.implement
    @mlc_errors
    async def begin_run(self, request: inv.BeginRunInput) -> inv.BeginRunResult:
        """Load the snapshot and claim it: a snapshot runs one lifecycle at a time.

        The run's lifecycle is its workflow type, with the version of uploaded code that
        ``load_lifecycle_definition`` recorded for this run (``FourEyes@1``).
        """
        info = calling_run()
        snapshot = await snapshots.read_snapshot(self.pool, request.model, request.version)
        starter = await _starter(info.workflow_id, info.run_id)
        lifecycle = info.workflow_type
        for entry in await trail.read_entries(
            self.pool, kinds=(trail.RUN,), workflow_id=info.workflow_id, run_id=info.run_id
        ):
            body = entry.data()
            if body.get("event") == CODE_EVENT and body.get("name") == info.workflow_type:
                lifecycle = f"{info.workflow_type}@{body.get('version')}"
        await runs.start_run(
            self.pool,
            workflow_id=info.workflow_id,
            run_id=info.run_id,
            model=request.model,
            version=request.version,
            lifecycle=lifecycle,
            started_by=starter,
        )
        await self._append(
            trail.RUN,
            {
                "event": "started",
                "lifecycle": lifecycle,
                "started_by": starter,
                "sha256": snapshot.sha256,
            },
            model=snapshot.model,
            version=snapshot.version,
        )
        return inv.BeginRunResult(snapshot=snapshot)

    @inv.RECORD_RUN.implement
    @mlc_errors
    async def record_run(self, request: inv.RecordRunInput) -> None:
        """Record this run's state and stage (and its end)."""
        run = await self._run()
        await runs.update_run(
            self.pool,
            workflow_id=run.workflow_id,
            run_id=run.run_id,
            state=request.state.value,
            stage=request.stage,
            reason=request.reason,
            ended=request.ended,
        )
        if request.ended:
            await self._append(
                trail.RUN, {"event": "ended", "state": request.state.value, "reason": request.reason}, run=run
            )
            await self._release(run)

    async def _release(self, run: RunContext) -> None:
        """A run ended: its online deployments answering no stable endpoint are no longer
        held by it, so the reconcilers of their gateway runtimes look at them now."""
        if not self.settings.trust_root:
            return
        state = await self._state()
        held = {
            d.runtime
            for d in await deployments.read_deployments(self.pool, model=run.snapshot.model)
            if d.details.get("run_id") == run.run_id and d.mode is Mode.ONLINE
        }
        for name in sorted(held):
            runtime = state.runtimes.get(name)
            if runtime is not None and runtime.gateway is not None:
                await ensure_reconciler(activity.client(), self.settings, self.pool, name)

    @inv.NOTIFY.implement
    @mlc_errors
    async def notify(self, request: inv.NotifyInput) -> None:
        """Store a notification and log it (a hook for mail or chat integrations).

        Keyed by the calling activity, so a retry after a lost result stores nothing twice.
        """
        run = await self._run()
        caller = calling_run()
        stored = await audit.create_notification(
            self.pool,
            workflow_id=run.workflow_id,
            model=run.snapshot.model,
            version=run.snapshot.version,
            message=request.message,
            idempotency_key=f"{caller.workflow_id}/{caller.run_id}/{caller.activity_id}",
        )
        if stored:
            activity.logger.info("notify %s: %s", run.workflow_id, request.message)

    # --- runtimes and deployments -------------------------------------------------------

    @inv.RESOLVE_RUNTIMES.implement
    @mlc_errors
    async def resolve_runtimes(self, request: inv.ResolveRuntimesInput) -> inv.ResolveRuntimesResult:
        """The stage's registered runtimes serving this run's snapshot, or a clear error."""
        run, state = await self._run(), await self._state()
        snap = run.snapshot
        candidates = sorted(
            (r for r in state.runtimes.values() if r.stage == request.stage), key=lambda r: r.name
        )
        matching = tuple(
            r
            for r in candidates
            if r.serves(stage=request.stage, service_tags=snap.service_tags, mode=request.mode)
        )
        if not matching:
            raise NoRuntimeError(_no_runtime_message(run, request.stage, request.mode, candidates))
        return inv.ResolveRuntimesResult(runtimes=matching)

    @inv.AUTHORIZE_DEPLOYMENT.implement
    @mlc_errors
    async def authorize_deployment(
        self, request: inv.AuthorizeDeploymentInput
    ) -> inv.AuthorizeDeploymentResult:
        """The enforcement point: record the deployment and grant it, if the stage's policy allows.

        Into a protected stage only with verified approvals of this snapshot's sha256 in
        this run (see :func:`activities.admission.admit`), whatever the lifecycle code is.
        """
        run, state = await self._run(), await self._state()
        runtime = _registered(state, request.runtime)
        snap = run.snapshot
        if not runtime.serves(stage=request.stage, service_tags=snap.service_tags, mode=request.mode):
            raise RefusedError(
                f"runtime {runtime.name} does not serve {run.ref} in {request.stage} ({request.mode.value})"
            )
        decisions = await trail.read_entries(
            self.pool, kinds=(trail.DECISION,), workflow_id=run.workflow_id, run_id=run.run_id
        )
        admission.admit(decisions, run, state, stage=request.stage)
        deployment_id = check_deployment_id(
            f"{snap.model}-v{snap.version}-{request.stage}-{runtime.name}-{_run_tag(run.run_id)}".lower()
        )
        existing = await deployments.read_deployment(self.pool, deployment_id)
        if existing is not None and existing.details.get("run_id") != run.run_id:
            raise RefusedError(f"deployment {deployment_id} belongs to another run")
        deployment = existing or await deployments.upsert_deployment(
            self.pool,
            Deployment(
                id=deployment_id,
                model=snap.model,
                version=snap.version,
                runtime=runtime.name,
                stage=request.stage,
                mode=request.mode,
                state=DeploymentState.DEPLOYING,
                workflow_id=run.workflow_id,
                details={"runtime_kind": runtime.kind.value, "run_id": run.run_id},
            ),
        )
        await self._append(trail.DEPLOYMENT, _deployment_body(deployment), run=run)
        grant = grants.RuntimeGrant(
            action=_DEPLOY_ACTIONS[request.mode],
            deployment_id=deployment.id,
            runtime=runtime,
            stage=request.stage,
            mode=request.mode,
            snapshot=snap,
            standby=request.mode is Mode.STREAMING and await self._stream_taken(deployment),
            workflow_id=run.workflow_id,
            run_id=run.run_id,
            expires_at=datetime.now(UTC) + grants.GRANT_LIFETIME,
        )
        return inv.AuthorizeDeploymentResult(
            deployment=deployment, grant=grants.issue(self._platform_key, grant)
        )

    @inv.AUTHORIZE_UNDEPLOY.implement
    @mlc_errors
    async def authorize_undeploy(self, request: inv.AuthorizeUndeployInput) -> inv.RuntimeGrantResult:
        """Grant removing a deployment: this run's own, or an older version this run replaces."""
        deployment_id = check_deployment_id(request.deployment_id)
        run, state = await self._run(), await self._state()
        deployment = await self._owned(run, deployment_id, retiring=True)
        runtime = _registered(state, deployment.runtime)
        if not deployment.details.get(RETIRING):  # the reconciler leaves it alone from now on
            await deployments.upsert_deployment(
                self.pool, deployment.model_copy(update={"details": {RETIRING: True}})
            )
        grant = grants.RuntimeGrant(
            action="undeploy",
            deployment_id=deployment.id,
            runtime=runtime,
            stage=deployment.stage,
            mode=deployment.mode,
            workflow_id=run.workflow_id,
            run_id=run.run_id,
            expires_at=datetime.now(UTC) + grants.GRANT_LIFETIME,
        )
        return inv.RuntimeGrantResult(grant=grants.issue(self._platform_key, grant))

    @inv.RECORD_DEPLOYMENT.implement
    @mlc_errors
    async def record_deployment(self, request: inv.RecordDeploymentInput) -> inv.RecordDeploymentResult:
        """Record a deployment's new state (this run's own, or retiring one it replaced).

        A serving or completed deployment of this run comes back with the platform's grant
        to test it: the test activity acts on nothing else.
        """
        deployment_id = check_deployment_id(request.deployment_id)
        run = await self._run()
        retiring = request.state is DeploymentState.RETIRED
        current = await self._owned(run, deployment_id, retiring=retiring)
        endpoint, details, signed = request.endpoint or current.endpoint, dict(request.details), None
        if request.state in (DeploymentState.SERVING, DeploymentState.COMPLETED):
            facts = await self._deployed(run, current, request)
            endpoint = facts.get("endpoint") or current.endpoint
            details.update(facts.get("details") or {})
            details.update({k: facts[k] for k in ("output_path", "records", "seconds") if k in facts})
            signed = request.evidence
        updated = await deployments.upsert_deployment(
            self.pool,
            current.model_copy(
                update={
                    "state": request.state,
                    "endpoint": endpoint,
                    "details": {**details, "run_id": current.details.get("run_id")},
                }
            ),
        )
        body = _deployment_body(updated)
        if signed is not None:
            body["evidence"] = signed.to_json()
        await self._append(trail.DEPLOYMENT, body, run=run)
        if updated.state is DeploymentState.SERVING and updated.mode is Mode.ONLINE:
            # its runtime's reconciler watches it from now on
            await ensure_reconciler(activity.client(), self.settings, self.pool, updated.runtime)
        return inv.RecordDeploymentResult(deployment=updated, test_grant=await self._test_grant(run, updated))

    async def _deployed(
        self, run: RunContext, current: Deployment, request: inv.RecordDeploymentInput
    ) -> dict[str, Any]:
        """The deploy result its runtime signed (endpoint, output, facts), or a refusal.

        A refused result is recorded (the deployment failed, the trail says why) before
        the RefusedError ends the deploy: a made-up endpoint is never recorded.
        """
        try:
            claim = evidence.check_evidence(
                request.evidence,
                await self._state(),
                kind="deploy",
                workflow_id=run.workflow_id,
                run_id=run.run_id,
                runtime=current.runtime,
                deployment_id=current.id,
                stage=current.stage,
                snapshot_sha256=run.snapshot.sha256,
            )
        except RefusedError as exc:
            failed = await deployments.upsert_deployment(
                self.pool,
                current.model_copy(
                    update={
                        "state": DeploymentState.FAILED,
                        "details": {**current.details, "error": f"refused: {exc}"},
                    }
                ),
            )
            await self._append(trail.DEPLOYMENT, {**_deployment_body(failed), "refused": str(exc)}, run=run)
            raise RefusedError(f"the deploy result of {current.id} is refused: {exc}") from None
        if not isinstance(claim.results, dict):
            raise RefusedError(f"the signed deploy result of {current.id} is not a deploy result")
        return claim.results

    @inv.FIND_DEPLOYMENTS.implement
    @mlc_errors
    async def find_live_deployments(self, request: inv.FindDeploymentsInput) -> inv.FindDeploymentsResult:
        """Live deployments of this run's model in a stage (the versions a promotion replaces).

        Deployments of another run still in flight are not among them: that run owns them
        (it promotes or undeploys them itself), so two runs of one model waiting in one
        stage do not retire each other's deployments. Nor are online deployments on a
        runtime with a gateway: there a promotion moves the stable endpoint instead, and
        the runtime's reconciler retires what no longer answers (after the stage's grace).
        """
        run, state = await self._run(), await self._state()
        found = await deployments.read_deployments(self.pool, model=run.snapshot.model, stage=request.stage)
        candidates = []
        for d in found:
            if d.id in request.exclude_ids:
                continue
            runtime = state.runtimes.get(d.runtime)
            if d.mode is Mode.ONLINE and runtime is not None and runtime.gateway is not None:
                continue
            candidates.append(d)
        # One query for every other run's state, not one per deployment: with many versions
        # of one model in a stage this sits on the path from a decision to the next stage.
        others = {key for d in candidates if (key := _other_run(d, run.run_id)) is not None}
        flying = await runs.in_flight(self.pool, others)
        replaced = tuple(d for d in candidates if _other_run(d, run.run_id) not in flying)
        return inv.FindDeploymentsResult(deployments=replaced)

    # --- tests and decisions ------------------------------------------------------------

    @inv.RECORD_TESTS.implement
    @mlc_errors
    async def record_test_report(self, request: inv.RecordTestsInput) -> inv.RecordTestsResult:
        """Append a stage's test results to the audit trail, counting only signed ones.

        Each envelope must verify (:func:`mlc.trust.evidence.check_evidence`) for this run,
        stage and snapshot, from the runtime of a deployment of this run; a passing result
        no verified envelope carries is refused: recorded (and returned, for the gate and
        ``mlc status``) as a failed result saying why. Failed results count as they are.
        """
        run, state = await self._run(), await self._state()
        stage = request.report.stage
        claims: list[evidence.EvidencePredicate] = []
        kept: list[Envelope] = []
        refused: list[str] = []
        for envelope in request.evidence:
            try:
                claims.append(await self._check_result(envelope, run, state, stage))
                kept.append(envelope)
            except RefusedError as exc:
                refused.append(str(exc))
        results = []
        for result in request.report.results:
            if result.passed and not (
                evidence.vouches_for(result, claims) or await self._nothing_to_shadow(result)
            ):
                why = f"{result.test.value} of {result.deployment_id}: no runtime signed this passing result"
                refused.append(why)
                result = TestResult(
                    test=result.test,
                    deployment_id=result.deployment_id,
                    passed=False,
                    summary=f"refused: {why}",
                )
            results.append(result)
        report = StageTestReport(stage=stage, results=tuple(results))
        await self._append(
            trail.TEST_REPORT,
            {
                "stage": stage,
                "report": report.model_dump(mode="json"),
                "evidence": [e.to_json() for e in kept],
                "refused": refused,
            },
            run=run,
        )
        if refused:
            activity.logger.warning("%s %s: refused evidence: %s", run.ref, stage, "; ".join(refused))
        return inv.RecordTestsResult(report=report, refused=tuple(refused))

    async def _check_result(
        self, envelope: Envelope, run: RunContext, state: Governance, stage: str
    ) -> evidence.EvidencePredicate:
        """A verified test or observation of this run and stage (RefusedError naming why not)."""
        kind = evidence.evidence_of(envelope).kind
        if kind == "traffic_observation":
            return evidence.check_observation(
                envelope,
                state,
                model=run.snapshot.model,
                workflow_id=run.workflow_id,
                run_id=run.run_id,
                stage=stage,
            )
        claim = evidence.check_evidence(
            envelope,
            state,
            kind="stage_tests",
            workflow_id=run.workflow_id,
            run_id=run.run_id,
            stage=stage,
            snapshot_sha256=run.snapshot.sha256,
        )
        deployment = await deployments.read_deployment(self.pool, claim.deployment_id)
        if deployment is None or deployment.details.get("run_id") != run.run_id:
            raise RefusedError(
                f"the evidence names deployment {claim.deployment_id}, which is not this run's"
            )
        if deployment.runtime != claim.runtime:
            raise RefusedError(
                f"deployment {deployment.id} runs on {deployment.runtime}, "
                f"but runtime {claim.runtime} signed its tests"
            )
        return claim

    async def _nothing_to_shadow(self, result: TestResult) -> bool:
        """A passing shadow result with no numbers: true when nothing else answers the
        deployment's stable endpoint (the inventory's own traffic table), so there was
        no current version to compare with."""
        if result.test is not TestKind.SHADOW or result.metrics:
            return False
        found = await deployments.read_deployment(self.pool, result.deployment_id)
        if found is None:
            return False
        table = await traffic.read_one(self.pool, found.runtime, found.model)
        return not any(
            r.weight > 0 and not r.shadow and r.deployment_id != found.id
            for r in (table.routes if table else ())
        )

    @inv.VERIFY_DECISION.implement
    @mlc_errors
    async def verify_decision(self, request: inv.VerifyDecisionInput) -> inv.VerifyDecisionResult:
        """Verify a signed decision (key, roles, policy, run, sha256, evidence, expiry) and record it.

        Raises:
            RefusedError: naming the first check that failed; nothing is recorded then.
        """
        run, state = await self._run(), await self._state()
        signer, decision = admission.check_decision(
            request.envelope, run, state, gate_approvers=request.gate_approvers
        )
        now = datetime.now(UTC)
        admission.check_fresh(decision, now)
        report = await self._report(run, decision.stage)
        shown = report.model_dump(mode="json") if report else None
        if digest(shown) != decision.evidence_sha256:
            raise RefusedError(
                f"the statement was signed on other evidence than the test report recorded for "
                f"{decision.stage}; look at `mlc status {run.ref}` again and sign anew"
            )
        record = ApprovalRecord(
            stage=decision.stage,
            decision=Decision(decision.decision),
            approver=signer.name,
            comment=decision.comment,
            decided_at=now,
            evidence=report,
            key_id=request.envelope.signatures[0].keyid,
        )
        await self._append(
            trail.DECISION,
            _decision_body(record, decision.evidence_sha256),
            run=run,
            envelope=request.envelope,
            nonce=decision.nonce,
        )
        entries = await trail.read_entries(
            self.pool, kinds=(trail.DECISION,), workflow_id=run.workflow_id, run_id=run.run_id
        )
        counted, _ = admission.approvals(entries, run, state, stage=decision.stage)
        needed = state.policy(decision.stage).min_approvals
        return inv.VerifyDecisionResult(record=record, approvers=tuple(counted), needed=needed)

    @inv.RECORD_DECISION.implement
    @mlc_errors
    async def record_decision(self, request: inv.RecordDecisionInput) -> None:
        """Record a gate that expired (the only decision nobody signs)."""
        if request.record.decision is not Decision.EXPIRED:
            raise RefusedError("only an expired gate is recorded unsigned; approvals must be signed")
        run = await self._run()
        await self._append(trail.DECISION, _decision_body(request.record, None), run=run)

    @inv.RESOLVE_APPROVERS.implement
    @mlc_errors
    async def resolve_approvers(self, request: inv.ResolveApproversInput) -> inv.ResolveApproversResult:
        """Who may decide at a gate now: the policy narrowed by the run's entries, minus conflicts."""
        run, state = await self._run(), await self._state()
        policy = state.policy(request.stage)
        eligible = sorted(
            p.name
            for p in state.principals.values()
            if p.active_keys()
            and admission.approver_problem(policy, p, run, state, gate_approvers=request.entries) is None
        )
        return inv.ResolveApproversResult(identities=tuple(eligible), needed=policy.min_approvals)

    # --- uploaded lifecycle code --------------------------------------------------------

    @inv.LOAD_LIFECYCLE.implement
    @mlc_errors
    async def load_lifecycle_definition(self, request: inv.LoadLifecycleInput) -> inv.LoadLifecycleResult:
        """The newest verified upload of this run's lifecycle, read once per run.

        Its result is in the run's history, so replays and restarted workers run the
        same version even after a newer one is uploaded; an unknown name fails at once.
        """
        info = calling_run()
        if request.name != info.workflow_type:
            raise RefusedError(f"a {info.workflow_type} run may only load its own code, not {request.name}")
        if request.name in names.BUILT_IN_WORKFLOWS:
            raise RefusedError(f"{request.name} is a built-in workflow type: no uploaded code runs as it")
        found = await lifecycle_definitions.read_lifecycle_definition(self.pool, request.name)
        state = await self._state()
        uploader = state.uploads.get((found.name, found.sha256))
        if uploader is None:
            raise RefusedError(
                f"lifecycle {found.name} version {found.version} has no verified upload statement; "
                "upload it again with `mlc lifecycle upload`"
            )
        await self._append(
            trail.RUN,
            {
                "event": CODE_EVENT,
                "name": found.name,
                "version": found.version,
                "sha256": found.sha256,
                "uploader": uploader,
            },
            workflow_id=info.workflow_id,
            run_id=info.run_id,
        )
        return inv.LoadLifecycleResult(
            name=found.name, version=found.version, sha256=found.sha256, source=found.source
        )

    # --- plumbing -----------------------------------------------------------------------

    async def _test_grant(self, run: RunContext, deployment: Deployment) -> Envelope | None:
        """The grant to test a serving or completed deployment of this run (else None)."""
        testable = deployment.state in (DeploymentState.SERVING, DeploymentState.COMPLETED)
        if not testable or deployment.details.get("run_id") != run.run_id:
            return None
        grant = grants.RuntimeGrant(
            action="run_stage_tests",
            deployment_id=deployment.id,
            runtime=_registered(await self._state(), deployment.runtime),
            stage=deployment.stage,
            mode=deployment.mode,
            snapshot=run.snapshot,
            routes=await self._champion(run, deployment),
            workflow_id=run.workflow_id,
            run_id=run.run_id,
            expires_at=datetime.now(UTC) + grants.TEST_GRANT_LIFETIME,
        )
        return grants.issue(self._platform_key, grant)

    async def _champion(self, run: RunContext, deployment: Deployment) -> tuple[TrafficRoute, ...]:
        """The champion a champion/challenger test of ``deployment`` compares with, as a route.

        The version answering the model's stable endpoint on that runtime (its largest
        share) when there is one; else the version serving the model in that stage on that
        runtime for another run: the promoted one (its run has ended) before one still in
        flight, the newest version first. Empty for non-online deployments or when nothing
        else serves there.
        """
        if deployment.mode is not Mode.ONLINE:
            return ()
        live = await deployments.read_deployments(
            self.pool, model=deployment.model, stage=deployment.stage, runtime=deployment.runtime
        )
        table = await traffic.read_one(self.pool, deployment.runtime, deployment.model)
        answering = [r for r in (table.routes if table else ()) if not r.shadow and r.weight > 0]
        serving = {d.id for d in live if d.state is DeploymentState.SERVING and not d.details.get(RETIRING)}
        if answering:
            primary = max(answering, key=lambda r: r.weight)
            if primary.deployment_id in serving and primary.deployment_id != deployment.id:
                return (primary.model_copy(update={"weight": 0}),)
        candidates: list[tuple[bool, int, Deployment]] = []
        for d in live:
            if (
                d.mode is not Mode.ONLINE
                or d.state is not DeploymentState.SERVING
                or d.details.get("run_id") == run.run_id
                or d.details.get(RETIRING)
            ):
                continue
            owner = (
                await runs.read_run(self.pool, d.workflow_id, str(d.details.get("run_id")))
                if d.workflow_id
                else None
            )
            promoted = owner is None or owner.get("ended_at") is not None
            candidates.append((promoted, d.version, d))
        if not candidates:
            return ()
        _, _, best = max(candidates, key=lambda c: (c[0], c[1]))
        return (TrafficRoute(deployment_id=best.id, version=best.version, weight=0),)

    async def _state(self) -> Governance:
        if not self.settings.trust_root:
            raise RefusedError(
                "no trust root is pinned for this worker: set MLC_TRUST_ROOT to the key id "
                "`mlc admin init` printed (or run `mlc dev`, which pins its own)"
            )
        return await self.governance.current(self.pool)

    async def _stream_taken(self, deployment: Deployment) -> bool:
        """True while another live streaming deployment of the model runs on the runtime.

        That one owns the runtime's input topic (in the consumer group all versions
        share) until this one is promoted, so this one starts in standby.
        """
        live = await deployments.read_deployments(
            self.pool, model=deployment.model, stage=deployment.stage, runtime=deployment.runtime
        )
        return any(d.id != deployment.id and d.mode is Mode.STREAMING for d in live)

    async def _run(self) -> RunContext:
        info = calling_run()
        return await load_run(self.pool, info.workflow_id, info.run_id)

    async def _owned(self, run: RunContext, deployment_id: str, *, retiring: bool) -> Deployment:
        """A deployment this run may change: its own, or (when retiring) one it replaces."""
        found = await deployments.read_deployment(self.pool, deployment_id)
        if found is None:
            raise NotFoundError(f"deployment {deployment_id} does not exist")
        if found.details.get("run_id") == run.run_id:
            return found
        if retiring and found.model == run.snapshot.model:
            ours = await deployments.read_deployments(self.pool, model=found.model, stage=found.stage)
            if any(
                d.details.get("run_id") == run.run_id and d.state is DeploymentState.SERVING for d in ours
            ):
                return found
        raise RefusedError(f"deployment {deployment_id} belongs to another run; this run may not change it")

    async def _report(self, run: RunContext, stage: str) -> StageTestReport | None:
        entries = await trail.read_entries(
            self.pool, kinds=(trail.TEST_REPORT,), workflow_id=run.workflow_id, run_id=run.run_id
        )
        latest = [e.data()["report"] for e in entries if e.data().get("stage") == stage]
        return StageTestReport.model_validate(latest[-1]) if latest else None

    async def _append(
        self,
        kind: str,
        body: dict[str, object],
        *,
        run: RunContext | None = None,
        model: str | None = None,
        version: int | None = None,
        workflow_id: str | None = None,
        run_id: str | None = None,
        envelope: Envelope | None = None,
        nonce: str | None = None,
    ) -> None:
        """Append once per activity (a retried attempt finds its own entry)."""
        info = calling_run()
        await trail.append(
            self.pool,
            kind,
            body,
            envelope=envelope,
            model=run.snapshot.model if run else model,
            version=run.snapshot.version if run else version,
            workflow_id=run.workflow_id if run else (workflow_id or info.workflow_id),
            run_id=run.run_id if run else (run_id or info.run_id),
            nonce=nonce,
            idempotency_key=f"{info.workflow_id}/{info.run_id}/{info.activity_id}",
        )


def _other_run(deployment: Deployment, run_id: str) -> tuple[str, str] | None:
    """(workflow id, run id) of the run that made ``deployment`` when that is another run."""
    other = deployment.details.get("run_id")
    if other and other != run_id and deployment.workflow_id:
        return deployment.workflow_id, str(other)
    return None


_RUNS: OrderedDict[tuple[str, str], RunContext] = OrderedDict()
"""Runs loaded recently. Nothing in a :class:`RunContext` changes once its row exists (the
code's uploader is recorded before ``begin_run``), so each activity of a run need not read
three rows again; a row changed afterwards (by whoever can write it) changes nothing."""
_RUNS_KEPT = 4096


async def load_run(pool: asyncpg.Pool, workflow_id: str, run_id: str) -> RunContext:
    """A lifecycle run as the inventory knows it: its row, snapshot and code's uploader.

    Raises:
        RefusedError: the inventory has no such run.
    """
    known = _RUNS.get((workflow_id, run_id))
    if known is not None:
        _RUNS.move_to_end((workflow_id, run_id))
        return known
    row = await runs.read_run(pool, workflow_id, run_id)
    if row is None:
        raise RefusedError(f"workflow {workflow_id} has not begun a lifecycle run")
    snapshot = await snapshots.read_snapshot(pool, row["model"], row["version"])
    uploader = None
    for entry in await trail.read_entries(pool, kinds=(trail.RUN,), workflow_id=workflow_id, run_id=run_id):
        body = entry.data()
        if body.get("event") == CODE_EVENT:
            uploader = body.get("uploader")
    loaded = RunContext(
        workflow_id=workflow_id,
        run_id=run_id,
        lifecycle=row["lifecycle"],
        snapshot=snapshot,
        started_by=row.get("started_by"),
        uploader=uploader,
    )
    _RUNS[(workflow_id, run_id)] = loaded
    while len(_RUNS) > _RUNS_KEPT:
        _RUNS.popitem(last=False)
    return loaded


async def _starter(workflow_id: str, run_id: str) -> str | None:
    """Who started the run, as Temporal recorded the client's identity."""
    handle = activity.client().get_workflow_handle(workflow_id, run_id=run_id)
    async for event in handle.fetch_history_events():
        return event.workflow_execution_started_event_attributes.identity or None
    return None


_DEPLOY_ACTIONS: dict[Mode, grants.RuntimeAction] = {
    Mode.ONLINE: "deploy_online",
    Mode.BATCH: "run_batch_job",
    Mode.STREAMING: "deploy_streaming",
}
"""The runtime action a deployment in each mode is granted."""


def _run_tag(run_id: str) -> str:
    """A short tag unique per run: the tail of the run id (UUIDv7 run ids start with a
    timestamp, so their head repeats for runs started within the same minute)."""
    return run_id.replace("-", "")[-10:]


def _registered(state: Governance, name: str) -> Runtime:
    runtime = state.runtimes.get(name)
    if runtime is None:
        raise RefusedError(f"runtime {name} is not registered by a signed statement; see `mlc runtime list`")
    return runtime


def _deployment_body(deployment: Deployment) -> dict[str, object]:
    return deployment.model_dump(mode="json", exclude={"created_at", "updated_at"})


def _decision_body(record: ApprovalRecord, evidence_sha256: str | None) -> dict[str, object]:
    return {**record.model_dump(mode="json"), "evidence_sha256": evidence_sha256}


def _no_runtime_message(run: RunContext, stage: str, mode: Mode, candidates: list[Runtime]) -> str:
    snap = run.snapshot
    tags = ", ".join(snap.service_tags)
    seen = (
        "; runtimes in this stage: "
        + ", ".join(
            f"{r.name} (tags {', '.join(r.service_tags)}; modes {', '.join(m.value for m in r.modes)})"
            for r in candidates
        )
        if candidates
        else ""
    )
    return (
        f"no runtime serves service tag {tags} in stage {stage} (mode {mode.value}) for "
        f"{snap.model}@{snap.version}{seen}; add one with "
        f"`mlc runtime add NAME --stage {stage} --tag {snap.service_tags[0]}`"
    )
