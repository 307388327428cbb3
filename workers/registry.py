"""Which workflows and activities each kind of worker serves."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from activities.inventory import InventoryActivities
from activities.runtime import RuntimeActivities
from activities.testing import TestingActivities
from mlc.config import Settings
from workflows.batch_lifecycle import BatchPromotion
from workflows.custom_lifecycle import CustomLifecycle
from workflows.model_lifecycle import ModelLifecycle

ALL_WORKFLOWS: Sequence[type] = (ModelLifecycle, BatchPromotion, CustomLifecycle)
"""Every workflow class; the replay test replays histories against exactly these."""


def runtime_activities(settings: Settings) -> list[Callable[..., Any]]:
    """Activities a runtime's task queue serves: deploy, batch, undeploy, test."""
    runtime = RuntimeActivities(settings)
    testing = TestingActivities(settings)
    return [runtime.deploy_online, runtime.run_batch_job, runtime.undeploy, testing.run_stage_tests]


def inventory_activities(pool: asyncpg.Pool, settings: Settings) -> list[Callable[..., Any]]:
    """Activities of the main task queue that read and write the inventory."""
    inv = InventoryActivities(pool, settings)
    return [
        inv.begin_run,
        inv.record_run,
        inv.resolve_runtimes,
        inv.authorize_deployment,
        inv.authorize_undeploy,
        inv.verify_decision,
        inv.record_deployment,
        inv.find_live_deployments,
        inv.record_test_report,
        inv.record_decision,
        inv.resolve_approvers,
        inv.notify,
        inv.load_lifecycle_definition,
    ]
