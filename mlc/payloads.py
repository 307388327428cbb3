"""Inputs and results of the workflows, updates and inventory activities.

One input and one output model per call keeps Temporal payloads stable: a field can be
added (with a default) without breaking running histories. Only pydantic and the domain
types are imported, so workflow code passes this module through the sandbox.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from mlc.domain import (
    ApprovalRecord,
    Deployment,
    DeploymentState,
    Frozen,
    LifecycleSpec,
    LifecycleState,
    Mode,
    ModelSnapshot,
    Runtime,
    StageTestReport,
)
from mlc.trust.statements import Envelope

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
    needed: int = 1
    """Distinct approvals the stage's policy needs."""
    approved_by: tuple[str, ...] = ()
    """Who has approved so far (verified)."""


EVIDENCE_NOTE = "evidence: "
"""Prefix of a run's ``refused`` note about a runtime result the inventory refused."""


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
    """Signals that were ignored, with why (signals cannot be refused to their sender), and
    runtime results the inventory refused (prefixed :data:`EVIDENCE_NOTE`)."""


class SignalDecision(Frozen):
    """The ``decide`` signal's payload: the same signed statement ``mlc approve`` sends.

    Produce one with ``mlc approve MODEL@VERSION --stage S --print-statement`` (or
    ``mlc reject ... --print-statement``) and pass it as the signal's JSON input.
    """

    envelope: Envelope


# --- inventory activities -------------------------------------------------------------
# The run (workflow id, run id, model, version) is never part of these inputs: the
# activities derive it from Temporal's activity info and the inventory, so workflow code
# cannot act for another run.


class BeginRunInput(Frozen):
    """Claim a snapshot for this run (the start input names it)."""

    model: str
    version: int


class BeginRunResult(Frozen):
    """The snapshot the run promotes."""

    snapshot: ModelSnapshot


class RecordRunInput(Frozen):
    """Where this run stands; ``ended`` frees the snapshot for another run."""

    state: LifecycleState
    stage: str | None = None
    reason: str | None = None
    ended: bool = False


class ResolveRuntimesInput(Frozen):
    """The runtimes of a stage serving this run's snapshot in a mode."""

    stage: str
    mode: Mode


class ResolveRuntimesResult(Frozen):
    """Matching runtimes (never empty: no match is an error)."""

    runtimes: tuple[Runtime, ...]


class AuthorizeDeploymentInput(Frozen):
    """Ask to deploy this run's snapshot to one runtime (checked against the stage policy)."""

    stage: str
    runtime: str
    mode: Mode


class AuthorizeDeploymentResult(Frozen):
    """The recorded deployment and the platform's signed grant for the runtime worker."""

    deployment: Deployment
    grant: Envelope


class AuthorizeUndeployInput(Frozen):
    """Ask to remove a deployment (this run's own, or an older version it replaces)."""

    deployment_id: str


class RuntimeGrantResult(Frozen):
    """A signed grant for one runtime action."""

    grant: Envelope


class RuntimeActionInput(Frozen):
    """A runtime activity's only input: the platform's grant, which names everything it acts on."""

    grant: Envelope


class RecordDeploymentInput(Frozen):
    """A deployment's new state (only this run's deployments, or retiring ones it replaced)."""

    deployment_id: str
    state: DeploymentState
    endpoint: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    evidence: Envelope | None = None
    """Serving or completed: the deploy result signed by the runtime's evidence key; its
    endpoint and facts are what gets recorded."""


class RecordDeploymentResult(Frozen):
    """The deployment as recorded."""

    deployment: Deployment
    test_grant: Envelope | None = None
    """For a serving or completed deployment: the platform's grant to test it (the
    ``run_stage_tests`` activity acts only on it)."""


class FindDeploymentsInput(Frozen):
    """Live deployments of this run's model in a stage, except some ids."""

    stage: str
    exclude_ids: tuple[str, ...] = ()


class FindDeploymentsResult(Frozen):
    """The deployments found."""

    deployments: tuple[Deployment, ...] = ()


class RecordTestsInput(Frozen):
    """A stage's test report for the audit trail."""

    report: StageTestReport
    evidence: tuple[Envelope, ...] = ()
    """The runtimes' signed results behind ``report`` (``run_stage_tests`` results, traffic
    observations); a passing result no verified envelope vouches for is refused."""


class RecordTestsResult(Frozen):
    """The report as recorded: passing results without verified evidence replaced by refusals."""

    report: StageTestReport
    refused: tuple[str, ...] = ()
    """Why each refused result or envelope was refused."""


class RecordDecisionInput(Frozen):
    """A decision nobody signed (an expired gate) for the audit trail."""

    record: ApprovalRecord


class VerifyDecisionInput(Frozen):
    """A signed decision to verify against keys, roles and policy, and record."""

    envelope: Envelope
    gate_approvers: tuple[str, ...] = ("role:approver",)
    """The run's own gate approvers: they narrow the policy's, never widen it."""


class VerifyDecisionResult(Frozen):
    """The recorded decision, and how far the gate's policy is satisfied."""

    record: ApprovalRecord
    approvers: tuple[str, ...] = ()
    """Distinct people whose verified approvals of this gate count so far."""
    needed: int = 1


class ResolveApproversInput(Frozen):
    """Who may decide at a stage's gate: the policy narrowed by the run's entries."""

    stage: str
    entries: tuple[str, ...]


class ResolveApproversResult(Frozen):
    """The identities allowed to decide at the gate, and how many must approve."""

    identities: tuple[str, ...]
    needed: int = 1


class NotifyInput(Frozen):
    """A message for the people following this lifecycle."""

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
