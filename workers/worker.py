"""Build and run workers: the main one (workflows + inventory + local runtimes) or one
next to a runtime's engine (``mlc worker --runtime NAME``)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from temporalio.client import Client
from temporalio.worker import Worker

from mlc.config import Settings
from workers.registry import ALL_WORKFLOWS, inventory_activities, runtime_activities

log = logging.getLogger(__name__)


def build_main_worker(
    client: Client,
    settings: Settings,
    pool: asyncpg.Pool,
    *,
    task_queue: str | None = None,
    max_cached_workflows: int = 1000,
) -> Worker:
    """The worker of ``settings.task_queue``: every workflow, the inventory and the
    runtime activities for runtimes on that queue (the default local ones)."""
    return Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=list(ALL_WORKFLOWS),
        activities=[*inventory_activities(pool, settings), *runtime_activities(settings)],
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
