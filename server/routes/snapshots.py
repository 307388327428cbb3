"""Snapshots: list them a page at a time."""

from __future__ import annotations

from mlc.domain import ModelSnapshot
from mlc.store import snapshots
from server.api import Call, Page, endpoint
from server.errors import ApiError
from server.principal import Role


def _cursor(after: str | None) -> tuple[str, int] | None:
    """``model@version`` of the last snapshot of the previous page."""
    if after is None:
        return None
    model, _, version = after.rpartition("@")
    if not model or not version.isdigit():
        raise ApiError(422, "after must be the `next` value of the previous page", "invalid")
    return model, int(version)


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
    rows = await snapshots.read_snapshots(
        call.ctx.pool, call.query("model"), after=_cursor(call.query("after")), limit=limit + 1
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return Page[ModelSnapshot](items=rows, next=f"{rows[-1].model}@{rows[-1].version}" if more else None)
