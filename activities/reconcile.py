"""The runtime reconciler's activities: keep the inventory true to what actually runs.

Inventory side (trusted main worker): :class:`ReconcileInventory` lists a runtime's
serving deployments and grants a probe of each; it judges what the probes found against
the runtime's restart policy, restarting (on a grant) or marking failed with the log
tail, appending each change to the audit trail and notifying the people who follow the
deployment's lifecycle. Only the runtime's own reconciler may call it: the chain of runs
a trusted worker started and recorded (:mod:`activities.reconciler_runs`).

It acts on nothing it is told: a finding counts only as :meth:`ReconcileInventory.observe`
returns it. A runtime this worker drives (its task queue is the main one) is probed again
through the driver, so health, log tail and endpoint are the driver's; a "restarted"
finding counts only for a restart the inventory granted to the calling run.

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
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError

from activities import admission
from activities.boundary import CallingRun, calling_run, mlc_errors
from activities.inventory import RETIRING, load_run
from activities.reconciler_runs import check_reconciler, ensure_reconciler
from activities.runtimes.base import OnlineDeployRequest, ProbeRequest
from activities.runtimes.registry import driver_for
from activities.traffic import RETIRE_AFTER
from mlc.config import Settings
from mlc.contracts.reconcile import PLAN as PLAN_CONTRACT
from mlc.contracts.reconcile import (
    PROBE,
    RESTART,
    SETTLE,
    Finding,
    Findings,
    GrantsInput,
    Plan,
    PlanInput,
    SettleInput,
    Settlement,
)
from mlc.domain import Deployment, DeploymentState, LifecycleState, Mode, ModelSnapshot, Runtime
from mlc.errors import DeploymentFailedError, RefusedError, RuntimeUnavailableError
from mlc.statements import Envelope
from mlc.store import audit, deployments, runs, runtimes, traffic, trail
from mlc.store.governance import GovernanceCache
from mlc.traffic import TrafficTable
from mlc.trust import evidence, grants
from mlc.trust.governance import Governance

RESTARTS = "restarts"
"""Deployment detail: restarts in a row without a healthy check in between."""
RESTART_GRANTED = "restart_granted_to"
"""Deployment detail: the reconciler run granted a restart not yet judged (None once judged)."""
DRIVER_FACTS = frozenset({"pid", "port", "log", "host", "container_id", "container_name"})
"""What a restart's ``details`` may add to the deployment: the drivers' facts, never the
inventory's own keys (``run_id``, ``restarts``, ...)."""
PARALLEL_PROBES = 8

log = logging.getLogger(__name__)


async def ensure_reconcilers(
    client: Client, settings: Settings, pool: asyncpg.Pool, *, nudge: bool = True
) -> list[str]:
    """Make sure every runtime with serving online deployments has its recorded reconciler
    running (``nudge``: checking at once); return their names.

    Workers call this when they start, so whatever died while no worker ran is noticed
    (and restarted, if the runtime says so) at once, and :func:`keeping_reconcilers` calls
    it (without nudging) every interval, so one terminated or displaced is back within one.
    """
    serving = await deployments.read_deployments(pool)
    known = {r.name for r in await runtimes.read_runtimes(pool)}  # a removed one has nothing to check
    names = sorted(
        {
            d.runtime
            for d in serving
            if d.state is DeploymentState.SERVING and d.mode is Mode.ONLINE and d.runtime in known
        }
    )
    for name in names:
        await ensure_reconciler(client, settings, pool, name, nudge=nudge)
    return names


@contextlib.asynccontextmanager
async def keeping_reconcilers(client: Client, settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[None]:
    """For the main worker's life: reconcile every serving runtime at once, then every
    ``reconcile_seconds`` bring back reconcilers someone terminated or displaced."""
    await ensure_reconcilers(client, settings, pool)
    keeper = asyncio.create_task(_keep_reconcilers(client, settings, pool))
    try:
        yield
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper


async def _keep_reconcilers(client: Client, settings: Settings, pool: asyncpg.Pool) -> None:
    while True:
        await asyncio.sleep(settings.reconcile_seconds)
        try:
            await ensure_reconcilers(client, settings, pool, nudge=False)
        except Exception:  # a keeper that died would stop self-healing for good
            log.exception("could not check the reconcilers; trying again in %ss", settings.reconcile_seconds)


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
        caller = await self._caller(request.runtime)
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
                as_of=table.decided_at or table.updated_at,
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
        """Judge each finding, as :meth:`observe` confirms it, against the runtime's restart
        policy and record the outcome."""
        caller = await self._caller(request.runtime)
        state = await self._state()
        runtime = state.runtimes.get(request.runtime)
        if runtime is None:
            return Settlement()
        remove: list[Envelope] = []
        judged: list[tuple[Deployment, Finding]] = []
        for claimed in request.findings:
            found = await deployments.read_deployment(self.pool, claimed.deployment_id)
            if found is None or found.runtime != runtime.name:
                continue  # not this reconciler's to judge
            if found.state is not DeploymentState.SERVING:  # retired or failed meanwhile
                remove.append(self._grant("undeploy", found, runtime, caller))  # whatever is left
            elif not found.details.get(RETIRING):  # else its lifecycle is removing it
                judged.append((found, claimed))
        limit = asyncio.Semaphore(PARALLEL_PROBES)

        async def observed(found: Deployment, claimed: Finding) -> Finding | None:
            if claimed.healthy and not claimed.restarted and not found.details.get(RESTARTS):
                return None  # nothing would change
            async with limit:
                return await self.observe(claimed, found, runtime, caller)

        findings = await asyncio.gather(*(observed(found, claimed) for found, claimed in judged))
        settlement = Settlement(remove=tuple(remove))
        for (found, _), finding in zip(judged, findings, strict=True):
            if finding is not None:
                settlement = await self._judge(settlement, found, finding, runtime, state, caller)
        return settlement

    async def observe(
        self, claimed: Finding, deployment: Deployment, runtime: Runtime, caller: CallingRun
    ) -> Finding | None:
        """The finding the inventory acts on for ``deployment``; None: nothing to judge now.

        The one place a reported finding is checked before it counts. A "restarted" one
        counts only for the restart the inventory granted to the calling run. On a runtime
        this worker drives (its task queue is the main one), health, detail, log tail and
        endpoint are a probe's through the driver, not what was reported (a runtime that
        cannot be asked now judges nothing). On a runtime served by its own worker, the
        finding is that worker's observation as its activity returned it: where a runtime
        signs its results, which must verify: signed by the runtime's evidence key for this
        run and deployment, number for number (else nothing is judged).
        """
        if claimed.restarted and deployment.details.get(RESTART_GRANTED) != caller.run_id:
            activity.logger.warning("reconciler: ignored a restart of %s it never granted", deployment.id)
            return None
        if runtime.task_queue != self.settings.task_queue:
            return await self._signed_finding(claimed, deployment, runtime, caller)
        request = ProbeRequest(deployment_id=deployment.id, runtime=runtime)
        try:
            probed = await driver_for(runtime, self.settings).probe(request)
        except RuntimeUnavailableError:
            return None
        return Finding(
            deployment_id=deployment.id,
            healthy=probed.healthy,
            detail=probed.detail,
            log_tail=probed.log_tail,
            restarted=claimed.restarted,
            endpoint=probed.endpoint,
            details=claimed.details,
        )

    async def _signed_finding(
        self, claimed: Finding, deployment: Deployment, runtime: Runtime, caller: CallingRun
    ) -> Finding | None:
        """``claimed`` when its runtime's evidence key signed exactly it for this run, else None."""
        try:
            claim = evidence.check_evidence(
                claimed.evidence,
                await self._state(),
                kind="restart" if claimed.restarted else "probe",
                workflow_id=caller.workflow_id,
                run_id=caller.run_id,
                runtime=runtime.name,
                deployment_id=deployment.id,
            )
            if claim.results != claimed.model_dump(mode="json", exclude={"evidence"}):
                raise RefusedError(f"the finding is not what runtime {runtime.name} signed")
        except RefusedError as exc:
            activity.logger.warning("reconciler: ignored a finding for %s: %s", deployment.id, exc)
            return None
        return claimed

    async def _judge(
        self,
        settled: Settlement,
        found: Deployment,
        finding: Finding,
        runtime: Runtime,
        state: Governance,
        caller: CallingRun,
    ) -> Settlement:
        """``settled`` with the outcome of one observed finding (recorded as it is decided)."""
        streak = int(found.details.get(RESTARTS) or 0)
        if finding.healthy:
            if finding.restarted and await self._restarted(found, finding, caller):
                return settled.model_copy(update={"restarted": (*settled.restarted, found.id)})
            if finding.restarted:  # retired or failed while it came back: take it down
                return self._removing(settled, found, runtime, caller)
            if streak:
                await deployments.update_serving(
                    self.pool, found.id, state=DeploymentState.SERVING, details={RESTARTS: 0}
                )
            return settled
        limit = runtime.restart_limit
        if limit is None or streak < limit:
            if finding.restarted:  # this attempt failed; the next round tries again
                await deployments.update_serving(
                    self.pool, found.id, state=DeploymentState.SERVING, details={RESTART_GRANTED: None}
                )
                return settled
            try:
                snapshot = await self._admitted(found, state)
            except RefusedError as exc:
                finding = finding.model_copy(update={"detail": f"{finding.detail}; not restarted: {exc}"})
            else:
                await deployments.update_serving(
                    self.pool,
                    found.id,
                    state=DeploymentState.SERVING,
                    details={
                        RESTARTS: streak + 1,
                        "last_failure": finding.detail,
                        RESTART_GRANTED: caller.run_id,
                    },
                )
                grant = self._grant("restart", found, runtime, caller, snapshot=snapshot)
                return settled.model_copy(update={"restart": (*settled.restart, grant)})
        if await self._failed(found, finding, runtime, caller, streak):
            settled = settled.model_copy(update={"failed": (*settled.failed, found.id)})
        return self._removing(settled, found, runtime, caller)  # whatever is left of it

    def _removing(
        self, settled: Settlement, found: Deployment, runtime: Runtime, caller: CallingRun
    ) -> Settlement:
        grant = self._grant("undeploy", found, runtime, caller)
        return settled.model_copy(update={"remove": (*settled.remove, grant)})

    # --- outcomes -----------------------------------------------------------------------

    async def _restarted(self, found: Deployment, finding: Finding, caller: CallingRun) -> bool:
        """Record a deployment that is back up; False when it stopped serving meanwhile."""
        updated = await deployments.update_serving(
            self.pool,
            found.id,
            state=DeploymentState.SERVING,
            endpoint=finding.endpoint,
            details={
                **{k: v for k, v in finding.details.items() if k in DRIVER_FACTS},
                "restarted_at": datetime.now(UTC).isoformat(),
                RESTART_GRANTED: None,
            },
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

    async def _caller(self, runtime: str) -> CallingRun:
        """The calling run, which must be of the chain a trusted worker started as this
        runtime's reconciler (see :func:`activities.reconciler_runs.check_reconciler`)."""
        caller = calling_run()
        await check_reconciler(self.pool, self.settings, runtime, caller)
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
            return self._signed(
                grant,
                Finding(
                    deployment_id=grant.deployment_id,
                    healthy=result.healthy,
                    detail=result.detail,
                    log_tail=result.log_tail,
                    endpoint=result.endpoint,
                ),
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
                failed = Finding(
                    deployment_id=grant.deployment_id, healthy=False, restarted=True, detail=str(exc)
                )
                findings.append(self._signed(grant, failed))
                continue
            back = Finding(
                deployment_id=grant.deployment_id,
                healthy=True,
                restarted=True,
                endpoint=result.endpoint,
                details=result.details,
            )
            findings.append(self._signed(grant, back))
        return Findings(findings=tuple(findings))

    def _signed(self, grant: grants.RuntimeGrant, finding: Finding) -> Finding:
        """``finding`` signed by the granted runtime's evidence key (what the inventory verifies)."""
        facts = finding.model_dump(mode="json", exclude={"evidence"})
        kind: evidence.EvidenceKind = "restart" if finding.restarted else "probe"
        return finding.model_copy(
            update={"evidence": evidence.sign_granted(self.settings.home, grant, kind, facts)}
        )

    def _granted(self, envelope: Envelope, action: grants.RuntimeAction) -> grants.RuntimeGrant:
        if self._public is None:
            self._public = grants.platform_public_key(self.settings.platform_key_path)
        return grants.check(envelope, self._public, action=action, run_id=calling_run().run_id)
