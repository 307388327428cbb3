"""The inventory page (``/``): models and their snapshots, where each version serves per
stage and mode, the stable endpoints with their traffic shares, and each snapshot's run.

One page is at most :data:`PAGE_SIZE` snapshots and four queries whatever the inventory
holds (snapshots, their live deployments, their models' endpoints, their newest runs).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from mlc.store import deployments, runs, snapshots, traffic
from mlc.traffic import describe_routes
from server.context import ServerContext
from server.principal import Principal
from server.web.common import PAGE_SIZE, View, int_param, page, render


class Serving(View):
    """One live deployment of a snapshot."""

    stage: str
    runtime: str
    mode: str
    state: str
    share: str | None
    """``90%``, ``shadow``, ``0%`` behind the stable endpoint; None without one."""


class SnapshotRow(View):
    """A snapshot with where it serves and its newest run."""

    model: str
    version: int
    sha256: str
    service_tags: tuple[str, ...]
    created_at: datetime | None
    serving: tuple[Serving, ...]
    run_state: str | None
    run_stage: str | None


class Endpoint(View):
    """A model's stable endpoint on one runtime and the versions behind it."""

    model: str
    stage: str
    runtime: str
    endpoint: str
    versions: str
    """``v2 90%, v1 10%, v3 shadow`` or ``nothing (503)``."""


class InventoryView(View):
    """One page of the inventory."""

    models: dict[str, tuple[SnapshotRow, ...]]
    endpoints: dict[str, tuple[Endpoint, ...]]
    next: str | None
    """Query string of the next page, or None on the last."""


async def build(ctx: ServerContext, *, model: str | None, after: tuple[str, int] | None) -> InventoryView:
    """One page of snapshots from ``after`` on, with what serves them, in four queries."""
    found = await snapshots.read_snapshot_page(ctx.pool, limit=PAGE_SIZE + 1, after=after, model=model)
    more, found = len(found) > PAGE_SIZE, found[:PAGE_SIZE]
    refs = [(s.model, s.version) for s in found]
    models = sorted({m for m, _ in refs})
    live = await deployments.read_live_of(ctx.pool, refs)
    tables = await traffic.read_traffic_of(ctx.pool, models)
    latest = {(r["model"], r["version"]): r for r in await runs.read_latest_of(ctx.pool, refs)}
    shares: dict[str, str] = {}
    for table in tables:
        for route in table.routes:
            shares[route.deployment_id] = "shadow" if route.shadow else f"{route.weight}%"
    endpoint_of = {(t.runtime, t.model) for t in tables}
    serving: dict[tuple[str, int], list[Serving]] = defaultdict(list)
    for d in live:
        on_endpoint = (d.runtime, d.model) in endpoint_of and d.mode.value == "online"
        serving[(d.model, d.version)].append(
            Serving(
                stage=d.stage,
                runtime=d.runtime,
                mode=d.mode.value,
                state=d.state.value,
                share=shares.get(d.id, "0%") if on_endpoint else None,
            )
        )
    rows: dict[str, list[SnapshotRow]] = defaultdict(list)
    for s in found:
        run = latest.get((s.model, s.version))
        rows[s.model].append(
            SnapshotRow(
                model=s.model,
                version=s.version,
                sha256=s.sha256,
                service_tags=s.service_tags,
                created_at=s.created_at,
                serving=tuple(serving[(s.model, s.version)]),
                run_state=run["state"] if run else None,
                run_stage=run["stage"] if run else None,
            )
        )
    endpoints: dict[str, list[Endpoint]] = defaultdict(list)
    for t in tables:
        endpoints[t.model].append(
            Endpoint(
                model=t.model,
                stage=t.stage,
                runtime=t.runtime,
                endpoint=t.endpoint,
                versions=describe_routes(t.routes),
            )
        )
    last = found[-1] if found else None
    following = None
    if more and last is not None:
        query = {"after_model": last.model, "after_version": str(last.version)}
        following = urlencode({**query, "model": model} if model is not None else query)
    return InventoryView(
        models={m: tuple(r) for m, r in rows.items()},
        endpoints={m: tuple(e) for m, e in endpoints.items()},
        next=following,
    )


@page
async def inventory(request: Request, ctx: ServerContext, principal: Principal) -> Response:
    """``GET /[?model=M][&after_model=M&after_version=N]``: one page of the inventory."""
    after_model = request.query_params.get("after_model")
    after_version = int_param(request, "after_version")
    after = (after_model, after_version) if after_model and after_version else None
    model = request.query_params.get("model") or None
    view = await build(ctx, model=model, after=after)
    return render(request, "inventory.html", principal, view=view, model=model)
