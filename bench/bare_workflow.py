"""A bare Temporal workflow for the orchestration benches: no-op activities and update gates.

It has the shape of a lifecycle with nothing behind it. Each segment is a sequence of
no-op activities in the order a real lifecycle run's history holds them: ``a`` is a
scheduled (regular) activity, ``l`` a local activity, which runs inside the workflow task
that needs it, as a built-in lifecycle's inventory calls do. Between two segments the run
waits on a condition that the ``approve`` Workflow Update sets. Measuring it on the same
server as ``ModelLifecycle`` shows what Temporal itself costs for the same number and kind
of activities, so the lifecycle's extra time is ours.

Run as a module it is the bare side's worker process (``bench_load.py`` runs it beside the
``mlc worker`` it measures, so both sides pay the same process boundary and cache limit).

The workflow lives in an importable module (not ``__main__``) because the workflow
sandbox re-imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio import activity, workflow

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel, ConfigDict

WORKFLOW_NAME = "BenchBareLifecycle"
NOOP_ACTIVITY = "bench_noop"
NOOP_TIMEOUT = timedelta(seconds=10)
SCHEDULED = "a"
"""A segment step run as a scheduled (regular) activity: a task queue round trip."""
LOCAL = "l"
"""A segment step run as a local activity, in the workflow task that needs it."""
LOCAL_ACTIVITY_MARKER = "core_local_activity"
"""The marker a local activity's result is recorded under in history (Temporal's SDK core)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunBareInput(_Frozen):
    """Each segment's steps (a string of ``a``/``l``); a gate sits between two segments."""

    segments: tuple[str, ...]


class RunBareResult(_Frozen):
    """How many activities of each kind the run executed."""

    scheduled: int
    local: int


class BarePhase(_Frozen):
    """The ``phase`` query: which segment runs and whether its gate waits for approval."""

    segment: int
    waiting: bool


class NoopInput(_Frozen):
    """The no-op activity's argument (echoed back)."""

    step: int


class NoopResult(_Frozen):
    """The no-op activity's result."""

    step: int


async def segments_of(handle: Any) -> tuple[str, ...]:
    """A finished run's activities as bare segments, read from its history.

    ``ActivityTaskScheduled`` is a scheduled activity (``a``), ``MarkerRecorded`` under
    :data:`LOCAL_ACTIVITY_MARKER` a local one (``l``), in history order; every accepted
    Workflow Update (a gate decision) starts the next segment, so what a decision's
    handler runs (verifying it) counts where it runs: after the gate opened.
    """
    from temporalio.api.enums.v1 import EventType

    segments = [""]
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            segments[-1] += SCHEDULED
        elif (
            event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
            and event.marker_recorded_event_attributes.marker_name == LOCAL_ACTIVITY_MARKER
        ):
            segments[-1] += LOCAL
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            segments.append("")
    return tuple(segments)


@dataclass(frozen=True)
class GateTask:
    """The workflow task that accepted one gate decision, from the run's history (seconds).

    Local activities run inside it; their markers hold no wall-clock durations (their times
    are workflow time), so what the handler and the code it unblocks cost is ``worker``
    as a whole, compared with the bare run's."""

    dispatch: float
    """Scheduled -> started: the server handing the task to a worker."""
    worker: float
    """Started -> completed: the worker running the update handler, its local activities and
    the code the decision unblocked, until the task's first scheduled activity."""


async def gate_tasks(handle: Any) -> list[GateTask]:
    """The workflow task that accepted each Workflow Update (a gate decision) in a run's history."""
    from temporalio.api.enums.v1 import EventType

    scheduled = started = completed = None
    tasks: list[GateTask] = []
    async for event in handle.fetch_history_events():
        at = event.event_time.ToDatetime()
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
            scheduled = at
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
            started = at
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            completed = at
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            if scheduled and started and completed:
                tasks.append(
                    GateTask((started - scheduled).total_seconds(), (completed - started).total_seconds())
                )
    return tasks


def update_only(segments: tuple[str, ...]) -> tuple[str, ...]:
    """The same steps, with the local activities that follow each gate moved behind the
    segment's first scheduled activity: a gate's decision then costs a bare Workflow Update
    and nothing else (the baseline a skeptic would pick; same work per run)."""
    moved = [segments[0]]
    for steps in segments[1:]:
        rest = steps.lstrip(LOCAL)
        ahead = len(steps) - len(rest)
        if rest.startswith(SCHEDULED):
            moved.append(SCHEDULED + LOCAL * ahead + rest[1:])
        else:
            moved.append(steps)
    return tuple(moved)


def describe(segments: tuple[str, ...]) -> str:
    """``segments`` as counts: "13 scheduled + 38 local (segments a/l: 4/10, 3/9, ...)"."""
    scheduled = sum(s.count(SCHEDULED) for s in segments)
    local = sum(s.count(LOCAL) for s in segments)
    split = ", ".join(f"{s.count(SCHEDULED)}/{s.count(LOCAL)}" for s in segments)
    gated = ", ".join(str(len(s) - len(s.lstrip(LOCAL))) for s in segments[1:])
    return (
        f"{scheduled} scheduled + {local} local activities (per segment, scheduled/local: {split}; "
        f"local activities between each gate's decision and the next scheduled one: {gated})"
    )


@activity.defn(name=NOOP_ACTIVITY)
async def noop(request: NoopInput) -> NoopResult:
    """Do nothing: the activity costs only Temporal's scheduling and the worker round trip."""
    return NoopResult(step=request.step)


@workflow.defn(name=WORKFLOW_NAME)
class BareLifecycle:
    """Segments of no-op activities separated by update-driven gates."""

    def __init__(self) -> None:
        self._segment = 0
        self._waiting = False
        self._approved = False

    @workflow.query(name="phase")
    def phase(self) -> BarePhase:
        """The current segment and whether it waits at its gate."""
        return BarePhase(segment=self._segment, waiting=self._waiting)

    @workflow.update(name="approve")
    async def approve(self, segment: int) -> int:
        """Open the gate that ends ``segment``; returns the segment approved."""
        self._approved = True
        return segment

    @approve.validator
    def _check_approve(self, segment: int) -> None:
        if not self._waiting or self._approved:
            raise ValueError(f"segment {self._segment} is not waiting for approval")
        if segment != self._segment:
            raise ValueError(f"waiting at segment {self._segment}, not {segment}")

    @workflow.run
    async def run(self, request: RunBareInput) -> RunBareResult:
        """Run every segment's steps in order, waiting for approval between segments."""
        scheduled = local = 0
        for index, steps in enumerate(request.segments):
            self._segment = index
            for step in steps:
                arg = NoopInput(step=scheduled + local)
                if step == LOCAL:
                    await workflow.execute_local_activity(
                        noop, arg, result_type=NoopResult, start_to_close_timeout=NOOP_TIMEOUT
                    )
                    local += 1
                else:
                    await workflow.execute_activity(
                        noop, arg, result_type=NoopResult, start_to_close_timeout=NOOP_TIMEOUT
                    )
                    scheduled += 1
            if index < len(request.segments) - 1:
                self._waiting = True
                await workflow.wait_condition(lambda: self._approved)
                self._waiting = False
                self._approved = False
        await workflow.wait_condition(workflow.all_handlers_finished)
        return RunBareResult(scheduled=scheduled, local=local)


async def serve(address: str, task_queue: str, cache: int) -> None:
    """Serve the bare workflow on ``task_queue`` until SIGTERM/SIGINT."""
    import asyncio
    import signal

    from temporalio.client import Client
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.worker import Worker

    client = await Client.connect(
        address, data_converter=pydantic_data_converter, identity="bench-bare-worker"
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[BareLifecycle],
        activities=[noop],
        max_cached_workflows=cache,
    ):
        await stop.wait()


if __name__ == "__main__":
    import argparse
    import asyncio

    parser = argparse.ArgumentParser(description="serve BenchBareLifecycle (a bench's bare worker)")
    parser.add_argument("--address", required=True)
    parser.add_argument("--task-queue", required=True)
    parser.add_argument("--cache", type=int, required=True, help="max_cached_workflows")
    args = parser.parse_args()
    # The sandbox re-imports the workflow's module by name: serve the importable one, not __main__.
    from bench.bare_workflow import serve as serve_bare

    asyncio.run(serve_bare(args.address, args.task_queue, args.cache))
