"""Deployments and stable endpoints as ``mlc deployments`` shows them.

Gateway health and Kafka consumer lag are checked from the process that runs this: the
server under ``MLC_API_URL``, the CLI's host in direct mode.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import TYPE_CHECKING, Any

from mlc.domain import Deployment, Mode
from mlc.errors import MLCError
from mlc.store import deployments, runtimes, traffic
from mlc.traffic import TrafficTable, describe_routes

if TYPE_CHECKING:
    import asyncpg

    from mlc.config import Settings

ENDPOINT_COLUMNS = ["endpoint", "model", "stage", "runtime", "gateway", "versions", "updated_at"]
DEPLOYMENT_COLUMNS = ["model", "version", "stage", "runtime", "mode", "state", "traffic", "endpoint", "id"]


def deployment_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The table's columns: streaming deployments add their topics and lag."""
    if any(row.get("mode") == Mode.STREAMING.value for row in rows):
        return [*DEPLOYMENT_COLUMNS[:-1], "topics", "lag", DEPLOYMENT_COLUMNS[-1]]
    return DEPLOYMENT_COLUMNS


async def deployment_rows(
    pool: asyncpg.Pool,
    *,
    model: str | None,
    stage: str | None,
    all_: bool,
    after: tuple[datetime, str] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Deployments oldest first (live ones unless ``all_``), each with its place behind its
    model's stable endpoint and, streaming ones, their topics and lag."""
    found = await deployments.read_deployments(
        pool, live_only=not all_, model=model, stage=stage, after=after, limit=limit
    )
    if not found:
        return []
    tables = await traffic.read_traffic(pool, model=model, stage=stage)
    served = {(t.runtime, t.model): t for t in tables}
    rows = [
        {**d.model_dump(mode="json"), **_traffic_view(d, served.get((d.runtime, d.model)))} for d in found
    ]
    if not any(d.mode is Mode.STREAMING for d in found):
        return [{**row, "topics": None, "lag": None} for row in rows]
    from mlc.streaming.report import streaming_view  # Kafka's client: only when needed

    known = {r.name: r for r in await runtimes.read_runtimes(pool)}
    views = await asyncio.gather(*(asyncio.to_thread(streaming_view, d, known.get(d.runtime)) for d in found))
    return [{**row, **view} for row, view in zip(rows, views, strict=True)]


async def endpoint_rows(
    pool: asyncpg.Pool,
    settings: Settings,
    *,
    model: str | None,
    stage: str | None,
    after: tuple[str, str, str] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Stable endpoints by stage, model and runtime, with their gateway's state and their
    versions' shares."""
    tables = await traffic.read_traffic(pool, model=model, stage=stage, after=after, limit=limit)
    gateways = await _gateways_state(pool, settings, tables)
    return [_endpoint_row(t, gateways) for t in tables]


async def _gateways_state(
    pool: asyncpg.Pool, settings: Settings, tables: list[TrafficTable]
) -> dict[str, str]:
    """Runtime -> ``up``, or ``down: WHY`` (the gateway must answer with its own proof, so a
    program holding its port shows as down, naming it)."""
    if not tables:
        return {}
    from activities.runtimes.registry import gateway_for

    wanted = {t.runtime for t in tables}
    state = {}
    for runtime in await runtimes.read_runtimes(pool):
        if runtime.name in wanted and runtime.gateway is not None:
            try:
                why = await gateway_for(settings, runtime).health()
            except (MLCError, OSError) as exc:
                why = f"cannot be checked here ({exc})"
            state[runtime.name] = "up" if why is None else f"down: {why}"
    return state


def _endpoint_row(table: TrafficTable, gateways: dict[str, str]) -> dict[str, Any]:
    """One stable endpoint as listed: its gateway's state, its versions' shares, and the
    routes themselves."""
    return {
        **table.model_dump(mode="json"),
        "gateway": gateways.get(table.runtime, "down: the runtime has no gateway"),
        "versions": describe_routes(table.routes),
        "shares": {f"v{r.version}": ("shadow" if r.shadow else r.weight) for r in table.routes},
    }


def _traffic_view(deployment: Deployment, table: TrafficTable | None) -> dict[str, object]:
    """A deployment's place behind its model's stable endpoint on its runtime (if it has one)."""
    if table is None or deployment.mode is not Mode.ONLINE:
        return {"stable_endpoint": None, "share": None, "shadow": False, "traffic": None}
    route = next((r for r in table.routes if r.deployment_id == deployment.id), None)
    standby = deployment.details.get("retire_after")
    if route is not None:
        shown = "shadow" if route.shadow else f"{route.weight}%"
    elif deployment.state.value == "serving":
        shown = f"standby until {str(standby)[:19]}" if standby else "0%"
    else:
        shown = None
    return {
        "stable_endpoint": table.endpoint,
        "share": route.weight if route is not None else 0,
        "shadow": bool(route and route.shadow),
        "standby_until": standby if route is None else None,
        "traffic": shown,
    }
