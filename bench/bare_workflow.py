"""A bare Temporal workflow for ``bench_orchestration.py``: trivial activities and update gates.

It has the shape of a lifecycle with nothing behind it: ``segments[i]`` no-op activities
run one after another, and between two segments the run waits on a condition that the
``approve`` Workflow Update sets. Measuring it on the same server as ``ModelLifecycle``
shows what Temporal itself costs, so the lifecycle's extra time is ours.

The workflow lives in an importable module (not ``__main__``) because the workflow
sandbox re-imports it.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel, ConfigDict

WORKFLOW_NAME = "BenchBareLifecycle"
NOOP_ACTIVITY = "bench_noop"
NOOP_TIMEOUT = timedelta(seconds=10)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunBareInput(_Frozen):
    """How many no-op activities each segment runs; a gate sits between two segments."""

    segments: tuple[int, ...]


class RunBareResult(_Frozen):
    """How many activities the run executed."""

    activities: int


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
        """Run every segment's activities in order, waiting for approval between segments."""
        executed = 0
        for index, count in enumerate(request.segments):
            self._segment = index
            for _ in range(count):
                await workflow.execute_activity(
                    noop,
                    NoopInput(step=executed),
                    result_type=NoopResult,
                    start_to_close_timeout=NOOP_TIMEOUT,
                )
                executed += 1
            if index < len(request.segments) - 1:
                self._waiting = True
                await workflow.wait_condition(lambda: self._approved)
                self._waiting = False
                self._approved = False
        await workflow.wait_condition(workflow.all_handlers_finished)
        return RunBareResult(activities=executed)
