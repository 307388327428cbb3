"""Contracts of the lifecycle workflows: their start input, result, ``status`` query and the
signed decisions their ``approve``/``reject`` updates and ``decide`` signal take.

Only pydantic, the domain types and the statement envelope are imported, so workflow code
passes this module through the sandbox.
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
    StageTestReport,
)
from mlc.statements import Envelope, digest


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


def evidence_digest(status: LifecycleStatus, stage: str) -> str:
    """The sha256 a decision at ``stage`` signs as the evidence shown: the stage's newest
    test report (canonical JSON), or ``null`` when the stage has none.

    The web page shows it beside the report and in the ``mlc approve --evidence`` command it
    prints, so the CLI can refuse to sign when the evidence it fetched is not what the person
    saw on the page.
    """
    shown = [r for r in status.reports if r.stage == stage]
    return digest(shown[-1].model_dump(mode="json") if shown else None)


class SignalDecision(Frozen):
    """The ``decide`` signal's payload: the same signed statement ``mlc approve`` sends.

    Produce one with ``mlc approve MODEL@VERSION --stage S --print-statement`` (or
    ``mlc reject ... --print-statement``) and pass it as the signal's JSON input.
    """

    envelope: Envelope


class SignedDecision(Frozen):
    """A decision sent to a gate (the Workflow Update's input): a signed DSSE envelope.

    The approver is whoever owns the signing key; nothing in the payload can claim it.
    """

    envelope: Envelope
