"""A model's history (``/history/{model}[?stage=S]``): what served when behind its stable
endpoints (the trail's traffic entries, as ``mlc history`` shows them), newest first, and
its recent runs."""

from __future__ import annotations

from datetime import datetime
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from mlc.store import runs, trail
from server.context import ServerContext
from server.principal import Principal
from server.web.common import PAGE_SIZE, View, int_param, page, render


class Change(View):
    """One traffic change of a stable endpoint."""

    seq: int
    when: str
    stage: str
    runtime: str
    versions: str
    cause: str
    actor: str
    version: int | None


class RunRow(View):
    """One run of the model."""

    version: int
    lifecycle: str
    state: str
    stage: str | None
    started_at: datetime
    started_by: str | None


class HistoryView(View):
    """A page of a model's history."""

    model: str
    stage: str | None
    changes: tuple[Change, ...]
    runs: tuple[RunRow, ...]
    next: str | None


async def build(ctx: ServerContext, model: str, *, stage: str | None, before: int | None) -> HistoryView:
    """Up to :data:`PAGE_SIZE` traffic changes before ``before`` (a trail ``seq``)."""
    entries = await trail.read_recent(
        ctx.pool, limit=PAGE_SIZE, before=before, kinds=(trail.TRAFFIC,), model=model, stage=stage
    )
    changes = []
    for entry in entries:
        body = entry.data()
        changes.append(
            Change(
                seq=entry.seq,
                when=str(body.get("recorded_at", ""))[:19].replace("T", " "),
                stage=str(body.get("stage")),
                runtime=str(body.get("runtime")),
                versions=str(body.get("shares") or ""),
                cause=str(body.get("cause") or ""),
                actor=str(body.get("actor") or ""),
                version=entry.version,
            )
        )
    recent = await runs.read_recent(ctx.pool, model=model, limit=PAGE_SIZE) if before is None else []
    following = None
    if len(entries) == PAGE_SIZE:
        query = {"before": str(entries[-1].seq)}
        following = urlencode({**query, "stage": stage} if stage else query)
    return HistoryView(
        model=model,
        stage=stage,
        changes=tuple(changes),
        runs=tuple(
            RunRow(
                version=r["version"],
                lifecycle=r["lifecycle"],
                state=r["state"],
                stage=r["stage"],
                started_at=r["started_at"],
                started_by=r["started_by"],
            )
            for r in recent
        ),
        next=following,
    )


@page
async def history(request: Request, ctx: ServerContext, principal: Principal) -> Response:
    """``GET /history/{model}[?stage=S][&before=SEQ]``."""
    model = str(request.path_params["model"])
    stage = request.query_params.get("stage") or None
    view = await build(ctx, model, stage=stage, before=int_param(request, "before"))
    return render(request, "history.html", principal, view=view)
