"""Uploaded lifecycle code (``mlc lifecycle list``, ``mlc lifecycle show``)."""

from __future__ import annotations

from mlc.domain import LifecycleDefinition
from mlc.store import lifecycle_definitions
from server import paging
from server.api import Call, Page, endpoint
from server.errors import ApiError
from server.principal import Role


@endpoint(
    "GET",
    "/v1/lifecycles",
    role=Role.READ_ONLY,
    response=Page[LifecycleDefinition],
    params=("limit", "after"),
    summary="Every uploaded version by name and version, with its source (`mlc lifecycle list`)",
)
async def list_lifecycles(call: Call) -> Page[LifecycleDefinition]:
    limit = call.limit()
    rows = await lifecycle_definitions.read_lifecycle_definitions(
        call.ctx.pool,
        after=paging.decode(call.query("after"), str, int),
        limit=limit + 1,
    )
    return paging.cut(rows, limit, lambda d: (d.name, d.version))


@endpoint(
    "GET",
    "/v1/lifecycles/{name}",
    role=Role.READ_ONLY,
    response=LifecycleDefinition,
    params=("version",),
    summary="One version of an uploaded lifecycle (the newest without ?version=) (`mlc lifecycle show`)",
)
async def show_lifecycle(call: Call) -> LifecycleDefinition:
    version = call.query("version")
    if version is not None and not version.isdigit():
        raise ApiError(422, "version must be a whole number", "invalid")
    return await lifecycle_definitions.read_lifecycle_definition(
        call.ctx.pool, call.path("name"), int(version) if version else None
    )
