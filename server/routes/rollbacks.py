"""Rollbacks through the API: a signed rollback statement starts the ``Rollback`` workflow as
the caller (202 at once: a cold rollback redeploys and may take minutes), then its outcome
is read by id.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from pydantic import BaseModel
from temporalio.service import RPCError, RPCStatusCode

from mlc.contracts.rollback import RollbackResult
from mlc.statements import Envelope, rollback_of
from server.api import Call, endpoint
from server.errors import ApiError
from server.operations import rollbacks
from server.principal import Role
from server.signed import check_signer

WAIT_SECONDS = 10.0
"""How long ``GET /v1/rollbacks/{id}`` waits for the end before answering ``running``."""
_PREFIX = "rollback-"


class RollbackRequest(BaseModel):
    envelope: Envelope


class RollbackState(BaseModel):
    id: str
    state: Literal["running", "done"]
    result: RollbackResult | None = None


@endpoint(
    "POST",
    "/v1/rollbacks",
    role=Role.MEMBER,
    body=RollbackRequest,
    response=RollbackState,
    status=202,
    summary="Start a signed rollback as the caller; 202 with its id (`mlc rollback`)",
)
async def start_rollback(call: Call) -> RollbackState:
    envelope = call.body.envelope
    try:
        rollback_of(envelope)
    except ValueError as exc:
        raise ApiError(422, str(exc), "invalid") from None
    signer = await check_signer(call, envelope)
    handle = await rollbacks.start(
        await call.ctx.temporal_as(signer), envelope, task_queue=call.ctx.settings.task_queue
    )
    state = RollbackState(id=handle.id, state="running")
    return state


@endpoint(
    "GET",
    "/v1/rollbacks/{id}",
    role=Role.MEMBER,
    response=RollbackState,
    summary=f"A rollback's outcome (waits up to {WAIT_SECONDS:.0f} s; a refusal answers 403)",
)
async def rollback_state(call: Call) -> RollbackState:
    workflow_id = call.path("id")
    if not workflow_id.startswith(_PREFIX) or len(workflow_id) > 300:
        raise ApiError(404, f"{workflow_id} is not a rollback", "NotFoundError")
    handle = (await call.ctx.temporal()).get_workflow_handle(workflow_id, result_type=RollbackResult)
    try:
        result = await asyncio.wait_for(rollbacks.outcome(handle, f"rollback {workflow_id}"), WAIT_SECONDS)
    except TimeoutError:
        return RollbackState(id=workflow_id, state="running")
    except RPCError as exc:
        if exc.status is RPCStatusCode.NOT_FOUND:
            raise ApiError(404, f"no rollback {workflow_id}", "NotFoundError") from None
        raise
    return RollbackState(id=workflow_id, state="done", result=result)
