"""Which workflows and activities each kind of worker serves.

Three kinds, by trust:

- the main worker (task queue ``mlc``): the built-in workflows and every inventory
  activity, plus the runtime activities of runtimes on that queue; it holds the
  database role and the platform key;
- runtime workers (a runtime's own queue): the runtime activities only, no database;
- the lifecycle worker (``mlc-lifecycles``): uploaded lifecycles only, no activities and
  no credentials, in a sandbox (see :mod:`workers.sandbox`).

Activities with a contract (:mod:`mlc.contracts`) are registered through it: a worker
lacking an implementation of one of its contracts refuses to start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from activities.inventory import InventoryActivities
from activities.reconcile import ReconcileInventory, ReconcileRuntime
from activities.rollback import RollbackInventory
from activities.runtime import RuntimeActivities
from activities.testing import TestingActivities
from mlc.config import Settings
from mlc.contracts import inventory, reconcile, rollback, traffic
from mlc.contracts import runtime as rt
from mlc.contracts.base import implementations
from workflows.batch_lifecycle import BatchPromotion
from workflows.custom_lifecycle import CustomLifecycle
from workflows.model_lifecycle import ModelLifecycle
from workflows.reconciler import RuntimeReconciler
from workflows.rollback import Rollback

ALL_WORKFLOWS: Sequence[type] = (ModelLifecycle, BatchPromotion, CustomLifecycle, RuntimeReconciler, Rollback)
"""Every workflow class; the replay test replays histories against exactly these."""

LIFECYCLE_WORKFLOWS: Sequence[type] = (CustomLifecycle,)
"""Workflows of the sandboxed lifecycle worker: the dynamic one running uploaded code."""

MAIN_WORKFLOWS: Sequence[type] = tuple(w for w in ALL_WORKFLOWS if w not in LIFECYCLE_WORKFLOWS)
"""Workflows of the trusted main worker: everything but uploaded code."""


def runtime_activities(settings: Settings) -> list[Callable[..., Any]]:
    """Activities a runtime's task queue serves: deploy, batch, undeploy, test, the
    gateway's route and observe, and the reconciler's probe and restart."""
    runtime = RuntimeActivities(settings)
    testing = TestingActivities(settings)
    watch = ReconcileRuntime(settings)
    return [
        *implementations(runtime, (rt.DEPLOY_ONLINE, rt.RUN_BATCH_JOB, rt.DEPLOY_STREAMING, rt.UNDEPLOY)),
        *implementations(runtime, traffic.RUNTIME_CONTRACTS),
        *implementations(testing, (rt.RUN_STAGE_TESTS,)),
        *implementations(watch, reconcile.RUNTIME_CONTRACTS),
    ]


def inventory_activities(pool: asyncpg.Pool, settings: Settings) -> list[Callable[..., Any]]:
    """Activities of the main task queue that read and write the inventory."""
    inv = InventoryActivities(pool, settings)
    return [
        *implementations(inv, inventory.CONTRACTS),
        *implementations(ReconcileInventory(pool, settings), reconcile.INVENTORY_CONTRACTS),
        # the traffic activities with what a verified rollback decision allows (activities.rollback)
        *implementations(
            RollbackInventory(pool, settings), (*traffic.INVENTORY_CONTRACTS, *rollback.INVENTORY_CONTRACTS)
        ),
    ]
