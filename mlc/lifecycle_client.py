"""Client-side lifecycle operations shared by the CLI, the demo, tests and benchmarks:
start a run, find it, query it, and send decisions to its gates."""

from __future__ import annotations

import asyncpg
from pydantic import BaseModel
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from mlc import names
from mlc.contracts.lifecycle import LifecycleStatus, SignedDecision, StartLifecycleInput, evidence_digest
from mlc.domain import (
    ApprovalRecord,
    Decision,
    LifecycleSpec,
    LifecycleState,
    ModelRef,
    StageTestReport,
)
from mlc.errors import ConflictError, MLCError, NotFoundError
from mlc.statements import Envelope
from mlc.store import runs, snapshots, trail
from mlc.trust.signer import Signer


async def start_lifecycle(
    client: Client,
    ref: ModelRef,
    *,
    task_queue: str,
    lifecycle: str = names.STANDARD_LIFECYCLE,
    spec: LifecycleSpec | None = None,
) -> WorkflowHandle[object, object]:
    """Start ``lifecycle`` for a snapshot under its business-key workflow id.

    ``task_queue`` is the main queue: built-in lifecycles start there, uploaded ones on its
    ``-lifecycles`` sibling, where only the sandboxed lifecycle worker runs their code.
    """
    workflow_id = names.workflow_id_for(ref.model, ref.version)
    try:
        return await client.start_workflow(
            lifecycle,
            StartLifecycleInput(model=ref.model, version=ref.version, spec=spec),
            id=workflow_id,
            task_queue=names.lifecycle_task_queue(lifecycle, task_queue),
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
        )
    except WorkflowAlreadyStartedError:
        raise ConflictError(
            f"{ref} already has a running lifecycle ({workflow_id}); see `mlc status {ref}`"
        ) from None


async def find_handle(client: Client, pool: asyncpg.Pool, ref: ModelRef) -> WorkflowHandle[object, object]:
    """The newest run of a snapshot, however it was started (CLI or Web UI with any id)."""
    active = await runs.find_active_run(pool, ref.model, ref.version)
    if active is None:
        recent = await runs.read_runs(pool, model=ref.model, version=ref.version)
        if not recent:
            raise NotFoundError(f"{ref} has no lifecycle run; start one with `mlc lifecycle start {ref}`")
        active = recent[0]
    return client.get_workflow_handle(active["workflow_id"], run_id=active["run_id"])


async def read_status(handle: WorkflowHandle[object, object]) -> LifecycleStatus | None:
    """The run's ``status`` query result (None before the run has begun)."""
    status: LifecycleStatus | None = await handle.query("status", result_type=LifecycleStatus)
    return status


async def recorded_status(
    pool: asyncpg.Pool, handle: WorkflowHandle[object, object]
) -> LifecycleStatus | None:
    """The run's status with the test reports the inventory recorded in the trail.

    Those hold only results a runtime signed and the inventory verified (others show as
    refused); the run's own ``status`` query is what its workflow code says, which for
    uploaded lifecycle code is not evidence. Approvals are signed on these reports.
    """
    status = await read_status(handle)
    if status is None:
        return None
    run_id = handle.run_id or (await handle.describe()).run_id
    if run_id is None:
        return status
    latest: dict[str, StageTestReport] = {}
    for entry in await trail.read_entries(
        pool, kinds=(trail.TEST_REPORT,), workflow_id=handle.id, run_id=run_id
    ):
        body = entry.data()
        latest[str(body.get("stage"))] = StageTestReport.model_validate(body.get("report"))
    return status.model_copy(update={"reports": tuple(latest.values())})


class DecisionContext(BaseModel):
    """What an approver signs a decision on: the gate's run, its snapshot and the evidence
    the inventory recorded (``GET .../decision-context`` hands it to API clients)."""

    status: LifecycleStatus
    sha256: str
    workflow_id: str
    run_id: str


async def decision_context(
    client: Client, pool: asyncpg.Pool, ref: ModelRef, *, stage: str
) -> tuple[WorkflowHandle[object, object], DecisionContext]:
    """The run of ``ref`` waiting at ``stage``, and what a decision there is signed on.

    Raises:
        ConflictError: the run is not waiting at ``stage``.
    """
    handle = await find_handle(client, pool, ref)
    status = await recorded_status(pool, handle)
    gate = status.pending_gate if status else None
    if status is not None and status.state in (LifecycleState.SUCCEEDED, LifecycleState.FAILED):
        raise ConflictError(f"{ref}: the lifecycle has already finished ({status.state.value})")
    if status is None or gate is None:
        doing = f"{status.state.value} in {status.stage}" if status and status.stage else "starting"
        raise ConflictError(f"{ref} is not waiting for a decision (it is {doing})")
    if gate.stage != stage:
        raise ConflictError(f"{ref} is waiting for a decision at {gate.stage}, not {stage}")
    snapshot = await snapshots.read_snapshot(pool, ref.model, ref.version)
    run_id = handle.run_id or (await handle.describe()).run_id
    if run_id is None:
        raise ConflictError(f"{ref}'s run has not begun yet")
    return handle, DecisionContext(
        status=status, sha256=snapshot.sha256, workflow_id=handle.id, run_id=run_id
    )


def sign_in_context(
    signer: Signer,
    context: DecisionContext,
    *,
    stage: str,
    decision: Decision,
    comment: str = "",
    evidence: str | None = None,
) -> Envelope:
    """``signer``'s decision at ``stage`` on exactly the evidence ``context`` shows.

    ``evidence`` (``sha256:HEX``, as the web page shows it) is the evidence the person
    looked at: nothing is signed unless ``context`` shows exactly that.

    Raises:
        ConflictError: ``context`` shows other evidence than ``evidence``.
    """
    check_evidence_seen(context.status, stage=stage, seen=evidence)
    return signer.decision(
        context.status,
        stage=stage,
        decision=decision,
        sha256=context.sha256,
        workflow_id=context.workflow_id,
        run_id=context.run_id,
        comment=comment,
    )


async def sign_decision(
    client: Client,
    pool: asyncpg.Pool,
    signer: Signer,
    ref: ModelRef,
    *,
    stage: str,
    decision: Decision,
    comment: str = "",
    evidence: str | None = None,
) -> tuple[WorkflowHandle[object, object], Envelope]:
    """Sign a decision at the gate the snapshot's run waits at, on the evidence it shows now
    (and only if that is ``evidence``, when given: see :func:`sign_in_context`).

    Raises:
        ConflictError: the run is not waiting at ``stage``, or shows other evidence than
            ``evidence``.
    """
    handle, context = await decision_context(client, pool, ref, stage=stage)
    envelope = sign_in_context(
        signer, context, stage=stage, decision=decision, comment=comment, evidence=evidence
    )
    return handle, envelope


EVIDENCE_PREFIX = "sha256:"
"""How the web page and ``--evidence`` write an evidence digest."""


def check_evidence_seen(status: LifecycleStatus, *, stage: str, seen: str | None) -> None:
    """Refuse to sign when the run's evidence at ``stage`` is not the ``seen`` digest
    (``sha256:HEX``; None: nothing to compare, as before ``--evidence`` existed).

    Between reading the page and running the command a stage can be tested again; a
    decision must be about what the person read, so a changed report means looking again.

    Raises:
        ConflictError: the evidence differs, naming both digests and where to look.
    """
    if seen is None:
        return
    ref = f"{status.model}@{status.version}"
    now = EVIDENCE_PREFIX + evidence_digest(status, stage)
    if seen.lower() != now:
        raise ConflictError(
            f"{ref}: the evidence at {stage} is now {now}, not the {seen} you were shown; nothing was "
            f"signed: look at it again (`mlc status {ref}` or the run's web page) and decide on that"
        )


async def send_decision(
    handle: WorkflowHandle[object, object], ref: ModelRef, request: SignedDecision, *, approve: bool
) -> ApprovalRecord:
    """Approve or reject a gate through the validated Workflow Update.

    Raises:
        ConflictError: the lifecycle refused the decision (its message says why) or has
            already finished.
    """
    try:
        record: ApprovalRecord = await handle.execute_update(
            "approve" if approve else "reject", request, result_type=ApprovalRecord
        )
        return record
    except WorkflowUpdateFailedError as exc:
        cause = exc.cause
        raise ConflictError(getattr(cause, "message", None) or str(cause or exc)) from None
    except RPCError as exc:
        described = await _describe_status(handle)
        if described is not None and described != WorkflowExecutionStatus.RUNNING:
            raise ConflictError(
                f"{ref}: the lifecycle has already finished ({described.name.lower()})"
            ) from None
        raise MLCError(f"{ref}: {exc.message}") from exc


async def _describe_status(handle: WorkflowHandle[object, object]) -> WorkflowExecutionStatus | None:
    try:
        return (await handle.describe()).status
    except RPCError:
        return None
