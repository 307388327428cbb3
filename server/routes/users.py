"""People and automations with their roles and keys (``mlc user list``)."""

from __future__ import annotations

from typing import Any

from server import paging
from server.api import Call, Page, endpoint
from server.principal import Role
from server.reads.governance import user_rows


@endpoint(
    "GET",
    "/v1/users",
    role=Role.READ_ONLY,
    response=Page[dict[str, Any]],
    params=("limit", "after"),
    summary="Principals by name with roles, keys and revoked keys, from the verified trail (`mlc user list`)",
)
async def list_users(call: Call) -> Page[dict[str, Any]]:
    limit = call.limit()
    key = lambda row: (row["name"],)  # noqa: E731
    rows = user_rows(await call.ctx.governance())
    return paging.cut(paging.after_in(rows, key, paging.decode(call.query("after"), str), limit), limit, key)
