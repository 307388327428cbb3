"""Checks behind every decision and every deploy into a protected stage.

Pure functions over the verified governance state, the run as the inventory knows it,
and the trail's entries: the activities load those, these decide. Nothing here trusts a
row because it exists: each decision is re-verified against the keys that are active
now, and must name this run, this snapshot's sha256 and this gate.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from mlc import names
from mlc.domain import ModelSnapshot
from mlc.errors import RefusedError
from mlc.statements import DecisionPredicate, Envelope, RollbackPredicate, decision_of, rollback_of
from mlc.store.trail import Entry
from mlc.trust.governance import Governance, Principal
from mlc.trust.policy import StagePolicy, allowed_by, segregation_problem

CLOCK_SKEW_SECONDS = 300
"""How far in the future a statement's issued-at may be (clocks of laptops drift)."""
ROLLBACK_LIFECYCLE = names.ROLLBACK
"""The ``lifecycle`` of a rollback's run (its workflow type)."""


@dataclass(frozen=True)
class RunContext:
    """A lifecycle run as the inventory knows it (never as its workflow code claims)."""

    workflow_id: str
    run_id: str
    lifecycle: str
    snapshot: ModelSnapshot
    started_by: str | None
    uploader: str | None

    @property
    def ref(self) -> str:
        """``model@version``."""
        return f"{self.snapshot.model}@{self.snapshot.version}"


def check_decision(
    envelope: Envelope,
    run: RunContext,
    state: Governance,
    *,
    gate_approvers: tuple[str, ...] | None = None,
) -> tuple[Principal, DecisionPredicate]:
    """Verify a signed decision for ``run``: signature, key, binding, roles, segregation.

    Raises:
        RefusedError: naming the first check that failed.
    """
    try:
        statement, decision = decision_of(envelope)
    except ValueError as exc:
        raise RefusedError(str(exc)) from None
    signer = _signer(envelope, state, decision.signer)
    snap = run.snapshot
    digests = [s.digest.get("sha256") for s in statement.subject]
    if digests != [snap.sha256]:
        raise RefusedError(
            f"the statement is for snapshot sha256 {', '.join(str(d) for d in digests)}, "
            f"not {run.ref} (sha256 {snap.sha256})"
        )
    if (decision.model, decision.version) != (snap.model, snap.version):
        raise RefusedError(f"the statement is for {decision.model}@{decision.version}, not {run.ref}")
    if (decision.workflow_id, decision.run_id) != (run.workflow_id, run.run_id):
        raise RefusedError(
            f"the statement is for run {decision.workflow_id}/{decision.run_id}, "
            f"not this run {run.workflow_id}/{run.run_id}"
        )
    policy = state.policy(decision.stage)
    problem = approver_problem(policy, signer, run, state, gate_approvers=gate_approvers)
    if problem:
        raise RefusedError(problem)
    return signer, decision


def approver_problem(
    policy: StagePolicy,
    who: Principal,
    run: RunContext,
    state: Governance,
    *,
    gate_approvers: tuple[str, ...] | None = None,
) -> str | None:
    """Why ``who`` may not decide at ``policy``'s gate for ``run``, or None."""
    if not allowed_by(policy.approvers, who.name, who.roles):
        return (
            f"{who.name} may not decide at {policy.stage}: the stage policy allows "
            f"{', '.join(policy.approvers)} (an admin grants roles with `mlc user grant`)"
        )
    if gate_approvers is not None and not allowed_by(gate_approvers, who.name, who.roles):
        return f"{who.name} is not among this run's approvers at {policy.stage}: {', '.join(gate_approvers)}"
    return segregation_problem(
        policy,
        who.name,
        registrant=state.registrants.get(run.snapshot.sha256),
        starter=run.started_by,
        uploader=run.uploader,
    )


def check_fresh(decision: DecisionPredicate | RollbackPredicate, now: datetime) -> None:
    """Refuse a statement submitted after it expired or issued implausibly in the future."""
    if now > decision.expires_at:
        raise RefusedError(
            f"the statement expired at {decision.expires_at:%Y-%m-%d %H:%M:%S} UTC; sign a new one"
        )
    if (decision.issued_at - now).total_seconds() > CLOCK_SKEW_SECONDS:
        raise RefusedError(
            f"the statement is issued in the future ({decision.issued_at:%Y-%m-%d %H:%M:%S} UTC)"
        )


def approvals(
    entries: list[Entry], run: RunContext, state: Governance, *, stage: str
) -> tuple[list[str], list[str]]:
    """Distinct people whose approvals of ``stage`` in ``run`` verify now, and why others don't.

    A later rejection by a verified approver voids the gate: nobody counts after it.
    """
    counted: list[str] = []
    problems: list[str] = []
    for entry in entries:
        envelope = entry.signed()
        if envelope is None:
            continue
        try:
            signer, decision = check_decision(envelope, run, state)
        except (RefusedError, ValueError) as exc:
            problems.append(f"entry {entry.seq}: {exc}")
            continue
        if decision.stage != stage:
            continue
        if decision.decision != "approved":
            return [], [f"entry {entry.seq}: rejected by {signer.name}"]
        if signer.name not in counted:
            counted.append(signer.name)
    return counted, problems


def admit(entries: list[Entry], run: RunContext, state: Governance, *, stage: str) -> None:
    """Refuse to deploy ``run``'s snapshot into protected ``stage`` without verified approvals."""
    policy = state.policy(stage)
    if not policy.protected or policy.admitted_by is None:
        return
    if rollback_admits(entries, run, state, stage=stage):
        return
    gate = state.policy(policy.admitted_by)
    counted, problems = approvals(entries, run, state, stage=gate.stage)
    if len(counted) >= gate.min_approvals:
        return
    found = f"verified: {', '.join(counted) or 'none'}"
    if problems:
        found += "; not counted: " + "; ".join(problems)
    raise RefusedError(
        f"{stage} is protected: deploying {run.ref} (sha256 {run.snapshot.sha256[:12]}) needs "
        f"{gate.min_approvals} signed approval(s) at {gate.stage} by {', '.join(gate.approvers)} "
        f"in this run ({found})"
    )


def _signer(envelope: Envelope, state: Governance, claimed: str) -> Principal:
    """The owner of the envelope's verified key, who must be the statement's ``claimed`` signer."""
    signer = state.signer_of(envelope)
    if signer.name != claimed:
        raise RefusedError(
            f"the key that signed belongs to {signer.name}, not {claimed}: nobody may sign for someone else"
        )
    return signer


def check_rollback(envelope: Envelope, state: Governance) -> tuple[Principal, RollbackPredicate]:
    """Verify a signed rollback: signature, key (registered, not revoked), signer, role.

    The signer must be allowed to decide at the stage's gate by the stage policy (the
    same rule as approving there; ``role:approver`` by default). Freshness, the nonce and
    the target are checked by the activity that records it.

    Raises:
        RefusedError: naming the first check that failed.
    """
    try:
        statement, rollback = rollback_of(envelope)
    except ValueError as exc:
        raise RefusedError(str(exc)) from None
    signer = _signer(envelope, state, rollback.signer)
    policy = state.policy(rollback.stage)
    if not allowed_by(policy.approvers, signer.name, signer.roles):
        raise RefusedError(
            f"{signer.name} may not roll {rollback.model} back in {rollback.stage}: the stage policy "
            f"allows {', '.join(policy.approvers)} to decide there (an admin grants roles with "
            "`mlc user grant`)"
        )
    return signer, rollback


def rollback_admits(entries: list[Entry], run: RunContext, state: Governance, *, stage: str) -> bool:
    """True when ``run`` is a rollback whose signed decision, verified now, names its snapshot.

    The rollback's run was recorded for the version its decision resolved to (see
    ``activities.rollback``): a statement naming a version must name that one (and its
    sha256 when it carries one); a statement for "the previous version" counts for the
    version the trusted activity resolved from the trail when it recorded the run.
    """
    if run.lifecycle != ROLLBACK_LIFECYCLE:
        return False
    snap = run.snapshot
    for entry in entries:
        envelope = entry.signed()
        if envelope is None:
            continue
        try:
            _, rollback = check_rollback(envelope, state)
        except (RefusedError, ValueError):
            continue
        digests = {s.digest.get("sha256") for s in envelope.statement().subject} - {None}
        if (
            rollback.model == snap.model
            and rollback.stage == stage
            and rollback.version in (None, snap.version)
            and digests <= {snap.sha256}
        ):
            return True
    return False
