"""Acting on lifecycle runs through the API: start one, and decide at its gates.

Starting runs as the caller (Temporal records the client identity as the starter, which
segregation of duties reads). Deciding is two steps: the client fetches what it signs on
(``decision-context``), signs locally, and sends the envelope; the server checks only that
the envelope is the caller's own, then forwards it to the run's validated update, where the
trusted ``verify_decision`` activity verifies it as for the direct CLI.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from mlc import names
from mlc.contracts.lifecycle import SignedDecision
from mlc.domain import ApprovalRecord, LifecycleSpec, ModelRef
from mlc.lifecycle_client import (
    DecisionContext,
    decision_context,
    find_handle,
    send_decision,
    start_lifecycle,
)
from mlc.statements import Envelope, decision_of
from mlc.store import snapshots, trail
from server.api import Call, endpoint
from server.errors import ApiError
from server.principal import Role
from server.signed import check_signer

API_START = "api.start"
"""The trail event of a run started through the API, naming the principal who started it."""


class StartRun(BaseModel):
    model: str = Field(min_length=1, max_length=200)
    version: int = Field(ge=1)
    lifecycle: str = Field(default=names.STANDARD_LIFECYCLE, min_length=1, max_length=200)
    spec: LifecycleSpec | None = None


class StartedRun(BaseModel):
    workflow_id: str
    run_id: str | None
    model: str
    version: int
    lifecycle: str
    task_queue: str
    started_by: str


class DecisionRequest(BaseModel):
    envelope: Envelope


def _ref(call: Call) -> ModelRef:
    version = call.path("version")
    if not version.isdigit():
        raise ApiError(422, "the version must be a whole number", "invalid")
    return ModelRef(model=call.path("model"), version=int(version))


@endpoint(
    "POST",
    "/v1/runs",
    role=Role.MEMBER,
    body=StartRun,
    response=StartedRun,
    summary="Start a lifecycle for a registered snapshot as the caller (`mlc lifecycle start`)",
)
async def start_run(call: Call) -> StartedRun:
    body: StartRun = call.body
    ref = ModelRef(model=body.model, version=body.version)
    await snapshots.read_snapshot(call.ctx.pool, ref.model, ref.version)
    starter = call.principal.name
    handle = await start_lifecycle(
        await call.ctx.temporal_as(starter),
        ref,
        task_queue=call.ctx.settings.task_queue,
        lifecycle=body.lifecycle,
        spec=body.spec,
    )
    await trail.append(
        call.ctx.pool,
        trail.RUN,
        {"event": API_START, "actor": starter, "lifecycle": body.lifecycle, "method": call.principal.method},
        model=ref.model,
        version=ref.version,
        workflow_id=handle.id,
        run_id=handle.result_run_id,
    )
    return StartedRun(
        workflow_id=handle.id,
        run_id=handle.result_run_id,
        model=ref.model,
        version=ref.version,
        lifecycle=body.lifecycle,
        task_queue=names.lifecycle_task_queue(body.lifecycle, call.ctx.settings.task_queue),
        started_by=starter,
    )


@endpoint(
    "GET",
    "/v1/runs/{model}/{version}/decision-context",
    role=Role.MEMBER,
    response=DecisionContext,
    params=("stage",),
    summary="What a decision at the waiting gate is signed on (`mlc approve/reject`, step 1)",
)
async def get_decision_context(call: Call) -> DecisionContext:
    stage = call.query("stage")
    if not stage:
        raise ApiError(422, "give the gate's stage: ?stage=DEV", "invalid")
    _, context = await decision_context(await call.ctx.temporal(), call.ctx.pool, _ref(call), stage=stage)
    return context


@endpoint(
    "POST",
    "/v1/runs/{model}/{version}/decisions",
    role=Role.MEMBER,
    body=DecisionRequest,
    response=ApprovalRecord,
    summary="Send a signed approval or rejection to the run's gate (`mlc approve/reject`, step 2)",
)
async def decide(call: Call) -> ApprovalRecord:
    ref = _ref(call)
    envelope = call.body.envelope
    try:
        _, claim = decision_of(envelope)
    except ValueError as exc:
        raise ApiError(422, str(exc), "invalid") from None
    if (claim.model, claim.version) != (ref.model, ref.version):
        raise ApiError(422, f"the statement decides on {claim.model}@{claim.version}, not {ref}", "invalid")
    await check_signer(call, envelope)
    handle = await find_handle(await call.ctx.temporal(), call.ctx.pool, ref)
    return await send_decision(
        handle, ref, SignedDecision(envelope=envelope), approve=claim.decision == "approved"
    )
