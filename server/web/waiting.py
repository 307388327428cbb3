"""Waiting for me (``/waiting``): the gates the signed-in principal may decide, oldest first.

A run waits at a gate when its row says ``awaiting_approval``; whether this principal may
decide there is the same check the inventory makes when the decision arrives
(``activities.admission.approver_problem`` over the verified governance state: the stage
policy's approvers and segregation of duties). The run page adds the gate's own approver
list, which only the run knows.
"""

from __future__ import annotations

from datetime import datetime

from starlette.requests import Request
from starlette.responses import Response

from activities.admission import approver_problem
from activities.inventory import load_run
from mlc.store import runs
from mlc.trust.policy import allowed_by
from server.context import ServerContext
from server.principal import Principal
from server.web.common import PAGE_SIZE, View, may_decide, page, render

SCANNED = 500
"""Waiting runs read per request; the first :data:`PAGE_SIZE` this principal may decide are shown."""


class Waiting(View):
    """A run at a gate this principal may decide."""

    model: str
    version: int
    stage: str
    lifecycle: str
    started_at: datetime
    started_by: str | None


class WaitingView(View):
    """The gates waiting for one principal."""

    gates: tuple[Waiting, ...]
    why_none: str | None
    """Why this principal can decide nothing at all (read-only, no key)."""
    scanned: int


async def build(ctx: ServerContext, principal: Principal) -> WaitingView:
    """The oldest waiting runs whose gate ``principal`` may decide."""
    if not may_decide(principal):
        return WaitingView(gates=(), why_none=f"{principal.name} is read-only here: no decisions", scanned=0)
    state = await ctx.governance()
    who = state.principals.get(principal.name)
    if who is None or not who.active_keys():
        return WaitingView(
            gates=(),
            why_none=f"{principal.name} has no signing key: an admin registers one with `mlc key add`",
            scanned=0,
        )
    rows = await runs.read_waiting(ctx.pool, limit=SCANNED)
    gates = []
    for row in rows:
        if row["stage"] is None:
            continue
        policy = state.policy(row["stage"])
        if not allowed_by(policy.approvers, who.name, who.roles):
            continue  # not an approver there: no need to load the run
        run = await load_run(ctx.pool, row["workflow_id"], row["run_id"])  # cached per process
        if approver_problem(policy, who, run, state) is None:
            gates.append(
                Waiting(
                    model=row["model"],
                    version=row["version"],
                    stage=row["stage"],
                    lifecycle=row["lifecycle"],
                    started_at=row["started_at"],
                    started_by=row["started_by"],
                )
            )
            if len(gates) == PAGE_SIZE:
                break
    return WaitingView(gates=tuple(gates), why_none=None, scanned=len(rows))


@page
async def waiting(request: Request, ctx: ServerContext, principal: Principal) -> Response:
    """``GET /waiting``: gates the signed-in principal may decide, oldest first."""
    return render(request, "waiting.html", principal, view=await build(ctx, principal))
