"""Traffic activities (trusted main worker): authorize, record and read stable endpoints.

A traffic change is authorize -> route -> record (see :mod:`mlc.contracts.traffic`). Both
inventory steps treat the payload as hostile: the run comes from Temporal's activity
info, the runtime from the verified governance state, each route from the deployments
table, and the routes are checked again when recorded, so the table never says more than
was allowed.

What a run may put behind its model's endpoint on a runtime of a stage: live online
deployments of its own model on that runtime, where every version not answering there
already is the run's own (it puts its tested deployment behind the endpoint, and keeps
or gives back shares of the current ones). A version that answers no longer (an older
one in warm standby) needs more: :meth:`TrafficInventory._may_route_other` is the hook
where a verified rollback decision allows it.

When a change is recorded, deployments of the model on the runtime that no longer answer
get a ``retire_after`` time (now + the stage's grace) and the runtime's reconciler retires
them once it has passed, unless they answer again or their own lifecycle still runs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
from temporalio import activity

from activities import admission
from activities.admission import RunContext
from activities.boundary import calling_run, mlc_errors
from activities.inventory import RETIRING, InventoryActivities, _registered
from activities.reconciler_runs import ensure_reconciler
from activities.runtimes.base import check_deployment_id
from mlc.contracts import traffic as tr
from mlc.contracts.inventory import RuntimeGrantResult
from mlc.domain import Deployment, DeploymentState, Mode, Runtime, TrafficRoute, check_routes
from mlc.errors import RefusedError
from mlc.store import deployments, traffic, trail
from mlc.traffic import TrafficTable, describe_routes
from mlc.trust import evidence, grants
from mlc.trust.governance import Governance

RETIRE_AFTER = "retire_after"
"""Deployment detail (ISO time): it stopped answering its model's stable endpoint and stays
warm until then; afterwards the runtime's reconciler retires it (unless it answers again
or its own lifecycle still runs). None while it answers."""

CAUSE_LIMIT = 500
"""Longest cause kept in the trail (lifecycle code writes it)."""


class TrafficInventory(InventoryActivities):
    """The traffic activities over the inventory (the workers' least-privilege pool)."""

    @tr.AUTHORIZE_TRAFFIC.implement
    @mlc_errors
    async def authorize_traffic(self, request: tr.AuthorizeTrafficInput) -> RuntimeGrantResult:
        """Check the routes against the inventory and sign a ``route_traffic``/``observe_traffic`` grant.

        Raises:
            RefusedError: naming the first check that failed.
        """
        run, state = await self._run(), await self._state()
        runtime, routed = await self._check(
            run, state, request.stage, request.runtime, request.routes, request.action
        )
        grant = grants.RuntimeGrant(
            action=request.action,
            deployment_id=_primary(request.routes) or run.snapshot.model,
            runtime=runtime,
            stage=request.stage,
            mode=Mode.ONLINE,
            model=run.snapshot.model,
            routes=request.routes,
            workflow_id=run.workflow_id,
            run_id=run.run_id,
            as_of=datetime.now(UTC),
            expires_at=datetime.now(UTC) + grants.GRANT_LIFETIME,
        )
        return RuntimeGrantResult(grant=grants.issue(self._platform_key, grant))

    @tr.VERIFY_OBSERVATIONS.implement
    @mlc_errors
    async def verify_observations(self, request: tr.VerifyObservationsInput) -> None:
        """Refuse unless each observation is, number for number, what the runtime of
        ``stage`` whose gateway serves its endpoint signed for this run (a Temporal client
        answering ``observe_traffic``, or another runtime's key, cannot make a canary step
        pass).

        Raises:
            RefusedError: naming the first observation that does not verify.
        """
        run, state = await self._run(), await self._state()
        for seen in request.observations:
            claim = evidence.check_observation(
                seen.evidence,
                state,
                model=run.snapshot.model,
                workflow_id=run.workflow_id,
                run_id=run.run_id,
                stage=request.stage,
            )
            if claim.results != seen.model_dump(mode="json", exclude={"evidence"}):
                raise RefusedError(
                    f"the observation of {seen.endpoint} is not what runtime {claim.runtime} signed"
                )

    @tr.RECORD_TRAFFIC.implement
    @mlc_errors
    async def record_traffic(self, request: tr.RecordTrafficInput) -> None:
        """Store the routes now live (checked again) and append a ``traffic`` trail entry.

        Deployments of the model on the runtime that stop answering stay warm for
        ``grace``; those answering lose any ``retire_after`` mark.

        Changes of one endpoint are ordered by when they were decided (the ``as_of`` of the
        grant they were applied with, verified here): one recorded after a newer decision
        leaves the table and the marks as they are, and its trail entry says which change
        superseded it (the gateway did the same: it applies the newest decision).
        """
        run, state = await self._run(), await self._state()
        model = run.snapshot.model
        runtime, _ = await self._check(
            run, state, request.stage, request.runtime, request.routes, "route_traffic"
        )
        assert runtime.gateway is not None  # checked
        decided = self._decided(request, run, model)
        endpoint = runtime.gateway.endpoint(model)
        async with self.pool.acquire() as conn, conn.transaction():
            previous = await traffic.read_one(conn, runtime.name, model, lock=True)
            stored = await traffic.upsert_traffic(
                conn,
                runtime=runtime.name,
                model=model,
                stage=request.stage,
                routes=request.routes,
                endpoint=endpoint,
                workflow_id=run.workflow_id,
                run_id=run.run_id,
                decided_at=decided,
            )
            if stored is not None:
                await self._mark_standbys(conn, model, runtime, request)
            elif previous is None:  # both first changes of the endpoint at once: the other's row
                previous = await traffic.read_one(conn, runtime.name, model)
        cause, shares = request.cause[:CAUSE_LIMIT], describe_routes(request.routes)
        entry: dict[str, Any] = {
            "event": "routed",
            "stage": request.stage,
            "runtime": runtime.name,
            "endpoint": endpoint,
            "routes": [r.model_dump(mode="json") for r in request.routes],
            "previous": [r.model_dump(mode="json") for r in (previous.routes if previous else ())],
            "shares": shares,
            "cause": cause,
            "actor": self._actor(run, request),
            "grace_seconds": request.grace.total_seconds(),
            "decided": (stored and stored.decided_at or decided or datetime.now(UTC)).isoformat(),
        }
        if stored is None and previous is not None:
            newer = {
                "workflow_id": previous.workflow_id,
                "run_id": previous.run_id,
                "shares": describe_routes(previous.routes),
                "decided": previous.decided_at.isoformat() if previous.decided_at else None,
            }
            entry["superseded_by"] = newer
        await self._append(trail.TRAFFIC, entry, run=run)
        if stored is None:
            activity.logger.info(
                "traffic %s on %s: %s (%s), superseded by the newer %s",
                model, runtime.name, shares, cause, entry.get("superseded_by", {}).get("shares"),
            )  # fmt: skip
            return
        activity.logger.info("traffic %s on %s: %s (%s)", model, runtime.name, shares, cause)
        # its reconciler retires what stopped answering once the grace has passed
        await ensure_reconciler(activity.client(), self.settings, self.pool, runtime.name)

    def _decided(self, request: tr.RecordTrafficInput, run: RunContext, model: str) -> datetime | None:
        """When the change was authorized: the ``as_of`` of its verified ``route_traffic``
        grant, which must be this run's for these routes (None: no grant sent, as by runs
        started before it was).

        Raises:
            RefusedError: the grant does not verify or is for another change.
        """
        if request.grant is None:
            return None
        grant = grants.check(
            request.grant,
            self._platform_key.public_key(),
            action="route_traffic",
            run_id=run.run_id,
        )
        if grant.model != model or grant.runtime.name != request.runtime or grant.routes != request.routes:
            raise RefusedError("the route_traffic grant sent with the record is for another change")
        return grant.as_of

    async def _mark_standbys(
        self, conn: asyncpg.Connection, model: str, runtime: Runtime, request: tr.RecordTrafficInput
    ) -> None:
        """``retire_after`` on the model's deployments here that stop answering; cleared on
        those answering (in the transaction holding the table's row: marks follow the
        table's order)."""
        answering = {r.deployment_id for r in request.routes}
        retire_after = datetime.now(UTC) + request.grace
        for d in await deployments.read_deployments(conn, model=model, runtime=runtime.name):
            if d.mode is not Mode.ONLINE or d.state is not DeploymentState.SERVING:
                continue
            marked = d.details.get(RETIRE_AFTER)
            if d.id in answering and marked is not None:
                await deployments.update_serving(
                    conn, d.id, state=DeploymentState.SERVING, details={RETIRE_AFTER: None}
                )
            elif d.id not in answering and marked is None:
                await deployments.update_serving(
                    conn,
                    d.id,
                    state=DeploymentState.SERVING,
                    details={RETIRE_AFTER: retire_after.isoformat()},
                )

    @tr.READ_TRAFFIC.implement
    @mlc_errors
    async def read_traffic(self, request: tr.ReadTrafficInput) -> tr.ReadTrafficResult:
        """The stable endpoints of this run's model on every gateway runtime of the stage."""
        run, state = await self._run(), await self._state()
        model = run.snapshot.model
        recorded = {
            t.runtime: t for t in await traffic.read_traffic(self.pool, model=model, stage=request.stage)
        }
        tables = []
        for runtime in sorted(state.runtimes.values(), key=lambda r: r.name):
            if runtime.gateway is None or runtime.stage != request.stage:
                continue
            found = recorded.get(runtime.name)
            serves = runtime.serves(
                stage=request.stage, service_tags=run.snapshot.service_tags, mode=Mode.ONLINE
            )
            if found is None and not serves:
                continue
            tables.append(
                found
                or TrafficTable(
                    runtime=runtime.name,
                    model=model,
                    stage=request.stage,
                    endpoint=runtime.gateway.endpoint(model),
                )
            )
        return tr.ReadTrafficResult(tables=tuple(tables))

    # --- checks -------------------------------------------------------------------------

    async def _check(
        self,
        run: RunContext,
        state: Governance,
        stage: str,
        runtime_name: str,
        routes: tuple[TrafficRoute, ...],
        action: grants.RuntimeAction,
    ) -> tuple[Runtime, TrafficTable | None]:
        """The runtime, and its current table, if ``run`` may set (or observe) ``routes`` there.

        Raises:
            RefusedError: naming the first check that failed.
        """
        model = run.snapshot.model
        runtime = _registered(state, runtime_name)
        if runtime.stage != stage:
            raise RefusedError(f"runtime {runtime.name} serves stage {runtime.stage}, not {stage}")
        if runtime.gateway is None:
            raise RefusedError(
                f"runtime {runtime.name} has no gateway, so {model} has no stable endpoint there; "
                f"add one with `mlc runtime add {runtime.name} --stage {stage} --gateway-port PORT --replace`"
            )
        try:
            check_routes(routes)
        except ValueError as exc:
            raise RefusedError(f"routes for {model} on runtime {runtime.name}: {exc}") from None
        current = await traffic.read_one(self.pool, runtime.name, model)
        routed = current.routed_ids if current else frozenset()
        for route in routes:
            deployment = await self._live(run, runtime, stage, route)
            if action != "route_traffic" or deployment.id in routed:
                continue
            if deployment.details.get("run_id") == run.run_id:
                continue
            if not await self._may_route_other(run, state, runtime, deployment):
                raise RefusedError(
                    f"deployment {deployment.id} ({deployment.model}@{deployment.version}) does not answer "
                    f"{model}'s endpoint on runtime {runtime.name} now and belongs to another run: a run may "
                    "route its own deployments and keep or give back the current ones (use `mlc rollback` "
                    "for a previous version)"
                )
        if action == "route_traffic":
            decisions = await trail.read_entries(
                self.pool, kinds=(trail.DECISION,), workflow_id=run.workflow_id, run_id=run.run_id
            )
            admission.admit(decisions, run, state, stage=stage)
        return runtime, current

    async def _live(self, run: RunContext, runtime: Runtime, stage: str, route: TrafficRoute) -> Deployment:
        """The route's deployment: a live online deployment of this run's model on ``runtime``."""
        deployment_id = check_deployment_id(route.deployment_id)
        found = await deployments.read_deployment(self.pool, deployment_id)
        model = run.snapshot.model
        if found is None:
            raise RefusedError(f"deployment {deployment_id} does not exist; see `mlc deployments {model}`")
        if found.model != model:
            raise RefusedError(f"deployment {deployment_id} is of model {found.model}, not {model}")
        if found.runtime != runtime.name or found.stage != stage:
            raise RefusedError(
                f"deployment {deployment_id} runs on runtime {found.runtime} in {found.stage}, "
                f"not on {runtime.name} in {stage}"
            )
        if (
            found.mode is not Mode.ONLINE
            or found.state is not DeploymentState.SERVING
            or found.details.get(RETIRING)
        ):
            what = (
                "being retired" if found.details.get(RETIRING) else f"{found.mode.value}, {found.state.value}"
            )
            raise RefusedError(f"deployment {deployment_id} is not a live online deployment ({what})")
        if found.version != route.version:
            raise RefusedError(
                f"deployment {deployment_id} is {model}@{found.version}, not version {route.version}"
            )
        return found

    async def _may_route_other(
        self, run: RunContext, state: Governance, runtime: Runtime, deployment: Deployment
    ) -> bool:
        """Hook: may ``run`` put another run's deployment, not answering now, behind the endpoint?

        Never, for a lifecycle run: it would bring back a version nobody decided on now. The
        rollback workflow overrides this after verifying a signed rollback decision for that
        version (and names the signer in :meth:`_actor`).
        """
        return False

    def _actor(self, run: RunContext, request: tr.RecordTrafficInput) -> str:
        """Who caused a change: the run's starter (the rollback's signer, where a decision allows it)."""
        return run.started_by or calling_run().workflow_id


def _primary(routes: tuple[TrafficRoute, ...]) -> str | None:
    """The answering route with the largest share (the grant's subject)."""
    answering = sorted((r for r in routes if not r.shadow), key=lambda r: -r.weight)
    return answering[0].deployment_id if answering else None
