"""Container health check of an ``mlc worker``: Temporal answers and the task queue has a poller.

Installed as ``/opt/mlc/healthcheck.py`` by the root Dockerfile and run by its HEALTHCHECK.
It reads the same variables as the worker (``TEMPORAL_ADDRESS``, ``TEMPORAL_NAMESPACE``,
``MLC_TASK_QUEUE``) and exits 0 when the frontend answers and at least one worker polled
the workflow task queue recently, else 1 with one line saying what is missing.

It checks the queue, not this very process: another worker on the same queue also makes
it pass. A ``mlc worker --runtime NAME`` container should set ``MLC_TASK_QUEUE`` to that
runtime's queue so the check looks at the right one; ``MLC_HEALTHCHECK_QUEUE`` names
another queue to watch (the lifecycle worker's ``<MLC_TASK_QUEUE>-lifecycles``).
"""

from __future__ import annotations

import asyncio
import os
import sys

TIMEOUT_SECONDS = 8.0


async def _check() -> str | None:
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
    from temporalio.client import Client

    address = os.environ.get("TEMPORAL_ADDRESS", "127.0.0.1:7233")
    namespace = os.environ.get("TEMPORAL_NAMESPACE", "default")
    queue = os.environ.get("MLC_HEALTHCHECK_QUEUE") or os.environ.get("MLC_TASK_QUEUE", "mlc")
    try:
        client = await Client.connect(address, namespace=namespace)
    except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
        return f"cannot reach Temporal at {address}: {exc}"
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=namespace,
            task_queue=TaskQueue(name=queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
    )
    if not response.pollers:
        return f"no worker polls task queue {queue!r} in namespace {namespace!r} at {address}"
    return None


def main() -> int:
    """Run the check and return the process exit code."""
    try:
        problem = asyncio.run(asyncio.wait_for(_check(), TIMEOUT_SECONDS))
    except Exception as exc:  # noqa: BLE001
        problem = f"health check failed: {exc!r}"
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    print("healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
