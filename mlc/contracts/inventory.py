"""Contracts of the inventory activities, served only by the trusted main worker.

They run on the main task queue; workflow code (uploaded lifecycles included) reaches
the inventory only through them, and they derive the run from Temporal's activity info.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import Field

from mlc.contracts.base import ActivityContract
from mlc.domain import (
    ApprovalRecord,
    Deployment,
    DeploymentState,
    Frozen,
    LifecycleState,
    Mode,
    ModelSnapshot,
    Runtime,
    StageTestReport,
)
from mlc.statements import Envelope

INVENTORY_TIMEOUT = timedelta(seconds=30)
"""Database reads and writes: short, retried on transient failures."""

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


BEGIN_RUN = ActivityContract("begin_lifecycle_run", BeginRunInput, BeginRunResult, INVENTORY_TIMEOUT)
RECORD_RUN = ActivityContract("record_lifecycle_run", RecordRunInput, type(None), INVENTORY_TIMEOUT)
RESOLVE_RUNTIMES = ActivityContract(
    "resolve_runtimes", ResolveRuntimesInput, ResolveRuntimesResult, INVENTORY_TIMEOUT
)
AUTHORIZE_DEPLOYMENT = ActivityContract(
    "authorize_deployment", AuthorizeDeploymentInput, AuthorizeDeploymentResult, INVENTORY_TIMEOUT
)
AUTHORIZE_UNDEPLOY = ActivityContract(
    "authorize_undeploy", AuthorizeUndeployInput, RuntimeGrantResult, INVENTORY_TIMEOUT
)
VERIFY_DECISION = ActivityContract(
    "verify_decision", VerifyDecisionInput, VerifyDecisionResult, INVENTORY_TIMEOUT
)
RECORD_DEPLOYMENT = ActivityContract(
    "record_deployment", RecordDeploymentInput, RecordDeploymentResult, INVENTORY_TIMEOUT
)
FIND_DEPLOYMENTS = ActivityContract(
    "find_live_deployments", FindDeploymentsInput, FindDeploymentsResult, INVENTORY_TIMEOUT
)
RECORD_TESTS = ActivityContract("record_test_report", RecordTestsInput, RecordTestsResult, INVENTORY_TIMEOUT)
"""Histories from before signed evidence hold no result (None) for it."""
RECORD_DECISION = ActivityContract("record_decision", RecordDecisionInput, type(None), INVENTORY_TIMEOUT)
RESOLVE_APPROVERS = ActivityContract(
    "resolve_approvers", ResolveApproversInput, ResolveApproversResult, INVENTORY_TIMEOUT
)
NOTIFY = ActivityContract("notify", NotifyInput, type(None), INVENTORY_TIMEOUT)
LOAD_LIFECYCLE = ActivityContract(
    "load_lifecycle_definition", LoadLifecycleInput, LoadLifecycleResult, INVENTORY_TIMEOUT
)

CONTRACTS = (
    BEGIN_RUN,
    RECORD_RUN,
    RESOLVE_RUNTIMES,
    AUTHORIZE_DEPLOYMENT,
    AUTHORIZE_UNDEPLOY,
    VERIFY_DECISION,
    RECORD_DEPLOYMENT,
    FIND_DEPLOYMENTS,
    RECORD_TESTS,
    RECORD_DECISION,
    RESOLVE_APPROVERS,
    NOTIFY,
    LOAD_LIFECYCLE,
)
"""Every inventory activity: what the main worker must serve."""
