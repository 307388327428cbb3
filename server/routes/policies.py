"""Stage policies in force (``mlc policy list``)."""

from __future__ import annotations

from mlc.trust.policy import StagePolicy
from server import paging
from server.api import Call, Page, endpoint
from server.principal import Role
from server.reads.governance import policies


@endpoint(
    "GET",
    "/v1/policies",
    role=Role.READ_ONLY,
    response=Page[StagePolicy],
    params=("limit", "after"),
    summary="The policy in force for each stage with one, a runtime, or PROD (`mlc policy list`)",
)
async def list_policies(call: Call) -> Page[StagePolicy]:
    limit = call.limit()
    key = lambda policy: (policy.stage,)  # noqa: E731
    rows = policies(await call.ctx.governance())
    return paging.cut(paging.after_in(rows, key, paging.decode(call.query("after"), str), limit), limit, key)
