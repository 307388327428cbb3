"""Build and run workers: the main one (built-in workflows + inventory + local runtimes),
one next to a runtime's engine (``mlc worker --runtime NAME``), or the lifecycle worker
that runs uploaded code (``mlc worker --lifecycles``, sandboxed)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from temporalio.client import Client
from temporalio.worker import Worker

from mlc.config import Settings
from mlc.names import lifecycles_task_queue
from workers.catalog import LIFECYCLE_WORKFLOWS, MAIN_WORKFLOWS, inventory_activities, runtime_activities

log = logging.getLogger(__name__)


def build_main_worker(
    client: Client,
    settings: Settings,
    pool: asyncpg.Pool,
    *,
    task_queue: str | None = None,
    max_cached_workflows: int | None = None,
) -> Worker:
    """The worker of ``settings.task_queue``: the built-in workflows, the inventory and the
    runtime activities for runtimes on that queue (the default local ones). Uploaded
    lifecycles are not among them: they run on the lifecycle worker only.
    ``max_cached_workflows`` defaults to ``settings.workflow_cache``."""
    return Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=list(MAIN_WORKFLOWS),
        activities=[*inventory_activities(pool, settings), *runtime_activities(settings)],
        max_cached_workflows=settings.workflow_cache
        if max_cached_workflows is None
        else max_cached_workflows,
    )


def build_lifecycle_worker(client: Client, main_queue: str, *, max_cached_workflows: int = 1000) -> Worker:
    """The worker of uploaded lifecycles: ``CustomLifecycle`` on ``<main_queue>-lifecycles``
    and no activity, so whatever the code does, its side effects are activities on the
    main queue, run by trusted workers."""
    return Worker(
        client,
        task_queue=lifecycles_task_queue(main_queue),
        workflows=list(LIFECYCLE_WORKFLOWS),
        max_cached_workflows=max_cached_workflows,
    )


def build_runtime_worker(client: Client, settings: Settings, task_queue: str) -> Worker:
    """A worker serving only a runtime's activities on its own task queue."""
    return Worker(client, task_queue=task_queue, activities=runtime_activities(settings))


async def run_until(worker: Worker, stop: asyncio.Event) -> None:
    """Run ``worker`` until ``stop`` is set, then shut it down gracefully."""
    async with worker:
        log.info("worker polling task queue %s", worker.task_queue)
        await stop.wait()
