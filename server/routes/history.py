"""What served when (``mlc history MODEL``)."""

from __future__ import annotations

from typing import Any

from server import paging
from server.api import Call, Page, endpoint
from server.principal import Role
from server.reads.history import traffic_rows


@endpoint(
    "GET",
    "/v1/history/{model}",
    role=Role.READ_ONLY,
    response=Page[dict[str, Any]],
    params=("stage", "limit", "after"),
    summary="Traffic changes of a model's stable endpoints, oldest first, from the trail (`mlc history`)",
)
async def traffic_history(call: Call) -> Page[dict[str, Any]]:
    limit = call.limit()
    after = paging.decode(call.query("after"), int)
    rows = await traffic_rows(
        call.ctx.pool,
        call.path("model"),
        stage=call.query("stage"),
        after=after[0] if after else 0,
        limit=limit + 1,
    )
    return paging.cut(rows, limit, lambda row: (row["seq"],))
