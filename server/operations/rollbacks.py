"""Starting the ``Rollback`` workflow for a signed statement, and reading how it ended.

The workflow (``workflows/rollback.py``) and its trusted ``verify_rollback`` activity
decide; the CLI's direct mode and ``mlc server`` only start it and report.
"""

from __future__ import annotations

from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError

from mlc import errors, names
from mlc.contracts.rollback import RollbackInput, RollbackResult
from mlc.statements import Envelope, rollback_of

_ERRORS: dict[str, type[errors.MLCError]] = {
    "RefusedError": errors.RefusedError,
    "ConflictError": errors.ConflictError,
    "NotFoundError": errors.NotFoundError,
    "NoRuntimeError": errors.NoRuntimeError,
    "PermissionDeniedError": errors.PermissionDeniedError,
    "DeploymentFailed": errors.DeploymentFailedError,
}
"""The workflow's failure type -> the error reported (refusals exit 4 in the CLI)."""


async def start(
    client: Client, envelope: Envelope, *, task_queue: str
) -> WorkflowHandle[object, RollbackResult]:
    """Start the rollback of ``envelope`` on the main queue (the same statement twice while
    it runs finds the first run).

    Raises:
        ValueError: the envelope holds no rollback statement.
    """
    _, claim = rollback_of(envelope)
    workflow_id = names.rollback_workflow_id(claim.model, claim.stage, claim.nonce)
    try:
        return await client.start_workflow(
            names.ROLLBACK,
            RollbackInput(envelope=envelope),
            id=workflow_id,
            task_queue=task_queue,
            result_type=RollbackResult,
        )
    except WorkflowAlreadyStartedError:
        return client.get_workflow_handle(workflow_id, result_type=RollbackResult)


async def outcome(handle: WorkflowHandle[object, RollbackResult], what: str) -> RollbackResult:
    """Wait for the rollback ``what`` (``rollback of MODEL in STAGE``) to end.

    Raises:
        MLCError: it was refused or failed (typed: refusals are ``RefusedError``).
    """
    try:
        return await handle.result()
    except WorkflowFailureError as exc:
        cause = exc.cause
        while isinstance(cause, ApplicationError) and cause.cause is not None and not cause.type:
            cause = cause.cause
        message = cause.message if isinstance(cause, ApplicationError) else str(cause or exc)
        kind = cause.type if isinstance(cause, ApplicationError) else None
        refused = kind in ("RefusedError", "ConflictError", "PermissionDeniedError")
        raise _ERRORS.get(kind or "", errors.MLCError)(
            f"{what} {'refused' if refused else 'failed'}: {message}"
        ) from None


def described(envelope: Envelope) -> str:
    """``rollback of MODEL in STAGE``, for messages."""
    _, claim = rollback_of(envelope)
    return f"rollback of {claim.model} in {claim.stage}"
