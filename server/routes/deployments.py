"""Deployments and stable endpoints (``mlc deployments``, ``mlc deployments --endpoints``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from server import paging
from server.api import Call, Page, endpoint
from server.errors import ApiError
from server.principal import Role
from server.reads.deployments import deployment_rows, endpoint_rows


def _flag(call: Call, name: str) -> bool:
    value = call.query(name, "false")
    if value not in ("true", "false"):
        raise ApiError(422, f"{name} must be true or false", "invalid")
    return value == "true"


@endpoint(
    "GET",
    "/v1/deployments",
    role=Role.READ_ONLY,
    response=Page[dict[str, Any]],
    params=("model", "stage", "all", "limit", "after"),
    summary="Deployments oldest first, live ones unless all=true, with traffic shares and "
    "streaming lag (`mlc deployments`)",
)
async def list_deployments(call: Call) -> Page[dict[str, Any]]:
    limit = call.limit()
    after = paging.decode(call.query("after"), datetime, str)
    rows = await deployment_rows(
        call.ctx.pool,
        model=call.query("model"),
        stage=call.query("stage"),
        all_=_flag(call, "all"),
        after=after,
        limit=limit + 1,
    )
    return paging.cut(rows, limit, lambda row: (datetime.fromisoformat(row["created_at"]), row["id"]))


@endpoint(
    "GET",
    "/v1/endpoints",
    role=Role.READ_ONLY,
    response=Page[dict[str, Any]],
    params=("model", "stage", "limit", "after"),
    summary="Stable endpoints with their gateway's state (checked by the server) and their "
    "versions' shares (`mlc deployments --endpoints`)",
)
async def list_endpoints(call: Call) -> Page[dict[str, Any]]:
    limit = call.limit()
    rows = await endpoint_rows(
        call.ctx.pool,
        call.ctx.settings,
        model=call.query("model"),
        stage=call.query("stage"),
        after=paging.decode(call.query("after"), str, str, str),
        limit=limit + 1,
    )
    return paging.cut(rows, limit, lambda row: (row["stage"], row["model"], row["runtime"]))
