"""Inputs and results of the workflows, updates and inventory activities.

One input and one output model per call keeps Temporal payloads stable: a field can be
added (with a default) without breaking running histories. Only pydantic and the domain
types are imported, so workflow code passes this module through the sandbox.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from mlc.domain import (
    ApprovalRecord,
    Deployment,
    Frozen,
    LifecycleSpec,
    LifecycleState,
    Mode,
    ModelSnapshot,
    Runtime,
    StageTestReport,
)

# --- workflow input and output --------------------------------------------------------


class StartLifecycleInput(Frozen):
    """What a person types in the Web UI: ``{"model": "cc-fraud", "version": 1}``."""

    model: str
    version: int = Field(ge=1)
    spec: LifecycleSpec | None = None
    """Override the lifecycle's default stages, tests and gates for this run."""


class LifecycleResult(Frozen):
    """How a lifecycle that reached its end finished."""

    model: str
    version: int
    stages: tuple[str, ...]
    deployments: tuple[Deployment, ...] = ()
    """What the snapshot left serving (its deployments in the last stage)."""


class PendingGate(Frozen):
    """The approval a lifecycle is waiting for."""

    stage: str
    approvers: tuple[str, ...]
    deadline: datetime


class LifecycleStatus(Frozen):
    """Everything the ``status`` query tells about a run."""

    model: str
    version: int
    lifecycle: str
    state: LifecycleState
    stage: str | None = None
    stages: tuple[str, ...] = ()
    pending_gate: PendingGate | None = None
    reports: tuple[StageTestReport, ...] = ()
    decisions: tuple[ApprovalRecord, ...] = ()
    deployments: tuple[Deployment, ...] = ()
    reason: str | None = None
    refused: tuple[str, ...] = ()
    """Signals that were ignored, with why (signals cannot be refused to their sender)."""


class SignalDecision(Frozen):
    """The ``decide`` signal's payload, for ``temporal workflow signal``."""

    decision: str = Field(pattern="^(approved|rejected)$")
    stage: str
    approver: str
    comment: str = ""


# --- inventory activities -------------------------------------------------------------


class BeginRunInput(Frozen):
    """Load the snapshot and record the run as active."""

    workflow_id: str
    run_id: str
    model: str
    version: int
    lifecycle: str


class BeginRunResult(Frozen):
    """The snapshot the run promotes."""

    snapshot: ModelSnapshot


class RecordRunInput(Frozen):
    """Where a run stands; ``ended`` frees the snapshot for another run."""

    workflow_id: str
    run_id: str
    state: LifecycleState
    stage: str | None = None
    reason: str | None = None
    ended: bool = False


class ResolveRuntimesInput(Frozen):
    """Find the runtimes of a stage that serve a snapshot's service tags in a mode."""

    snapshot: ModelSnapshot
    stage: str
    mode: Mode


class ResolveRuntimesResult(Frozen):
    """Matching runtimes (never empty: no match is an error)."""

    runtimes: tuple[Runtime, ...]


class RecordDeploymentInput(Frozen):
    """A deployment's new state, to upsert into the inventory."""

    deployment: Deployment


class FindDeploymentsInput(Frozen):
    """Live deployments of a model in a stage, except some ids."""

    model: str
    stage: str
    exclude_ids: tuple[str, ...] = ()


class FindDeploymentsResult(Frozen):
    """The deployments found."""

    deployments: tuple[Deployment, ...] = ()


class RecordTestsInput(Frozen):
    """A stage's test report for the audit trail."""

    workflow_id: str
    run_id: str
    model: str
    version: int
    report: StageTestReport


class RecordDecisionInput(Frozen):
    """A gate decision for the audit trail."""

    workflow_id: str
    run_id: str
    model: str
    version: int
    record: ApprovalRecord


class ResolveApproversInput(Frozen):
    """Gate approver entries: identities and ``role:NAME``."""

    entries: tuple[str, ...]


class ResolveApproversResult(Frozen):
    """The identities allowed to decide at the gate."""

    identities: tuple[str, ...]


class NotifyInput(Frozen):
    """A message for the people following a lifecycle."""

    workflow_id: str
    model: str
    version: int
    message: str


class LoadLifecycleInput(Frozen):
    """Which uploaded lifecycle a run of a custom workflow type executes."""

    name: str


class LoadLifecycleResult(Frozen):
    """The newest version of that lifecycle when the run started (pinned by history)."""

    name: str
    version: int
    sha256: str
    source: str
