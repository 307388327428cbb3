"""Rollback activities (trusted main worker): verify a signed rollback and let its run route.

A rollback is a decision like an approval: :meth:`RollbackInventory.verify_rollback`
checks the signed statement (signature, the key registered and not revoked, the signer
allowed at the stage's gate by the stage policy, not expired, nonce unused) and resolves
the version to put back from the audit trail's traffic history: the version that answered
the stage's stable endpoints before the current one, or the named one, which must have
answered that stage before. It records the rollback's run for that snapshot (deployments
and traffic changes reference a run) and the decision, with its envelope, signer and
reason, in the trail, before anything moves.

The rollback's run then uses the ordinary contracts: ``authorize_deployment`` (cold) and
``authorize_traffic`` admit that run's snapshot into a protected stage because its verified
rollback decision names it (:func:`activities.admission.rollback_admits`), and
:meth:`RollbackInventory._may_route_other` lets it put the target's warm deployment, made
by another run, back behind the endpoint: exactly that version, nothing else.
"""

from __future__ import annotations

from datetime import UTC, datetime

from activities import admission
from activities.admission import RunContext
from activities.boundary import calling_run, mlc_errors
from activities.inventory import RETIRING
from activities.traffic import TrafficInventory
from mlc import names
from mlc.contracts import rollback as rb
from mlc.domain import Deployment, DeploymentState, Mode, Runtime, TrafficRoute
from mlc.errors import ConflictError, NoRuntimeError, RefusedError
from mlc.store import deployments, runs, snapshots, traffic, trail
from mlc.store.trail import Entry
from mlc.trust.governance import Governance


class RollbackInventory(TrafficInventory):
    """The traffic activities, plus what a verified rollback decision allows."""

    @rb.VERIFY_ROLLBACK.implement
    @mlc_errors
    async def verify_rollback(self, request: rb.VerifyRollbackInput) -> rb.VerifyRollbackResult:
        """Verify and record a signed rollback; say per gateway runtime where the target is warm.

        Raises:
            RefusedError: naming the first check that failed; nothing is recorded then.
        """
        info = calling_run()
        if info.workflow_type != names.ROLLBACK:
            raise RefusedError(f"only a {names.ROLLBACK} run verifies rollbacks, not {info.workflow_type}")
        state = await self._state()
        signer, decision = admission.check_rollback(request.envelope, state)
        now = datetime.now(UTC)
        admission.check_fresh(decision, now)
        model, stage = decision.model, decision.stage
        history = [
            e
            for e in await trail.read_entries(self.pool, kinds=(trail.TRAFFIC,), model=model)
            if e.data().get("stage") == stage
        ]
        primaries = _primaries(history)
        current = primaries[-1] if primaries else None
        if decision.version is None:
            version = previous_version(
                [(str(e.data().get("runtime")), e.data().get("routes") or []) for e in history],
                what=f"{model} in {stage}",
            )
        else:
            version = decision.version
            if version not in _served(history):
                raise RefusedError(
                    f"{model}@{version} never served {stage}: a rollback puts back a version that answered "
                    f"that stage's stable endpoints before (see `mlc history {model} --stage {stage}`)"
                )
        if version == current:
            raise RefusedError(f"{model}@{version} already answers {stage}'s stable endpoints")
        snap = await snapshots.read_snapshot(self.pool, model, version)
        subjects = {s.digest.get("sha256") for s in request.envelope.statement().subject} - {None}
        if not subjects <= {snap.sha256}:
            raise RefusedError(
                f"the statement is for snapshot sha256 {', '.join(sorted(str(s) for s in subjects))}, "
                f"not {model}@{version} (sha256 {snap.sha256})"
            )
        targets = await self._targets(state, snap.model, snap.service_tags, stage, version)
        active = await runs.find_active_run(self.pool, model, version)
        if active is not None and (active["workflow_id"], active["run_id"]) != (
            info.workflow_id,
            info.run_id,
        ):
            raise ConflictError(
                f"{model}@{version} has a running lifecycle ({active['workflow_id']}); it owns that "
                "snapshot's deployments until it ends: wait for it or terminate it, then roll back"
            )
        await self._append(
            trail.DECISION,
            {
                "stage": stage,
                "decision": "rollback",
                "approver": signer.name,
                "comment": decision.reason,
                "decided_at": now.isoformat(),
                "key_id": request.envelope.signatures[0].keyid,
                "version": version,
                "sha256": snap.sha256,
                "replaces": current,
                "cold": [t.runtime.name for t in targets if t.warm is None],
                "evidence_sha256": None,
            },
            model=model,
            version=version,
            envelope=request.envelope,
            nonce=decision.nonce,
        )
        await runs.start_run(
            self.pool,
            workflow_id=info.workflow_id,
            run_id=info.run_id,
            model=model,
            version=version,
            lifecycle=names.ROLLBACK,
            started_by=signer.name,
        )
        return rb.VerifyRollbackResult(
            snapshot=snap,
            stage=stage,
            signer=signer.name,
            reason=decision.reason,
            replaces=current,
            targets=targets,
        )

    async def _targets(
        self, state: Governance, model: str, tags: tuple[str, ...], stage: str, version: int
    ) -> tuple[rb.RollbackTarget, ...]:
        """Per gateway runtime of ``stage`` serving the model: the target's warm deployment or none."""
        recorded = {t.runtime: t for t in await traffic.read_traffic(self.pool, model=model, stage=stage)}
        found = []
        for runtime in sorted(state.runtimes.values(), key=lambda r: r.name):
            if runtime.gateway is None or runtime.stage != stage:
                continue
            table = recorded.get(runtime.name)
            if table is None and not runtime.serves(stage=stage, service_tags=tags, mode=Mode.ONLINE):
                continue
            found.append(
                rb.RollbackTarget(
                    runtime=runtime,
                    warm=await self._warm(runtime, model, stage, version),
                    routes=table.routes if table else (),
                )
            )
        if not found:
            raise NoRuntimeError(
                f"no runtime of {stage} with a gateway serves {model}: a rollback moves stable "
                f"endpoints (add one with `mlc runtime add NAME --stage {stage} --gateway-port PORT`)"
            )
        return tuple(found)

    async def _warm(self, runtime: Runtime, model: str, stage: str, version: int) -> Deployment | None:
        """The newest live online deployment of ``model@version`` on ``runtime``, if any."""
        live = [
            d
            for d in await deployments.read_deployments(
                self.pool, model=model, stage=stage, runtime=runtime.name
            )
            if d.version == version
            and d.mode is Mode.ONLINE
            and d.state is DeploymentState.SERVING
            and not d.details.get(RETIRING)
        ]
        return live[-1] if live else None

    async def _may_route_other(
        self, run: RunContext, state: Governance, runtime: Runtime, deployment: Deployment
    ) -> bool:
        """A rollback's run may route the target's warm deployment, made by another run.

        Only for the version its verified decision resolved to (the run's snapshot), and
        only while that decision still verifies (a key revoked since refuses it).
        """
        if run.lifecycle != admission.ROLLBACK_LIFECYCLE:
            return await super()._may_route_other(run, state, runtime, deployment)
        if (deployment.model, deployment.version) != (run.snapshot.model, run.snapshot.version):
            return False
        decisions = await trail.read_entries(
            self.pool, kinds=(trail.DECISION,), workflow_id=run.workflow_id, run_id=run.run_id
        )
        return admission.rollback_admits(decisions, run, state, stage=deployment.stage)


def _answering(routes: list[dict[str, object]]) -> list[TrafficRoute]:
    """The routes that answer (not shadows, a share above 0), as recorded."""
    parsed = [TrafficRoute.model_validate(r) for r in routes]
    return [r for r in parsed if not r.shadow and r.weight > 0]


def _primaries(history: list[Entry]) -> list[int]:
    """The version with the largest share after each traffic change, repeats collapsed."""
    return _primary_versions([e.data().get("routes") or [] for e in history])


def _primary_versions(changes: list[list[dict[str, object]]]) -> list[int]:
    found: list[int] = []
    for routes in changes:
        answering = _answering(routes)
        if not answering:
            continue
        primary = max(answering, key=lambda r: r.weight).version
        if not found or found[-1] != primary:
            found.append(primary)
    return found


def previous_version(changes: list[tuple[str, list[dict[str, object]]]], *, what: str) -> int:
    """The version a plain rollback puts back: on each runtime, the last one that answered
    before the one answering now, which must be the same on every runtime of the stage
    (``changes``: each traffic change's runtime and routes, oldest first).

    Raises:
        RefusedError: no runtime had an earlier version, or the runtimes disagree (then
            ``--to`` must name one).
    """
    by_runtime: dict[str, list[list[dict[str, object]]]] = {}
    for runtime, routes in changes:
        by_runtime.setdefault(runtime, []).append(routes)
    earlier: dict[str, int] = {}
    for runtime, runtime_changes in sorted(by_runtime.items()):
        versions = _primary_versions(runtime_changes)
        before = [v for v in versions if v != versions[-1]]
        if before:
            earlier[runtime] = before[-1]
    if not earlier:
        raise RefusedError(
            f"no version of {what} answered its stable endpoints before the current one: nothing to "
            "roll back to (see `mlc history`)"
        )
    if len(set(earlier.values())) > 1:
        shown = ", ".join(f"{runtime}: v{version}" for runtime, version in earlier.items())
        raise RefusedError(
            f"the runtimes of {what} had different versions before the current ones ({shown}): "
            "name the one to put back with --to"
        )
    return next(iter(earlier.values()))


def _served(history: list[Entry]) -> set[int]:
    """Every version that ever answered in ``history`` with a share."""
    return {r.version for e in history for r in _answering(e.data().get("routes") or [])}
