"""Routing a model's stable endpoint and observing its traffic on the runtime's gateway."""

from __future__ import annotations

import abc
import asyncio
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from activities.runtimes.base import Heartbeat, RuntimeDriver, check_deployment_id
from activities.runtimes.gateway.nginx import (
    LOG_FLUSH_SECONDS,
    Backend,
    compare,
    endpoint_parts,
    parse_log,
    render_model,
    route_stats,
)
from activities.runtimes.gateway.tier import Gateway, gateway_settings
from mlc.contracts.traffic import RouteStats, RouteTrafficResult, ShadowComparison, TrafficObservation
from mlc.domain import GatewaySettings, Runtime, TrafficRoute, check_name, check_routes
from mlc.errors import DeploymentFailedError, NotFoundError, RefusedError


def _model_files(gateway: Gateway, model: str) -> tuple[Path, Path]:
    return gateway.conf / "http" / f"{model}.conf", gateway.conf / "models" / f"{model}.conf"


async def route(
    driver: GatewayRouted,
    runtime: Runtime,
    model: str,
    routes: Sequence[TrafficRoute],
    heartbeat: Heartbeat,
    *,
    repair: bool = False,
    as_of: datetime | None = None,
) -> RouteTrafficResult:
    """Make ``routes`` answer ``model``'s stable endpoint on ``runtime``; return once live.

    Each change leaves ``routes/MODEL.json`` (its routes and ``as_of``, when they were
    decided). With ``repair`` (the reconciler's call, ``as_of`` when the inventory recorded
    its table) a gateway that is down is started again, and the routes are replaced only
    when they differ from the table and the table is newer: a lifecycle that moved traffic
    after the reconciler read the table keeps its change, and a table recorded without
    its change applied (hostile workflow code skipping the route step) wins.

    Each route's deployment is located by ``driver`` (never taken from a payload); a
    route to a deployment that does not run is refused.

    Raises:
        RefusedError: no gateway settings, a bad model name, routes or deployment id.
        NotFoundError: a routed deployment has no live server on the runtime.
        DeploymentFailedError: nginx is missing, refused the configuration, or did not
            start or reload in time (with its error log).
    """
    config = gateway_settings(runtime)
    check_name(model, "model name")
    try:
        check_routes(tuple(routes))
    except ValueError as exc:
        raise RefusedError(f"routes of model {model} on runtime {runtime.name}: {exc}") from None
    for item in routes:
        check_deployment_id(item.deployment_id)
    gateway = driver.gateway(runtime)
    async with gateway.locked():
        started = await gateway.ensure(heartbeat)
        http_path, server_path = _model_files(gateway, model)
        applied_path = gateway.root / "routes" / f"{model}.json"
        files = http_path.exists() and server_path.exists()
        held = _held(applied_path) if repair and files else None
        if repair and files and held is None:  # written before routes were recorded: kept
            return _routed(gateway, config, model, started, [])
        if held is not None and _keeps(held, routes, as_of):
            # The routes it holds stay; written again only when a backend's address changed
            # (a server started again by the reconciler answers on a new socket or port).
            routes, decided = held[0], held[1]
            try:
                backends = await _backends(driver, gateway, runtime, routes)
            except (NotFoundError, DeploymentFailedError):
                backends = None  # a routed deployment is down: keep what the gateway has
            if backends is None or held[2] == _addresses(backends):
                return _routed(gateway, config, model, started, backends or [])
        else:
            backends = await _backends(driver, gateway, runtime, routes)
            decided = as_of or datetime.now(UTC)
        http, server = render_model(
            runtime=runtime.name, model=model, backends=backends, logs=gateway.paths.logs
        )
        generation = await gateway.apply({http_path: http, server_path: server}, heartbeat)
        applied_path.parent.mkdir(mode=0o700, exist_ok=True)
        applied = {
            "as_of": decided.isoformat(),
            "routes": [r.model_dump(mode="json") for r in routes],
            "upstreams": _addresses(backends),
        }
        gateway._write(applied_path, json.dumps(applied))
    return _routed(gateway, config, model, started, backends, generation)


async def _backends(
    driver: RuntimeDriver, gateway: Gateway, runtime: Runtime, routes: Sequence[TrafficRoute]
) -> list[Backend]:
    """The routes that get traffic, each located by the driver (which checks a socket's
    owner) and at the address the gateway reaches it by."""
    backends = []
    for item in routes:
        if item.shadow or item.weight > 0:
            endpoint = await driver.locate(runtime, item.deployment_id)
            address, prefix = endpoint_parts(endpoint)
            address = await asyncio.to_thread(gateway.backend_address, item.deployment_id, address)
            backends.append(Backend(route=item, address=address, prefix=prefix))
    return backends


def _addresses(backends: Sequence[Backend]) -> dict[str, str]:
    return {b.route.deployment_id: b.address + b.prefix for b in backends}


def _routed(
    gateway: Gateway,
    config: GatewaySettings,
    model: str,
    started: bool,
    backends: Sequence[Backend],
    generation: str | None = None,
) -> RouteTrafficResult:
    """What :func:`route` answers: the stable endpoint and the gateway's facts."""
    return RouteTrafficResult(
        endpoint=config.endpoint(model),
        details={
            **gateway.details(),
            "generation": generation or gateway.live_generation_file(),
            "started": started,
            "upstreams": {b.route.deployment_id: b.address for b in backends},
        },
    )


Held = tuple[tuple[TrafficRoute, ...], datetime, dict[str, str] | None]
"""Routes a gateway holds, when they were decided, and the addresses they were written with."""


def _held(applied_path: Path) -> Held | None:
    """What ``routes/MODEL.json`` says the gateway holds (None: nothing readable, as
    files written before routes were recorded)."""
    try:
        applied = json.loads(applied_path.read_text())
        routes = tuple(TrafficRoute.model_validate(r) for r in applied["routes"])
        decided = datetime.fromisoformat(applied["as_of"])
        upstreams = applied.get("upstreams")
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return routes, decided, dict(upstreams) if isinstance(upstreams, dict) else None


def _keeps(held: Held, routes: Sequence[TrafficRoute], as_of: datetime | None) -> bool:
    """A repair keeps the routes the gateway holds: they are the same, or decided later
    than ``as_of``."""
    return list(held[0]) == list(routes) or as_of is None or held[1] >= as_of


async def observe(
    driver: GatewayRouted,
    runtime: Runtime,
    model: str,
    routes: Sequence[TrafficRoute],
    since: datetime,
    until: datetime,
) -> TrafficObservation:
    """What the gateway saw for ``routes`` of ``model`` in ``[since, until]``.

    Answering routes' stats come from the access log (live requests only); the shadow's
    from the mirror log (mirrored requests); with a shadow, both versions' captured
    answers to the same requests are compared.
    """
    config = gateway_settings(runtime)
    check_name(model, "model name")
    for item in routes:
        check_deployment_id(item.deployment_id)
    gateway = driver.gateway(runtime)
    pending = until.timestamp() + LOG_FLUSH_SECONDS + 0.2 - time.time()
    if pending > 0:  # entries of the window's last second may still sit in nginx's log buffer
        await asyncio.sleep(min(pending, LOG_FLUSH_SECONDS + 0.2))
    live = parse_log(gateway.log_lines(f"{model}.access.log"), since, until)
    stats: list[RouteStats] = [route_stats(r, live) for r in routes if not r.shadow]
    comparison: ShadowComparison | None = None
    shadow = next((r for r in routes if r.shadow), None)
    answering = [r for r in routes if not r.shadow and r.weight > 0]
    if shadow is not None:
        mirrored = parse_log(gateway.log_lines(f"{model}.mirror.log"), since, until)
        stats.append(route_stats(shadow, mirrored))
        if answering:
            primary = max(answering, key=lambda r: r.weight)
            ids = {str(e.get("id")) for e in live if e.get("route") == primary.deployment_id}
            start = since.timestamp() - 1.0  # answers are recorded a moment before the log line
            primary_answers = await driver.read_captures(runtime, primary.deployment_id, since=start)
            shadow_answers = await driver.read_captures(runtime, shadow.deployment_id, since=start)
            comparison = compare(
                primary_id=primary.deployment_id,
                shadow_id=shadow.deployment_id,
                primary={k: v for k, v in primary_answers.items() if k in ids},
                shadow=shadow_answers,
                shadow_errors=sum(1 for e in mirrored if int(e.get("status", 0)) >= 500),
            )
    return TrafficObservation(
        endpoint=config.endpoint(model), since=since, until=until, routes=tuple(stats), shadow=comparison
    )


class GatewayRouted(RuntimeDriver):
    """A driver whose runtimes put the gateway in front of their online deployments: it
    routes and observes through :func:`route` and :func:`observe`, and reads what its
    deployments' servers recorded for the shadow comparison."""

    @abc.abstractmethod
    def gateway(self, runtime: Runtime) -> Gateway:
        """The kind's gateway tier in front of ``runtime`` (a process, containers...)."""

    async def route(
        self,
        runtime: Runtime,
        model: str,
        routes: Sequence[TrafficRoute],
        heartbeat: Heartbeat,
        *,
        repair: bool = False,
        as_of: datetime | None = None,
    ) -> RouteTrafficResult:
        """See :func:`route`."""
        return await route(self, runtime, model, routes, heartbeat, repair=repair, as_of=as_of)

    async def observe(
        self,
        runtime: Runtime,
        model: str,
        routes: Sequence[TrafficRoute],
        since: datetime,
        until: datetime,
    ) -> TrafficObservation:
        """See :func:`observe`."""
        return await observe(self, runtime, model, routes, since, until)

    @abc.abstractmethod
    async def read_captures(self, runtime: Runtime, deployment_id: str, *, since: float) -> dict[str, Any]:
        """Request id -> answer the deployment's server recorded since ``since`` (see
        :mod:`mlc.serving.capture`); empty when it does not run."""
