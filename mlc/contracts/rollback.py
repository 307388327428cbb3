"""Contracts of one-step rollback: a signed decision puts a previous version back behind a
stage's stable endpoints.

``mlc rollback MODEL --stage STAGE [--to VERSION] --reason TEXT`` signs a
:class:`~mlc.statements.RollbackPredicate` and starts the built-in ``Rollback``
workflow (:mod:`workflows.rollback`) on the main queue. Its first activity,
:data:`VERIFY_ROLLBACK` (trusted), verifies the statement like an approval (signature, key,
the stage gate's approvers, expiry, nonce), resolves the target version from the audit
trail's traffic history, records the rollback's run and the decision, and says per gateway
runtime of the stage whether the target is still warm there. The workflow then routes (warm)
or redeploys from the snapshot, smoke-tests and routes (cold) through the ordinary
deployment and traffic contracts, which admit exactly that snapshot for that run.
"""

from __future__ import annotations

from datetime import timedelta

from mlc.contracts.base import ActivityContract
from mlc.domain import Deployment, Frozen, ModelSnapshot, Runtime, TrafficRoute
from mlc.statements import Envelope

INVENTORY_TIMEOUT = timedelta(seconds=30)

ROLLBACK_CAUSE = "rollback by {signer}: {reason}"
"""The traffic trail's cause of a rollback (``rollback by alice: error rate doubled``)."""


class RollbackInput(Frozen):
    """The ``Rollback`` workflow's input: the signed rollback statement."""

    envelope: Envelope


class VerifyRollbackInput(Frozen):
    """The signed statement to verify and record for the calling ``Rollback`` run."""

    envelope: Envelope


class RollbackTarget(Frozen):
    """One gateway runtime of the stage: the target's warm deployment there, or none (cold)."""

    runtime: Runtime
    warm: Deployment | None = None
    """A live online deployment of the target version on this runtime (serving or in standby)."""
    routes: tuple[TrafficRoute, ...] = ()
    """What answers the model's stable endpoint there now."""


class VerifyRollbackResult(Frozen):
    """The verified decision: who, why, which snapshot, and where it is warm."""

    snapshot: ModelSnapshot
    """The version to put back (the run is recorded for it)."""
    stage: str
    signer: str
    reason: str
    replaces: int | None = None
    """The version answering the stage's endpoints now."""
    targets: tuple[RollbackTarget, ...] = ()

    @property
    def cause(self) -> str:
        """The traffic trail's cause of this rollback."""
        return ROLLBACK_CAUSE.format(signer=self.signer, reason=self.reason)


class RolledBack(Frozen):
    """What answers one runtime's stable endpoint after the rollback."""

    runtime: str
    endpoint: str
    version: int
    deployment_id: str
    warm: bool
    """True when the target was still running there; False when it was redeployed."""


class RollbackResult(Frozen):
    """How a rollback finished."""

    model: str
    stage: str
    version: int
    replaced: int | None = None
    signer: str
    reason: str
    runtimes: tuple[RolledBack, ...] = ()
    seconds: float = 0.0
    """From the workflow's start until the last endpoint answered with the target."""
    workflow_id: str = ""
    run_id: str = ""
    """The rollback's run (its deployments, traffic changes and decision name it)."""


VERIFY_ROLLBACK = ActivityContract(
    "verify_rollback", VerifyRollbackInput, VerifyRollbackResult, INVENTORY_TIMEOUT
)

INVENTORY_CONTRACTS = (VERIFY_ROLLBACK,)
"""Served by the trusted main worker."""
