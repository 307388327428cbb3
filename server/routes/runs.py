"""Lifecycle runs and their status (``mlc status [REF]``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from mlc.contracts.lifecycle import LifecycleStatus
from mlc.domain import ModelRef
from server import paging
from server.api import Call, Page, endpoint
from server.errors import ApiError
from server.principal import Role
from server.reads.runs import run_key, run_rows, run_status


class RunStatus(BaseModel):
    """One run's status; ``status`` is null while the run is starting."""

    model: str
    version: int
    status: LifecycleStatus | None


def model_ref(call: Call) -> ModelRef:
    """The ``{model}/{version}`` of the path."""
    version = call.path("version")
    if not version.isdigit():
        raise ApiError(422, f"version must be a whole number, not {version!r}", "invalid")
    return ModelRef(model=call.path("model"), version=int(version))


@endpoint(
    "GET",
    "/v1/runs",
    role=Role.READ_ONLY,
    response=Page[dict[str, Any]],
    params=("limit", "after"),
    summary="Lifecycle runs, newest first (`mlc status`)",
)
async def list_runs(call: Call) -> Page[dict[str, Any]]:
    limit = call.limit()
    after = paging.decode(call.query("after"), datetime, str, str)
    rows = await run_rows(call.ctx.pool, after=after, limit=limit + 1)
    return paging.cut(rows, limit, run_key)


@endpoint(
    "GET",
    "/v1/runs/{model}/{version}/status",
    role=Role.READ_ONLY,
    response=RunStatus,
    summary="The newest run of a snapshot: stage, state, tests as the trail holds them, gate, "
    "decisions (a Temporal query) (`mlc status REF`)",
)
async def show_status(call: Call) -> RunStatus:
    ref = model_ref(call)
    found = await run_status(call.ctx.pool, await call.ctx.temporal(), ref)
    return RunStatus(model=ref.model, version=ref.version, status=found)
