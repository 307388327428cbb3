"""Snapshots: list them a page at a time."""

from __future__ import annotations

from mlc.domain import ModelSnapshot
from mlc.store import snapshots
from server import paging
from server.api import Call, Page, endpoint
from server.principal import Role


@endpoint(
    "GET",
    "/v1/snapshots",
    role=Role.READ_ONLY,
    response=Page[ModelSnapshot],
    params=("model", "limit", "after"),
    summary="Snapshots by model and version (`mlc model list`)",
)
async def list_snapshots(call: Call) -> Page[ModelSnapshot]:
    limit = call.limit()
    after = paging.decode(call.query("after"), str, int)
    rows = await snapshots.read_snapshots(
        call.ctx.pool,
        call.query("model"),
        after=(str(after[0]), int(after[1])) if after else None,
        limit=limit + 1,
    )
    return paging.cut(rows, limit, lambda s: (s.model, s.version))
