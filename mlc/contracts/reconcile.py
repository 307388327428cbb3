"""Contracts of the runtime reconciler: its workflow's input and its activities.

One :data:`RECONCILER` workflow per runtime checks the runtime's serving deployments every
``interval_seconds``. The inventory side (main task queue, trusted worker) decides what
to check and what a finding means; the runtime side (the runtime's task queue) only
probes and restarts, each on a grant the platform signed for that one deployment. The
reconciler can therefore restart a deployment the inventory already has serving, with
the snapshot it was admitted with, or mark it failed: never deploy anything new.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import Field
from temporalio.common import RetryPolicy

from mlc import names
from mlc.contracts.base import ActivityContract
from mlc.domain import Frozen, Runtime
from mlc.statements import Envelope

RECONCILER = names.RUNTIME_RECONCILER
"""The workflow type; its id is :func:`reconciler_id` (one per runtime and main queue)."""
RECONCILE_NOW = "reconcile_now"
"""Signal: run a round at once (sent by every start, e.g. when ``mlc dev`` comes back)."""
ROUNDS_PER_RUN = 100
"""Rounds before the workflow continues as new, keeping its history short."""

PLAN_TIMEOUT = timedelta(seconds=30)
PROBE_TIMEOUT = timedelta(minutes=2)
RESTART_TIMEOUT = timedelta(minutes=30)
"""As long as a deploy: bringing a container back may rebuild its image."""
RECONCILE_HEARTBEAT = timedelta(seconds=30)


def reconciler_id(task_queue: str, runtime: str) -> str:
    """``reconcile/<main queue>/<runtime>``: one reconciler per runtime of an installation.

    The main queue is part of the id because installations (and tests) can share one
    Temporal namespace while naming their runtimes alike.
    """
    return f"reconcile/{task_queue}/{runtime}"


class ReconcileInput(Frozen):
    """The reconciler's input: which runtime, and how often to check it."""

    runtime: str
    interval_seconds: float = Field(default=30.0, gt=0)


class PlanInput(Frozen):
    """Which runtime's serving deployments to check."""

    runtime: str


class Plan(Frozen):
    """What to check this round: a probe grant per serving deployment.

    ``runtime`` is None once the runtime has been removed: the reconciler then ends.
    """

    runtime: Runtime | None
    probes: tuple[Envelope, ...] = ()
    watching: tuple[str, ...] = ()
    """The deployment ids the probes are for, in the same order."""
    restarting: tuple[str, ...] = ()
    """Deployments restarted in earlier rounds that have not yet been seen healthy since."""
    retire: tuple[Envelope, ...] = ()
    """Undeploy grants for warm standbys to take down now (already recorded retired): online
    deployments on a runtime with a gateway that answer no stable endpoint, whose grace has
    passed and whose own lifecycle has ended."""
    retired: tuple[str, ...] = ()
    """The deployment ids of ``retire``, in the same order."""
    routes: tuple[Envelope, ...] = ()
    """``route_traffic`` grants, one per stable endpoint on the runtime, for the routes the
    inventory recorded: applied again after the round, so a gateway that died with its
    worker (``mlc dev`` stopped, a host rebooted) comes back, and a deployment restarted
    on another port is found there. Applying unchanged routes to a live gateway is a no-op."""
    routed: tuple[str, ...] = ()
    """The models of ``routes``, in the same order."""


class GrantsInput(Frozen):
    """Platform grants, one per deployment, for a runtime activity to act on."""

    grants: tuple[Envelope, ...]


class Finding(Frozen):
    """What the runtime found for one deployment (by a probe, or after a restart)."""

    deployment_id: str
    healthy: bool
    detail: str = ""
    """Why it is not healthy: exited, gone, not answering ``/health``."""
    log_tail: str = ""
    restarted: bool = False
    """This finding follows a restart attempt (healthy: it is back up)."""
    endpoint: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    """Driver facts after a restart (pid, container id), recorded with the deployment."""
    evidence: Envelope | None = None
    """This finding (without this field) signed by the runtime's evidence key
    (:mod:`mlc.trust.evidence`, kind ``probe`` or ``restart``): the inventory acts on a
    finding of a runtime served by its own worker only when it verifies."""


class Findings(Frozen):
    """A runtime activity's findings, one per grant it was given."""

    findings: tuple[Finding, ...] = ()


class SettleInput(Frozen):
    """Findings for the inventory to act on."""

    runtime: str
    findings: tuple[Finding, ...]


class Settlement(Frozen):
    """What the inventory decided: restart these, remove those (marked failed)."""

    restart: tuple[Envelope, ...] = ()
    remove: tuple[Envelope, ...] = ()
    """Undeploy grants for what must not keep running (failed, or retired meanwhile)."""
    failed: tuple[str, ...] = ()
    restarted: tuple[str, ...] = ()


PLAN = ActivityContract("plan_reconciliation", PlanInput, Plan, PLAN_TIMEOUT)
SETTLE = ActivityContract("settle_reconciliation", SettleInput, Settlement, PLAN_TIMEOUT)
PROBE_RETRY = RetryPolicy(maximum_interval=timedelta(seconds=10), maximum_attempts=3)
"""An engine that stays unreachable ends the round (nothing is marked); the next one retries."""

PROBE = ActivityContract(
    "probe_deployments", GrantsInput, Findings, PROBE_TIMEOUT, RECONCILE_HEARTBEAT, PROBE_RETRY
)
RESTART = ActivityContract(
    "restart_deployments", GrantsInput, Findings, RESTART_TIMEOUT, RECONCILE_HEARTBEAT, PROBE_RETRY
)

INVENTORY_CONTRACTS = (PLAN, SETTLE)
"""Served by the trusted main worker, next to the other inventory activities."""
RUNTIME_CONTRACTS = (PROBE, RESTART)
"""Served on every runtime's task queue, next to deploy and undeploy."""


class ReconcilerStatus(Frozen):
    """The reconciler's ``status`` query: how many rounds ran and what the last one did."""

    runtime: str
    rounds: int = 0
    """Rounds since this run (of the continue-as-new chain) started."""
    watching: tuple[str, ...] = ()
    """Deployments the last round checked."""
    last: str = ""
    """What the last round found or did, in a sentence."""
