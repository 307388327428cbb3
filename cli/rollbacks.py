"""Client side of ``mlc rollback``: sign the decision, start the ``Rollback`` workflow, wait.

Shared by the CLI and tests. The workflow (``workflows/rollback.py``) and the trusted
``verify_rollback`` activity decide; this module only signs and reports.
"""

from __future__ import annotations

import asyncpg
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from mlc import errors, names
from mlc.contracts.rollback import RollbackInput, RollbackResult
from mlc.statements import Envelope, rollback_of
from mlc.store import snapshots
from mlc.trust.signer import Signer

_ERRORS: dict[str, type[errors.MLCError]] = {
    "RefusedError": errors.RefusedError,
    "ConflictError": errors.ConflictError,
    "NotFoundError": errors.NotFoundError,
    "NoRuntimeError": errors.NoRuntimeError,
    "PermissionDeniedError": errors.PermissionDeniedError,
    "DeploymentFailed": errors.DeploymentFailedError,
}
"""The workflow's failure type -> the error the CLI exits with (refusals exit 4)."""


async def sign_rollback(
    pool: asyncpg.Pool, signer: Signer, *, model: str, stage: str, reason: str, version: int | None = None
) -> Envelope:
    """A rollback statement signed by ``signer`` (a named version bound to its sha256).

    Raises:
        NotFoundError: the named version is not a registered snapshot.
        ValueError: the reason is empty.
    """
    if not reason.strip():
        raise ValueError("a rollback needs a reason: pass --reason TEXT (it is kept in the audit trail)")
    sha256 = None
    if version is not None:
        sha256 = (await snapshots.read_snapshot(pool, model, version)).sha256
    return signer.rollback(model=model, stage=stage, reason=reason, version=version, sha256=sha256)


async def roll_back(client: Client, envelope: Envelope, *, task_queue: str) -> RollbackResult:
    """Start the ``Rollback`` workflow for a signed statement on the main queue and wait for it.

    Raises:
        MLCError: the rollback was refused or failed (typed: refusals are ``RefusedError``).
    """
    _, claim = rollback_of(envelope)
    try:
        result: RollbackResult = await client.execute_workflow(
            names.ROLLBACK,
            RollbackInput(envelope=envelope),
            id=names.rollback_workflow_id(claim.model, claim.stage, claim.nonce),
            task_queue=task_queue,
            result_type=RollbackResult,
        )
    except WorkflowFailureError as exc:
        cause = exc.cause
        while isinstance(cause, ApplicationError) and cause.cause is not None and not cause.type:
            cause = cause.cause
        message = cause.message if isinstance(cause, ApplicationError) else str(cause or exc)
        kind = cause.type if isinstance(cause, ApplicationError) else None
        raise _ERRORS.get(kind or "", errors.MLCError)(
            f"rollback of {claim.model} in {claim.stage} refused: {message}"
            if kind in ("RefusedError", "ConflictError", "PermissionDeniedError")
            else f"rollback of {claim.model} in {claim.stage} failed: {message}"
        ) from None
    return result
