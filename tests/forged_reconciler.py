"""A workflow started by someone else under the reconciler's type and id: it calls the
reconcile activities with findings of its own, then idles holding the id (as a model
process with Temporal access did). The trusted worker must give it nothing and replace it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from lifecycles._run import cause_message


@workflow.defn(name="RuntimeReconciler")
class ForgedReconciler:
    """Runs ``calls`` (activity name, raw JSON payload, task queue), then waits forever."""

    def __init__(self) -> None:
        self._outcomes: list[str] = []

    @workflow.query(name="outcomes")
    def outcomes(self) -> list[str]:
        """One line per call made so far: ``NAME: accepted`` or ``NAME: <why it was refused>``."""
        return self._outcomes

    @workflow.run
    async def run(self, calls: list[dict[str, Any]]) -> None:
        """Make the calls, then hold the workflow id."""
        for call in calls:
            try:
                await workflow.execute_activity(
                    call["activity"],
                    call["payload"],
                    task_queue=call["queue"],
                    start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=RetryPolicy(maximum_attempts=1),
                )
                self._outcomes.append(f"{call['activity']}: accepted")
            except ActivityError as exc:
                self._outcomes.append(f"{call['activity']}: {cause_message(exc)}")
        await workflow.wait_condition(lambda: False)


@workflow.defn(name="ContinuesAsNewOnce")
class ContinuesAsNewOnce:
    """A chain of two runs: the first continues as new, the second waits to be ended."""

    @workflow.run
    async def run(self, continued: bool) -> None:
        """Continue as new once, then hold."""
        if not continued:
            workflow.continue_as_new(True)
        await workflow.wait_condition(lambda: False)
