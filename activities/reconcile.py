"""The runtime reconciler's activities: keep the inventory true to what actually runs.

Inventory side (trusted main worker): :class:`ReconcileInventory` lists a runtime's
serving deployments and grants a probe of each; it judges what the probes found against
the runtime's restart policy, restarting (on a grant) or marking failed with the log
tail, appending each change to the audit trail and notifying the people who follow the
deployment's lifecycle. Only the runtime's own reconciler workflow may call it.

Runtime side (each runtime's task queue): :class:`ReconcileRuntime` probes and restarts
through the runtime's driver, each action on a grant the platform signed for that one
deployment, exactly like deploys.

Trust: a restart brings back the deployment the inventory has serving, with the
snapshot recorded for it, and into a protected stage only when the trail still holds
the approvals that admitted it (re-verified now, as for a deploy). The reconciler never
chooses a version, so it cannot promote anything.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError

from activities import admission
from activities.boundary import CallingRun, calling_run, mlc_errors
from activities.inventory import RETIRING, load_run
from activities.runtimes.base import OnlineDeployRequest, ProbeRequest, driver_for
from activities.traffic import RETIRE_AFTER
from mlc.config import Settings
from mlc.contracts.reconcile import PLAN as PLAN_CONTRACT
from mlc.contracts.reconcile import (
    PROBE,
    RECONCILER,
    RESTART,
    SETTLE,
    Finding,
    Findings,
    GrantsInput,
    Plan,
    PlanInput,
    SettleInput,
    Settlement,
    ensure_reconciler,
    reconciler_id,
)
from mlc.domain import Deployment, DeploymentState, LifecycleState, Mode, ModelSnapshot, Runtime
from mlc.errors import DeploymentFailedError, RefusedError
from mlc.store import audit, deployments, runs, traffic, trail
from mlc.store.governance import GovernanceCache
from mlc.traffic import TrafficTable
from mlc.trust import grants
from mlc.trust.governance import Governance
from mlc.trust.statements import Envelope

RESTARTS = "restarts"
"""Deployment detail: restarts in a row without a healthy check in between."""
PARALLEL_PROBES = 8


async def ensure_reconcilers(client: Client, settings: Settings, pool: asyncpg.Pool) -> list[str]:
    """Reconcile now every runtime that has serving online deployments; return their names.

    Workers call this when they start: whatever died while no worker ran is noticed
    (and restarted, if the runtime says so) at once rather than after an interval.
    """
    serving = await deployments.read_deployments(pool)
    names = sorted(
        {d.runtime for d in serving if d.state is DeploymentState.SERVING and d.mode is Mode.ONLINE}
    )
    for name in names:
        await ensure_reconciler(client, settings, name)
    return names


class ReconcileInventory:
    """The reconciler's inventory activities (the workers' least-privilege pool)."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.governance = GovernanceCache(pinned_root=settings.trust_root, author_role=settings.author_role)
        self._platform_key = grants.platform_key(settings.platform_key_path)

    @PLAN_CONTRACT.implement
    @mlc_errors
    async def plan_reconciliation(self, request: PlanInput) -> Plan:
        """A probe grant for each serving online deployment of the runtime (None: removed)."""
        caller = self._caller(request.runtime)
        runtime = (await self._state()).runtimes.get(request.runtime)
        if runtime is None:
            return Plan(runtime=None)
        watched = [
            d
            for d in await deployments.read_deployments(self.pool, runtime=runtime.name)
            if d.state is DeploymentState.SERVING and d.mode is Mode.ONLINE and not d.details.get(RETIRING)
        ]
        abandoned = await self._abandoned(runtime, caller)
        watched = [d for d in watched if d.id not in {a.id for a in abandoned}]
        retired = abandoned + await self._retire_due(runtime, watched, caller)
        watched = [d for d in watched if d.id not in {r.id for r in retired}]
        tables = await self._routable(runtime, {d.id for d in watched})
        return Plan(
            runtime=runtime,
            probes=tuple(self._grant("probe", d, runtime, caller) for d in watched),
            watching=tuple(d.id for d in watched),
            restarting=tuple(d.id for d in watched if d.details.get(RESTARTS)),
            retire=tuple(self._grant("undeploy", d, runtime, caller) for d in retired),
            retired=tuple(d.id for d in retired),
            routes=tuple(self._route_grant(t, runtime, caller) for t in tables),
            routed=tuple(t.model for t in tables),
        )

    async def _routable(self, runtime: Runtime, serving: set[str]) -> list[TrafficTable]:
        """The runtime's recorded stable endpoints whose routes all name serving deployments.

        An endpoint routed to something no longer serving is left as it is: the gateway
        keeps answering from what is up, and the lifecycle or a rollback moves it.
        """
        if runtime.gateway is None:
            return []
        return [
            t
            for t in await traffic.read_traffic(self.pool, runtime=runtime.name)
            if t.routes and t.routed_ids <= serving
        ]

    def _route_grant(self, table: TrafficTable, runtime: Runtime, caller: CallingRun) -> Envelope:
        answering = [r for r in table.routes if not r.shadow]
        primary = max(answering, key=lambda r: r.weight) if answering else table.routes[0]
        return grants.issue(
            self._platform_key,
            grants.RuntimeGrant(
                action="route_traffic",
                deployment_id=primary.deployment_id,
                runtime=runtime,
                stage=table.stage,
                mode=Mode.ONLINE,
                model=table.model,
                routes=table.routes,
                repair=True,
                as_of=table.updated_at,
                workflow_id=caller.workflow_id,
                run_id=caller.run_id,
                expires_at=datetime.now(UTC) + grants.GRANT_LIFETIME,
            ),
        )

    async def _abandoned(self, runtime: Runtime, caller: CallingRun) -> list[Deployment]:
        """Record retired the live deployments of runs that ended without cleaning up.

        A run terminated (``temporal workflow terminate``, the Web UI) or timed out runs no
        more workflow code, so it neither undeploys its stage nor records its end. Temporal
        knows it is closed: such a run is recorded ended (failed, with the reason), and its
        deployments still deploying or serving here are retired, except those answering a
        stable endpoint (consumers use them; a later promotion or rollback replaces them).
        """
        live = await deployments.read_deployments(self.pool, runtime=runtime.name)
        owners = {
            (d.workflow_id, str(d.details["run_id"]))
            for d in live
            if d.workflow_id and d.details.get("run_id")
        }
        closed: dict[tuple[str, str], str] = {}
        for workflow_id, run_id in owners:
            owner = await runs.read_run(self.pool, workflow_id, run_id)
            if owner is None or owner.get("ended_at") is not None:
                continue
            status = await _closed_status(workflow_id, run_id)
            if status is None:
                continue
            closed[(workflow_id, run_id)] = status
            await runs.update_run(
                self.pool,
                workflow_id=workflow_id,
                run_id=run_id,
                state=LifecycleState.FAILED.value,
                stage=owner.get("stage"),
                reason=f"the run was {status} in Temporal without cleaning up; its runtime's reconciler did",
                ended=True,
            )
        if not closed:
            return []
        routed = {
            i for t in await traffic.read_traffic(self.pool, runtime=runtime.name) for i in t.routed_ids
        }
        found = []
        for d in live:
            status = closed.get((d.workflow_id or "", str(d.details.get("run_id"))))
            if status is None or d.id in routed or d.mode is not Mode.ONLINE:
                continue
            why = f"has been retired: its lifecycle run was {status} without cleaning up"
            updated = await self._retire(d, caller, why, while_in=(DeploymentState.DEPLOYING,))
            if updated is not None:
                found.append(updated)
        return found

    async def _retire(
        self,
        deployment: Deployment,
        caller: CallingRun,
        why: str,
        *,
        while_in: tuple[DeploymentState, ...] = (),
    ) -> Deployment | None:
        """Record ``deployment`` retired by the reconciler (while it is serving or in
        ``while_in``), append it to the trail and tell its followers; None if it changed
        meanwhile."""
        updated = await deployments.update_serving(
            self.pool,
            deployment.id,
            state=DeploymentState.RETIRED,
            details={RETIRING: True, "retired_by": "reconciler"},
            while_in=(DeploymentState.SERVING, *while_in),
        )
        if updated is not None:
            d = deployment
            message = f"{d.model}@{d.version} in {d.stage} on runtime {d.runtime} {why}"
            await self._record(updated, caller, event="retired", message=message)
        return updated

    async def _retire_due(
        self, runtime: Runtime, serving: list[Deployment], caller: CallingRun
    ) -> list[Deployment]:
        """Record retired the warm standbys due on a runtime with a gateway; return them.

        Due: an online deployment of a model with a stable endpoint here that answers no
        route of it, whose ``retire_after`` (the grace given when it stopped answering)
        has passed, and whose own lifecycle has ended (a running one still owns it).
        """
        if runtime.gateway is None:
            return []
        tables = {t.model: t for t in await traffic.read_traffic(self.pool, runtime=runtime.name)}
        now = datetime.now(UTC)
        due = []
        for d in serving:
            table = tables.get(d.model)
            if table is None or d.id in table.routed_ids:
                continue  # no stable endpoint for the model yet (served directly), or it answers
            mark = d.details.get(RETIRE_AFTER)
            if mark is not None and datetime.fromisoformat(str(mark)) > now:
                continue
            run_id = d.details.get("run_id")
            if run_id and d.workflow_id:
                owner = await runs.read_run(self.pool, d.workflow_id, str(run_id))
                if owner is not None and owner.get("ended_at") is None:
                    continue
            updated = await self._retire(
                d, caller, "answered no stable endpoint after its grace and has been retired"
            )
            if updated is not None:
                due.append(updated)
        return due

    @SETTLE.implement
    @mlc_errors
    async def settle_reconciliation(self, request: SettleInput) -> Settlement:
        """Judge each finding against the runtime's restart policy and record the outcome."""
        caller = self._caller(request.runtime)
        state = await self._state()
        runtime = state.runtimes.get(request.runtime)
        restart: list[Envelope] = []
        remove: list[Envelope] = []
        failed: list[str] = []
        restarted: list[str] = []
        for finding in request.findings:
            found = await deployments.read_deployment(self.pool, finding.deployment_id)
            if runtime is None or found is None or found.runtime != runtime.name:
                continue  # not this reconciler's to judge
            if found.state is not DeploymentState.SERVING:  # retired or failed meanwhile
                remove.append(self._grant("undeploy", found, runtime, caller))  # whatever is left
                continue
            if found.details.get(RETIRING):
                continue  # its lifecycle is removing it
            streak = int(found.details.get(RESTARTS) or 0)
            if finding.healthy:
                if finding.restarted and await self._restarted(found, finding, caller):
                    restarted.append(found.id)
                elif finding.restarted:  # retired or failed while it came back: take it down
                    remove.append(self._grant("undeploy", found, runtime, caller))
                elif streak:
                    await deployments.update_serving(
                        self.pool, found.id, state=DeploymentState.SERVING, details={RESTARTS: 0}
                    )
                continue
            limit = runtime.restart_limit
            if limit is None or streak < limit:
                if finding.restarted:
                    continue  # this attempt failed; the next round tries again
                try:
                    snapshot = await self._admitted(found, state)
                except RefusedError as exc:
                    finding = finding.model_copy(update={"detail": f"{finding.detail}; not restarted: {exc}"})
                else:
                    await deployments.update_serving(
                        self.pool,
                        found.id,
                        state=DeploymentState.SERVING,
                        details={RESTARTS: streak + 1, "last_failure": finding.detail},
                    )
                    restart.append(self._grant("restart", found, runtime, caller, snapshot=snapshot))
                    continue
            if await self._failed(found, finding, runtime, caller, streak):
                failed.append(found.id)
            remove.append(self._grant("undeploy", found, runtime, caller))  # whatever is left of it
        return Settlement(
            restart=tuple(restart), remove=tuple(remove), failed=tuple(failed), restarted=tuple(restarted)
        )

    # --- outcomes -----------------------------------------------------------------------

    async def _restarted(self, found: Deployment, finding: Finding, caller: CallingRun) -> bool:
        """Record a deployment that is back up; False when it stopped serving meanwhile."""
        updated = await deployments.update_serving(
            self.pool,
            found.id,
            state=DeploymentState.SERVING,
            endpoint=finding.endpoint,
            details={**finding.details, "restarted_at": datetime.now(UTC).isoformat()},
        )
        if updated is None:
            return False
        moved = f" at {updated.endpoint}" if updated.endpoint != found.endpoint else ""
        message = (
            f"{found.model}@{found.version} in {found.stage} on runtime {found.runtime} was down "
            f"({found.details.get('last_failure') or 'no answer'}) and has been restarted{moved}"
        )
        await self._record(updated, caller, event="restarted", message=message)
        return True

    async def _failed(
        self, found: Deployment, finding: Finding, runtime: Runtime, caller: CallingRun, streak: int
    ) -> bool:
        """Mark a deployment failed with the finding; False when it stopped serving meanwhile."""
        after = f" after {streak} restart(s) in a row" if streak else ""
        reason = f"{finding.detail}{after}; restart policy {runtime.restart}"
        updated = await deployments.update_serving(
            self.pool,
            found.id,
            state=DeploymentState.FAILED,
            details={"error": reason, "log_tail": finding.log_tail, "failed_by": "reconciler"},
        )
        if updated is None:
            return False
        tail = f"\nlast log lines:\n{finding.log_tail}" if finding.log_tail else ""
        message = (
            f"{found.model}@{found.version} in {found.stage} on runtime {found.runtime} failed "
            f"while serving: {reason}{tail}"
        )
        await self._record(updated, caller, event="failed", message=message)
        return True

    async def _record(self, deployment: Deployment, caller: CallingRun, *, event: str, message: str) -> None:
        """Append the change to the trail (under the lifecycle's run) and notify its followers."""
        body = deployment.model_dump(mode="json", exclude={"created_at", "updated_at"})
        await trail.append(
            self.pool,
            trail.DEPLOYMENT,
            {**body, "event": event, "by": caller.workflow_id},
            model=deployment.model,
            version=deployment.version,
            workflow_id=deployment.workflow_id or caller.workflow_id,
            run_id=deployment.details.get("run_id") or caller.run_id,
            idempotency_key=f"{caller.workflow_id}/{caller.run_id}/{caller.activity_id}/{deployment.id}",
        )
        activity.logger.warning("reconciler: %s", message)
        await audit.create_notification(
            self.pool,
            workflow_id=deployment.workflow_id or caller.workflow_id,
            model=deployment.model,
            version=deployment.version,
            message=message,
            idempotency_key=f"{caller.workflow_id}/{caller.run_id}/{caller.activity_id}/{deployment.id}",
        )

    async def _admitted(self, found: Deployment, state: Governance) -> ModelSnapshot:
        """The snapshot to bring back, after the same checks as a deploy of it.

        Raises:
            RefusedError: the deployment's run is unknown, its snapshot unregistered, or
                the stage is protected and the run's approvals no longer verify.
        """
        run_id, workflow_id = found.details.get("run_id"), found.workflow_id
        if not run_id or not workflow_id:
            raise RefusedError("the inventory does not say which run deployed it")
        run = await load_run(self.pool, workflow_id, run_id)
        if (run.snapshot.model, run.snapshot.version) != (found.model, found.version):
            raise RefusedError(f"its run {workflow_id} is for {run.ref}")
        if run.snapshot.sha256 not in state.registrants:
            raise RefusedError(f"snapshot {run.ref} has no verified registration")
        decisions = await trail.read_entries(
            self.pool, kinds=(trail.DECISION,), workflow_id=workflow_id, run_id=run_id
        )
        admission.admit(decisions, run, state, stage=found.stage)
        return run.snapshot

    # --- plumbing -----------------------------------------------------------------------

    def _caller(self, runtime: str) -> CallingRun:
        """The calling run, which must be this runtime's reconciler of this installation."""
        caller = calling_run()
        expected = reconciler_id(self.settings.task_queue, runtime)
        if caller.workflow_type != RECONCILER or caller.workflow_id != expected:
            raise RefusedError(
                f"only the reconciler of runtime {runtime} ({RECONCILER} {expected}) may reconcile it, "
                f"not {caller.workflow_type} {caller.workflow_id}"
            )
        return caller

    async def _state(self) -> Governance:
        if not self.settings.trust_root:
            raise RefusedError("no trust root is pinned for this worker: set MLC_TRUST_ROOT")
        return await self.governance.current(self.pool)

    def _grant(
        self,
        action: grants.RuntimeAction,
        deployment: Deployment,
        runtime: Runtime,
        caller: CallingRun,
        *,
        snapshot: ModelSnapshot | None = None,
    ) -> Envelope:
        return grants.issue(
            self._platform_key,
            grants.RuntimeGrant(
                action=action,
                deployment_id=deployment.id,
                runtime=runtime,
                stage=deployment.stage,
                mode=deployment.mode,
                snapshot=snapshot,
                workflow_id=caller.workflow_id,
                run_id=caller.run_id,
                expires_at=datetime.now(UTC) + grants.GRANT_LIFETIME,
            ),
        )


async def _closed_status(workflow_id: str, run_id: str) -> str | None:
    """How a workflow run closed (``terminated``, ``timed out``...), or None while it runs
    (or when Temporal does not know it: nothing is judged on a missing answer)."""
    try:
        described = await activity.client().get_workflow_handle(workflow_id, run_id=run_id).describe()
    except RPCError:
        return None
    status = described.status
    if status is None or status is WorkflowExecutionStatus.RUNNING:
        return None
    return status.name.lower().replace("_", " ")


class ReconcileRuntime:
    """The reconciler's runtime activities: probe and restart, each on a platform grant."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._public: Ed25519PublicKey | None = None

    @PROBE.implement
    @mlc_errors
    async def probe_deployments(self, request: GrantsInput) -> Findings:
        """Check each granted deployment's health (a few at a time)."""
        checked = [self._granted(g, "probe") for g in request.grants]
        limit = asyncio.Semaphore(PARALLEL_PROBES)

        async def probe(grant: grants.RuntimeGrant) -> Finding:
            async with limit:
                driver = driver_for(grant.runtime, self.settings)
                result = await driver.probe(
                    ProbeRequest(deployment_id=grant.deployment_id, runtime=grant.runtime)
                )
                activity.heartbeat(grant.deployment_id)
            return Finding(
                deployment_id=grant.deployment_id,
                healthy=result.healthy,
                detail=result.detail,
                log_tail=result.log_tail,
                endpoint=result.endpoint,
            )

        return Findings(findings=tuple(await asyncio.gather(*(probe(g) for g in checked))))

    @RESTART.implement
    @mlc_errors
    async def restart_deployments(self, request: GrantsInput) -> Findings:
        """Bring each granted deployment back up; a deployment that will not come up is a
        finding (with the reason), an unreachable engine an error (retried, nothing judged)."""
        findings = []
        for envelope in request.grants:
            grant = self._granted(envelope, "restart")
            if grant.snapshot is None:
                raise RefusedError("the restart grant names no snapshot")
            deploy = OnlineDeployRequest(
                deployment_id=grant.deployment_id,
                snapshot=grant.snapshot,
                runtime=grant.runtime,
                stage=grant.stage,
            )
            try:
                result = await driver_for(grant.runtime, self.settings).restart(deploy, activity.heartbeat)
            except DeploymentFailedError as exc:
                findings.append(
                    Finding(deployment_id=grant.deployment_id, healthy=False, restarted=True, detail=str(exc))
                )
                continue
            findings.append(
                Finding(
                    deployment_id=grant.deployment_id,
                    healthy=True,
                    restarted=True,
                    endpoint=result.endpoint,
                    details=result.details,
                )
            )
        return Findings(findings=tuple(findings))

    def _granted(self, envelope: Envelope, action: grants.RuntimeAction) -> grants.RuntimeGrant:
        if self._public is None:
            self._public = grants.platform_public_key(self.settings.platform_key_path)
        return grants.check(envelope, self._public, action=action, run_id=calling_run().run_id)
