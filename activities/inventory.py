"""Inventory activities: the only way workflows read or write PostgreSQL."""

from __future__ import annotations

import asyncpg
from temporalio import activity

from activities.boundary import mlc_errors
from mlc import names
from mlc.domain import Runtime
from mlc.errors import NoRuntimeError
from mlc.payloads import (
    BeginRunInput,
    BeginRunResult,
    FindDeploymentsInput,
    FindDeploymentsResult,
    LoadLifecycleInput,
    LoadLifecycleResult,
    NotifyInput,
    RecordDecisionInput,
    RecordDeploymentInput,
    RecordRunInput,
    RecordTestsInput,
    ResolveApproversInput,
    ResolveApproversResult,
    ResolveRuntimesInput,
    ResolveRuntimesResult,
)
from mlc.store import audit, deployments, lifecycle_definitions, principals, runs, runtimes, snapshots


class InventoryActivities:
    """Activities over one asyncpg pool, opened and closed by the worker."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @activity.defn(name=names.BEGIN_RUN)
    @mlc_errors
    async def begin_run(self, request: BeginRunInput) -> BeginRunResult:
        """Load the snapshot and claim it: a snapshot runs one lifecycle at a time."""
        snapshot = await snapshots.read_snapshot(self.pool, request.model, request.version)
        await runs.start_run(
            self.pool,
            workflow_id=request.workflow_id,
            run_id=request.run_id,
            model=request.model,
            version=request.version,
            lifecycle=request.lifecycle,
        )
        return BeginRunResult(snapshot=snapshot)

    @activity.defn(name=names.RECORD_RUN)
    @mlc_errors
    async def record_run(self, request: RecordRunInput) -> None:
        """Record a run's state and stage (and its end)."""
        await runs.update_run(
            self.pool,
            workflow_id=request.workflow_id,
            run_id=request.run_id,
            state=request.state.value,
            stage=request.stage,
            reason=request.reason,
            ended=request.ended,
        )

    @activity.defn(name=names.RESOLVE_RUNTIMES)
    @mlc_errors
    async def resolve_runtimes(self, request: ResolveRuntimesInput) -> ResolveRuntimesResult:
        """The stage's runtimes serving the snapshot's service tags, or a clear error."""
        snap = request.snapshot
        candidates = await runtimes.read_runtimes(self.pool, stage=request.stage)
        matching = tuple(
            r
            for r in candidates
            if r.serves(stage=request.stage, service_tags=snap.service_tags, mode=request.mode)
        )
        if not matching:
            raise NoRuntimeError(_no_runtime_message(request, candidates))
        return ResolveRuntimesResult(runtimes=matching)

    @activity.defn(name=names.RECORD_DEPLOYMENT)
    @mlc_errors
    async def record_deployment(self, request: RecordDeploymentInput) -> None:
        """Upsert a deployment's state, endpoint and details."""
        await deployments.upsert_deployment(self.pool, request.deployment)

    @activity.defn(name=names.FIND_DEPLOYMENTS)
    @mlc_errors
    async def find_live_deployments(self, request: FindDeploymentsInput) -> FindDeploymentsResult:
        """Live deployments of a model in a stage (the versions a promotion replaces)."""
        found = await deployments.read_deployments(self.pool, model=request.model, stage=request.stage)
        return FindDeploymentsResult(deployments=tuple(d for d in found if d.id not in request.exclude_ids))

    @activity.defn(name=names.RECORD_TESTS)
    @mlc_errors
    async def record_test_report(self, request: RecordTestsInput) -> None:
        """Store a stage's test results in the audit trail."""
        await audit.record_test_report(
            self.pool,
            workflow_id=request.workflow_id,
            run_id=request.run_id,
            model=request.model,
            version=request.version,
            report=request.report,
        )

    @activity.defn(name=names.RECORD_DECISION)
    @mlc_errors
    async def record_decision(self, request: RecordDecisionInput) -> None:
        """Store a gate decision, with its evidence, in the audit trail."""
        await audit.record_decision(
            self.pool,
            workflow_id=request.workflow_id,
            run_id=request.run_id,
            model=request.model,
            version=request.version,
            record=request.record,
        )

    @activity.defn(name=names.RESOLVE_APPROVERS)
    @mlc_errors
    async def resolve_approvers(self, request: ResolveApproversInput) -> ResolveApproversResult:
        """Expand ``role:NAME`` entries into the identities holding that role now."""
        identities = await principals.resolve_identities(self.pool, request.entries)
        return ResolveApproversResult(identities=tuple(identities))

    @activity.defn(name=names.NOTIFY)
    @mlc_errors
    async def notify(self, request: NotifyInput) -> None:
        """Store a notification and log it (a hook for mail or chat integrations)."""
        activity.logger.info("notify %s: %s", request.workflow_id, request.message)
        await audit.create_notification(
            self.pool,
            workflow_id=request.workflow_id,
            model=request.model,
            version=request.version,
            message=request.message,
        )

    @activity.defn(name=names.LOAD_LIFECYCLE)
    @mlc_errors
    async def load_lifecycle_definition(self, request: LoadLifecycleInput) -> LoadLifecycleResult:
        """The newest uploaded version of a lifecycle, read once per run.

        Its result is in the run's history, so replays and restarted workers run the
        same version even after a newer one is uploaded; an unknown name fails at once.
        """
        found = await lifecycle_definitions.read_lifecycle_definition(self.pool, request.name)
        return LoadLifecycleResult(
            name=found.name, version=found.version, sha256=found.sha256, source=found.source
        )


def _no_runtime_message(request: ResolveRuntimesInput, candidates: list[Runtime]) -> str:
    snap = request.snapshot
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
        f"no runtime serves service tag {tags} in stage {request.stage} "
        f"(mode {request.mode.value}) for {snap.model}@{snap.version}{seen}; add one with "
        f"`mlc runtime add NAME --stage {request.stage} --tag {snap.service_tags[0]}`"
    )
