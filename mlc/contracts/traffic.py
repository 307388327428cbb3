"""Contracts of stable endpoints: who answers a model's endpoint, and what the gateway saw.

Each runtime with :class:`~mlc.domain.GatewaySettings` runs a real proxy (nginx) in front
of its online deployments: ``http://HOST:PORT/models/MODEL/...`` never changes, while the
inventory's traffic table says which deployments answer it and with which share.

A traffic change is three steps, so that nothing acts on a payload from workflow code:

1. :data:`AUTHORIZE_TRAFFIC` (main queue, trusted): checks the routes name live online
   deployments of this run's model on that runtime and stage (versions not answering
   there already only when they are the run's own, or the target of a verified rollback),
   checks the stage policy, and signs a ``route_traffic``
   (or ``observe_traffic``) grant.
2. :data:`ROUTE_TRAFFIC` (the runtime's queue): the driver locates each granted
   deployment itself, rewrites the model's gateway configuration and reloads the proxy
   gracefully (in-flight requests finish on the old configuration). Idempotent.
3. :data:`RECORD_TRAFFIC` (main queue): stores the table and appends a ``traffic`` entry
   to the audit trail naming the run and the cause (``promote``, ``canary 25%``,
   ``rollback by alice: <reason>``...).

:data:`READ_TRAFFIC` (main queue) reads the routes live for this run's model on each gateway
runtime of a stage. :data:`OBSERVE_TRAFFIC` reads the gateway's access log (and, for a shadow, the captured
answers of both versions to the same requests) over a time window.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import Field

from mlc.contracts.base import ActivityContract
from mlc.contracts.inventory import RuntimeGrantResult
from mlc.contracts.runtime import RuntimeActionInput
from mlc.domain import MAX_GRACE, Frozen, TrafficRoute
from mlc.statements import Envelope
from mlc.traffic import TrafficTable

TRAFFIC_TIMEOUT = timedelta(minutes=2)
"""Rewriting a configuration and reloading a proxy (starting it the first time)."""
TRAFFIC_HEARTBEAT = timedelta(seconds=30)
ROUTE_TIMEOUT = timedelta(minutes=10)
"""A traffic change's whole time, its turn included: changes of one endpoint (and of one
gateway) take turns, and a waiting change heartbeats, so a change is failed by
:data:`TRAFFIC_HEARTBEAT` when its worker is gone, never for waiting. The work itself, once
it holds the gateway, is bounded on the worker (2 x 30 s reload waits and ``nginx -t``)."""
INVENTORY_TIMEOUT = timedelta(seconds=30)
DEFAULT_GRACE = timedelta(minutes=10)
"""How long a version moved off a stable endpoint stays warm, unless the stage says otherwise."""


class AuthorizeTrafficInput(Frozen):
    """Ask for a grant to set (or observe) the routes of this run's model on one runtime."""

    stage: str
    runtime: str
    routes: tuple[TrafficRoute, ...]
    action: Literal["route_traffic", "observe_traffic"] = "route_traffic"


class RouteTrafficResult(Frozen):
    """The model's stable endpoint on the runtime, and driver facts (config file, proxy pid)."""

    endpoint: str
    details: dict[str, Any] = Field(default_factory=dict)


class RecordTrafficInput(Frozen):
    """The routes now live behind ``endpoint``, and what caused the change."""

    stage: str
    runtime: str
    routes: tuple[TrafficRoute, ...]
    endpoint: str
    cause: str
    """Why traffic moved: ``promote``, ``canary 25%``, ``canary rolled back: ...``,
    ``shadow``, ``rollback by NAME: REASON`` (the actor is the run, recorded with it)."""
    grace: timedelta = Field(default=DEFAULT_GRACE, ge=timedelta(0), le=MAX_GRACE)
    """How long deployments that stop answering stay warm (standby) before the runtime's
    reconciler retires them (0: at its next round); see :attr:`mlc.domain.StageSpec.grace`."""
    grant: Envelope | None = None
    """The ``route_traffic`` grant the change was applied with: its ``as_of`` (when the
    inventory authorized it) orders changes of one endpoint, so an older decision recorded
    after a newer one does not replace it in the table (it is recorded as superseded).
    None (runs started before it was sent): the change counts as decided when recorded."""


class ReadTrafficInput(Frozen):
    """Which stage's stable endpoints of this run's model to read."""

    stage: str


class ReadTrafficResult(Frozen):
    """The stable endpoints of this run's model on every gateway runtime of the stage."""

    tables: tuple[TrafficTable, ...] = ()


class ObserveTrafficInput(Frozen):
    """What the gateway saw for the granted routes between ``since`` and ``until``."""

    grant: Envelope
    since: datetime
    until: datetime


class RouteStats(Frozen):
    """Live requests one deployment answered in a window: count, server errors, latency."""

    deployment_id: str
    version: int
    requests: int = 0
    errors: int = 0
    """Answers with status 5xx (or no answer: the gateway's 502/504)."""
    p50_ms: float | None = None
    p99_ms: float | None = None

    @property
    def error_rate(self) -> float:
        """Errors per request (0 with no requests)."""
        return self.errors / self.requests if self.requests else 0.0


class ShadowComparison(Frozen):
    """Both versions' answers to the same mirrored requests, compared."""

    primary_id: str
    shadow_id: str
    pairs: int
    """Requests both answered (the join of their captured answers by request id)."""
    agreement_rate: float | None = None
    """Share of records whose predicted label is the same."""
    mean_abs_diff: float | None = None
    """Mean absolute difference of the scores (probabilities) of the same records."""
    max_abs_diff: float | None = None
    shadow_errors: int = 0

    def metrics(self) -> dict[str, float]:
        """The numbers a shadow verdict records (what the inventory matches with the
        gateway runtime's signed observation); none when no pair was compared."""
        if self.pairs == 0:
            return {}
        found: dict[str, float] = {"pairs": float(self.pairs), "shadow_errors": float(self.shadow_errors)}
        for key in ("agreement_rate", "mean_abs_diff", "max_abs_diff"):
            value = getattr(self, key)
            if value is not None:
                found[key] = float(value)
        return found


class TrafficObservation(Frozen):
    """The gateway's view of one model's endpoint over a window."""

    endpoint: str
    since: datetime
    until: datetime
    routes: tuple[RouteStats, ...] = ()
    shadow: ShadowComparison | None = None
    evidence: Envelope | None = None
    """This observation (without this field) signed by the gateway runtime's evidence key:
    the numbers a shadow verdict recorded as evidence is judged on."""


class VerifyObservationsInput(Frozen):
    """Observations of this run's model in ``stage`` that a traffic decision is about to rest on."""

    stage: str
    observations: tuple[TrafficObservation, ...]


AUTHORIZE_TRAFFIC = ActivityContract(
    "authorize_traffic", AuthorizeTrafficInput, RuntimeGrantResult, INVENTORY_TIMEOUT
)
RECORD_TRAFFIC = ActivityContract("record_traffic", RecordTrafficInput, type(None), INVENTORY_TIMEOUT)
VERIFY_OBSERVATIONS = ActivityContract(
    "verify_observations", VerifyObservationsInput, type(None), INVENTORY_TIMEOUT
)
"""A canary step is judged only on observations its gateway runtime signed (verified here)."""
READ_TRAFFIC = ActivityContract("read_traffic", ReadTrafficInput, ReadTrafficResult, INVENTORY_TIMEOUT)
ROUTE_TRAFFIC = ActivityContract(
    "route_traffic", RuntimeActionInput, RouteTrafficResult, ROUTE_TIMEOUT, TRAFFIC_HEARTBEAT
)
OBSERVE_TRAFFIC = ActivityContract(
    "observe_traffic", ObserveTrafficInput, TrafficObservation, TRAFFIC_TIMEOUT, TRAFFIC_HEARTBEAT
)

INVENTORY_CONTRACTS = (AUTHORIZE_TRAFFIC, RECORD_TRAFFIC, READ_TRAFFIC, VERIFY_OBSERVATIONS)
"""Served by the trusted main worker."""
RUNTIME_CONTRACTS = (ROUTE_TRAFFIC, OBSERVE_TRAFFIC)
"""Served on each runtime's task queue."""
