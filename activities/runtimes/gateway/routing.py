"""Routing a model's stable endpoint and observing its traffic on the runtime's gateway."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import json
import time
import weakref
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
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
from activities.runtimes.gateway.tier import READY_TIMEOUT_SECONDS, Gateway, gateway_settings
from mlc.contracts.traffic import RouteStats, RouteTrafficResult, ShadowComparison, TrafficObservation
from mlc.domain import GatewaySettings, Runtime, TrafficRoute, check_name, check_routes
from mlc.errors import DeploymentFailedError, NotFoundError, RefusedError
from mlc.traffic import describe_routes


def _model_files(gateway: Gateway, model: str) -> tuple[Path, Path]:
    return gateway.conf / "http" / f"{model}.conf", gateway.conf / "models" / f"{model}.conf"


APPLY_TIMEOUT_SECONDS = 2 * READY_TIMEOUT_SECONDS + 30.0
"""Longest one change may work once it holds the gateway (start it, write, ``nginx -t``,
reload): the time it may work, apart from the time it waited its turn."""
QUEUE_BEAT_SECONDS = 5.0
"""How often a change waiting in its endpoint's queue heartbeats (well inside
:data:`mlc.contracts.traffic.TRAFFIC_HEARTBEAT`)."""


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

    ``as_of`` is when the change was decided (the grant's authorization). Changes of one
    endpoint take turns (see :class:`_Queue`): the newest decision waiting wins, applied
    once for all that waited with it, and one older than what the gateway already holds
    changes nothing. Either way the call succeeds; a superseded change's result says so
    (``details["superseded_by"]``: when the routes now live were decided, and their shares).

    Each change leaves ``routes/MODEL.json`` (its routes and ``as_of``). With ``repair``
    (the reconciler's call, ``as_of`` when the inventory's table was decided) a gateway
    that is down is started again, and the routes are replaced only when they differ from
    the table and the table is newer: a lifecycle that moved traffic after the reconciler
    read the table keeps its change, and a table recorded without its change applied
    (hostile workflow code skipping the route step) wins.

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
    if repair:
        async with gateway.locked(lambda: heartbeat(f"waiting for the gateway of {runtime.name}")):
            repair_ = _repair(driver, gateway, config, runtime, model, routes, heartbeat, as_of)
            return await _bounded(repair_, gateway)
    loop = asyncio.get_running_loop()
    change = _Change(
        driver, gateway, runtime, tuple(routes), as_of or datetime.now(UTC), loop.create_future()
    )
    return await _Queue.of(gateway, model).submit(change, heartbeat)


@dataclass(eq=False)
class _Change:
    """One change of an endpoint waiting its turn, and the future its caller waits on."""

    driver: GatewayRouted
    gateway: Gateway
    runtime: Runtime
    routes: tuple[TrafficRoute, ...]
    decided: datetime
    outcome: asyncio.Future[RouteTrafficResult]

    def settle(self, result: RouteTrafficResult | BaseException) -> None:
        """Give the caller its result or error (once; a caller gone since reads nothing)."""
        if self.outcome.done():
            return
        if isinstance(result, BaseException):
            self.outcome.set_exception(result)
            self.outcome.exception()  # retrieved: a caller cancelled since is not an error to log
        else:
            self.outcome.set_result(result)


_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Path, str], _Queue]] = (
    weakref.WeakKeyDictionary()
)


class _Queue:
    """The changes of one model's endpoint on one gateway waiting in this process.

    Twenty runs of one model approved together make twenty changes of one endpoint. Applied
    one by one, each renders, runs ``nginx -t`` and reloads while the others wait, and the
    last waits for all nineteen. Here one task applies them: each time it holds the
    gateway's lock it takes every change waiting, applies the newest decision (one render,
    one ``nginx -t``, one reload) and settles the older ones as superseded by it, which
    is what applying them in order would have left live. Changes arriving meanwhile wait
    for the next turn. The task belongs to no activity (no caller's cancellation stops
    the others' change); each caller heartbeats while it waits, so a change is never
    cancelled for waiting its turn, and the work of one turn is bounded by
    :data:`APPLY_TIMEOUT_SECONDS`.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self.pending: list[_Change] = []
        self.runner: asyncio.Task[None] | None = None
        self.note = "queued behind another change of this endpoint"

    @classmethod
    def of(cls, gateway: Gateway, model: str) -> _Queue:
        """The queue of ``model``'s endpoint on ``gateway`` (in this process's event loop)."""
        queues = _queues.setdefault(asyncio.get_running_loop(), {})
        return queues.setdefault((gateway.root, model), cls(model))

    async def submit(self, change: _Change, heartbeat: Heartbeat) -> RouteTrafficResult:
        """Queue ``change`` and return its outcome, heartbeating while it waits."""
        self.pending.append(change)
        if self.runner is None or self.runner.done():
            # a context of its own: the task outlives the activity that happened to start it
            self.runner = asyncio.create_task(self._run(), context=contextvars.Context())
        try:
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(change.outcome), QUEUE_BEAT_SECONDS)
                except TimeoutError:
                    heartbeat(self.note)
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self.pending.remove(change)  # not taken yet: nobody applies it
            raise

    async def _run(self) -> None:
        """Take turns of the gateway's lock until no change waits."""
        batch: list[_Change] = []
        try:
            while self.pending:
                newest = max(self.pending, key=lambda c: c.decided)
                self.note = f"waiting for the gateway of {newest.runtime.name}"
                async with newest.gateway.locked():
                    batch = sorted(self.pending, key=lambda c: c.decided)
                    self.pending.clear()
                    await self._turn(batch)
        except asyncio.CancelledError:  # the event loop is closing: no caller waits forever
            for change in batch + self.pending:
                change.settle(DeploymentFailedError("the worker stopped before the change was applied"))
            raise
        except Exception as exc:  # the lock itself failed (its folder): every caller hears it
            for change in batch + self.pending:
                change.settle(exc)

    async def _turn(self, batch: list[_Change]) -> None:
        """Apply the newest change of ``batch`` (oldest first); the others are superseded by
        it. A change refused on its own (a deployment gone, or one not answering on its
        socket: a model can remove its own) fails alone and the next newest gets the turn,
        so no model can fail another's change by being newer; a gateway that fails fails
        them all (each caller retries)."""
        while batch:
            newest = batch.pop()
            self.note = f"changing the gateway of {newest.runtime.name}"
            try:
                result = await _bounded(_apply(newest, self.model, self._noted), newest.gateway)
            except (NotFoundError, RefusedError, _ChangeFailed) as exc:
                newest.settle(exc.error if isinstance(exc, _ChangeFailed) else exc)
                continue
            except Exception as exc:
                for change in (*batch, newest):
                    change.settle(exc)
                return
            newest.settle(result)
            for older in batch:
                older.settle(_superseded(result, newest.routes, newest.decided))
            return

    def _noted(self, note: str) -> None:
        """The applying change's progress, which the waiting callers heartbeat with."""
        self.note = note


async def _apply(change: _Change, model: str, heartbeat: Heartbeat) -> RouteTrafficResult:
    """Apply ``change`` (the gateway's lock held), unless the gateway holds a newer
    decision (another worker's): then it is superseded by that one."""
    gateway, config = change.gateway, gateway_settings(change.runtime)
    started = await gateway.ensure(heartbeat)
    held = _held(gateway.root / "routes" / f"{model}.json")
    if held is not None and held[1] > change.decided:
        return _superseded(_routed(gateway, config, model, started, []), held[0], held[1])
    try:
        backends = await _backends(change.driver, gateway, change.runtime, change.routes)
    except DeploymentFailedError as exc:
        raise _ChangeFailed(exc) from exc
    return await _write(gateway, config, model, change.routes, change.decided, backends, started, heartbeat)


class _ChangeFailed(Exception):
    """A change failed for its own deployments (locating them), not for the gateway."""

    def __init__(self, error: DeploymentFailedError) -> None:
        super().__init__(str(error))
        self.error = error


async def _bounded(work: Coroutine[Any, Any, RouteTrafficResult], gateway: Gateway) -> RouteTrafficResult:
    """``work`` on the gateway (its lock held), failed after :data:`APPLY_TIMEOUT_SECONDS`.

    Raises:
        DeploymentFailedError: it took longer (with the gateway's error logs).
    """
    try:
        return await asyncio.wait_for(work, APPLY_TIMEOUT_SECONDS)
    except TimeoutError:
        raise DeploymentFailedError(
            f"changing the gateway of runtime {gateway.runtime.name} took longer than "
            f"{APPLY_TIMEOUT_SECONDS:.0f} s; last lines of its error logs:\n{gateway.error_tail()}"
        ) from None


def _superseded(
    result: RouteTrafficResult, routes: tuple[TrafficRoute, ...], decided: datetime
) -> RouteTrafficResult:
    """``result`` of a newer change (``routes`` decided at ``decided``), told to the caller
    of an older one it replaced."""
    replaced = {"decided": decided.isoformat(), "shares": describe_routes(routes)}
    return result.model_copy(update={"details": {**result.details, "superseded_by": replaced}})


async def _repair(
    driver: GatewayRouted,
    gateway: Gateway,
    config: GatewaySettings,
    runtime: Runtime,
    model: str,
    routes: Sequence[TrafficRoute],
    heartbeat: Heartbeat,
    as_of: datetime | None,
) -> RouteTrafficResult:
    """The reconciler's change (the gateway's lock held): see :func:`route`."""
    started = await gateway.ensure(heartbeat)
    http_path, server_path = _model_files(gateway, model)
    if not (http_path.exists() and server_path.exists()):
        backends = await _backends(driver, gateway, runtime, routes)
        return await _write(
            gateway, config, model, routes, as_of or datetime.now(UTC), backends, started, heartbeat
        )
    held = _held(gateway.root / "routes" / f"{model}.json")
    if held is None:  # written before routes were recorded: kept
        return _routed(gateway, config, model, started, [])
    if not _keeps(held, routes, as_of):
        backends = await _backends(driver, gateway, runtime, routes)
        return await _write(
            gateway, config, model, routes, as_of or datetime.now(UTC), backends, started, heartbeat
        )
    # The routes it holds stay; written again only when a backend's address changed (a
    # server started again by the reconciler answers on a new socket or port).
    try:
        backends = await _backends(driver, gateway, runtime, held[0])
    except (NotFoundError, DeploymentFailedError):
        return _routed(gateway, config, model, started, [])  # a routed deployment is down: kept
    if held[2] == _addresses(backends):
        return _routed(gateway, config, model, started, backends)
    return await _write(gateway, config, model, held[0], held[1], backends, started, heartbeat)


async def _write(
    gateway: Gateway,
    config: GatewaySettings,
    model: str,
    routes: Sequence[TrafficRoute],
    decided: datetime,
    backends: list[Backend],
    started: bool,
    heartbeat: Heartbeat,
) -> RouteTrafficResult:
    """Render ``model``'s files for ``backends``, apply them (one ``nginx -t``, one reload)
    and note the routes and when they were decided in ``routes/MODEL.json``."""
    http_path, server_path = _model_files(gateway, model)
    http, server = render_model(
        runtime=gateway.runtime.name, model=model, backends=backends, logs=gateway.paths.logs
    )
    generation = await gateway.apply({http_path: http, server_path: server}, heartbeat)
    applied_path = gateway.root / "routes" / f"{model}.json"
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
