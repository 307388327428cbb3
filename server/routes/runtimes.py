"""Runtimes and their evidence keys (``mlc runtime list``, ``mlc runtime key list``)."""

from __future__ import annotations

from typing import Any

from mlc.domain import Runtime
from mlc.store import runtimes
from server import paging
from server.api import Call, Page, endpoint
from server.principal import Role
from server.reads.governance import runtime_key_rows


@endpoint(
    "GET",
    "/v1/runtimes",
    role=Role.READ_ONLY,
    response=Page[Runtime],
    params=("stage", "limit", "after"),
    summary="Runtimes by stage and name (`mlc runtime list`)",
)
async def list_runtimes(call: Call) -> Page[Runtime]:
    limit = call.limit()
    rows = await runtimes.read_runtimes(
        call.ctx.pool,
        stage=call.query("stage"),
        after=paging.decode(call.query("after"), str, str),
        limit=limit + 1,
    )
    return paging.cut(rows, limit, lambda r: (r.stage, r.name))


@endpoint(
    "GET",
    "/v1/runtimes/keys",
    role=Role.READ_ONLY,
    response=Page[dict[str, Any]],
    params=("limit", "after"),
    summary="The runtimes' evidence keys in the verified governance state (`mlc runtime key list`)",
)
async def list_runtime_keys(call: Call) -> Page[dict[str, Any]]:
    limit = call.limit()
    key = lambda row: (row["runtime"], row["keyid"])  # noqa: E731
    rows = runtime_key_rows(await call.ctx.governance())
    return paging.cut(
        paging.after_in(rows, key, paging.decode(call.query("after"), str, str), limit), limit, key
    )
