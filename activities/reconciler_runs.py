"""Which run is a runtime's reconciler: the one a trusted worker started and recorded.

Anyone with Temporal access can start a workflow of type ``RuntimeReconciler`` under the
reconciler's id (type and id are the starter's choice), or terminate the real one. So a
trusted worker records the first run of the chain it starts (``reconcilers`` table), the
reconcile activities serve only runs of that chain (continue-as-new keeps the first run
id), and :func:`ensure_reconciler` terminates whatever else holds the id, starts the real
one and says so in the audit trail and a notification.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.boundary import CallingRun
from mlc.config import Settings
from mlc.contracts.reconcile import RECONCILE_NOW, RECONCILER, ReconcileInput, reconciler_id
from mlc.errors import RefusedError
from mlc.store import audit, reconcilers, trail

START_ATTEMPTS = 3
"""Starts raced by someone else taking the id meanwhile, before giving up."""

_chains: dict[tuple[str, str], str] = {}
"""(workflow id, run id) -> first run id of its chain: Temporal's facts never change."""


async def first_run_of(client: Client, workflow_id: str, run_id: str) -> str:
    """The first run id of the continue-as-new chain ``run_id`` belongs to, as Temporal
    recorded it in the run's first history event (not as anyone's payload says); "" for a
    run Temporal does not know."""
    key = (workflow_id, run_id)
    if key not in _chains:
        events = client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history_events(page_size=1)
        try:
            async for event in events:
                started = event.workflow_execution_started_event_attributes
                _chains[key] = started.first_execution_run_id or run_id
                break
        except RPCError as exc:
            if exc.status is not RPCStatusCode.NOT_FOUND:
                raise
    return _chains.get(key, "")


async def check_reconciler(pool: asyncpg.Pool, settings: Settings, runtime: str, caller: CallingRun) -> None:
    """In an activity: refuse every caller but the chain a trusted worker started as
    ``runtime``'s reconciler (Temporal, through the activity's client, says which chain).

    Raises:
        RefusedError: another workflow type or id, or a run no trusted worker recorded.
    """
    expected = reconciler_id(settings.task_queue, runtime)
    if caller.workflow_type != RECONCILER or caller.workflow_id != expected:
        raise RefusedError(
            f"only the reconciler of runtime {runtime} ({RECONCILER} {expected}) may reconcile it, "
            f"not {caller.workflow_type} {caller.workflow_id}"
        )
    recorded = await reconcilers.read_first_run(pool, expected)
    chain = await first_run_of(activity.client(), caller.workflow_id, caller.run_id) if recorded else None
    if recorded is None or chain != recorded:
        raise RefusedError(
            f"only the reconciler a trusted worker started for runtime {runtime} may reconcile it: "
            f"run {caller.run_id} of {expected} is not that run (a trusted worker replaces it)"
        )


async def ensure_reconciler(
    client: Client, settings: Settings, pool: asyncpg.Pool, runtime: str, *, nudge: bool = True
) -> None:
    """Make sure the runtime's recorded reconciler runs; ``nudge``: have it check at once.

    A running reconciler of the recorded chain is signalled (so one about to end for lack
    of deployments goes on with the new one). Anything else holding the id is terminated,
    in the trail and told to people, and a new chain is started and recorded.

    Raises:
        RefusedError: someone kept taking the id between our checks and our start.
    """
    workflow_id = reconciler_id(settings.task_queue, runtime)
    for _ in range(START_ATTEMPTS):
        async with reconcilers.starting(pool, workflow_id) as conn:
            recorded = await reconcilers.read_first_run(conn, workflow_id)
            current = await _running(client, workflow_id)
            if current is not None and await first_run_of(client, workflow_id, current.run_id) == recorded:
                if not nudge or await _signalled(client, workflow_id, current.run_id):
                    return
                current = None  # it ended meanwhile: start the next one
            if current is not None:
                await _terminate(client, workflow_id, current.run_id)
            try:
                handle = await client.start_workflow(
                    RECONCILER,
                    ReconcileInput(runtime=runtime, interval_seconds=settings.reconcile_seconds),
                    id=workflow_id,
                    task_queue=settings.task_queue,
                )
            except WorkflowAlreadyStartedError:
                continue  # someone took the id after we looked: look again
            run_id = handle.first_execution_run_id or handle.result_run_id or ""
            await reconcilers.record_first_run(conn, workflow_id, runtime, run_id)
        if current is not None:
            await _report_impostor(pool, workflow_id, runtime, current, run_id)
        return
    raise RefusedError(f"could not start the reconciler {workflow_id}: its id kept being taken")


@dataclass(frozen=True)
class _Run:
    """A running execution under the reconciler's id, as Temporal describes it."""

    run_id: str
    workflow_type: str
    task_queue: str


async def _running(client: Client, workflow_id: str) -> _Run | None:
    """The running execution holding ``workflow_id``, if any."""
    try:
        described = await client.get_workflow_handle(workflow_id).describe()
    except RPCError as exc:
        if exc.status is RPCStatusCode.NOT_FOUND:
            return None
        raise
    if described.status is not WorkflowExecutionStatus.RUNNING:
        return None
    return _Run(described.run_id, described.workflow_type, described.task_queue)


async def _signalled(client: Client, workflow_id: str, run_id: str) -> bool:
    """Signal ``reconcile_now`` to the run; False when it has ended meanwhile."""
    try:
        await client.get_workflow_handle(workflow_id, run_id=run_id).signal(RECONCILE_NOW)
    except RPCError as exc:
        if exc.status is RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True


async def _terminate(client: Client, workflow_id: str, run_id: str) -> None:
    """Terminate exactly that run (one that ended meanwhile is fine)."""
    try:
        await client.get_workflow_handle(workflow_id, run_id=run_id).terminate(
            reason="not the reconciler a trusted worker started: replaced"
        )
    except RPCError as exc:
        if exc.status is not RPCStatusCode.NOT_FOUND:
            raise


async def _report_impostor(
    pool: asyncpg.Pool, workflow_id: str, runtime: str, impostor: _Run, run_id: str
) -> None:
    """Put the replacement in the audit trail and tell people (notifications)."""
    message = (
        f"the reconciler of runtime {runtime} was not the run a trusted worker started: "
        f"run {impostor.run_id} ({impostor.workflow_type} on task queue {impostor.task_queue}) held "
        f"{workflow_id}; it was terminated and replaced by run {run_id}"
    )
    await trail.append(
        pool,
        trail.RECONCILER,
        {
            "event": "impostor_replaced",
            "runtime": runtime,
            "impostor": {
                "run_id": impostor.run_id,
                "workflow_type": impostor.workflow_type,
                "task_queue": impostor.task_queue,
            },
        },
        workflow_id=workflow_id,
        run_id=run_id,
        idempotency_key=f"{workflow_id}/{run_id}/replaced",
    )
    await audit.create_notification(
        pool,
        workflow_id=workflow_id,
        model=None,
        version=None,
        message=message,
        idempotency_key=f"{workflow_id}/{run_id}/replaced",
    )
