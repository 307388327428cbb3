"""A workflow that calls activities with payloads of its own: what uploaded code could send
if it escaped every check. The activities on trusted workers must refuse each one."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from lifecycles._run import cause_message


@workflow.defn(name="HostilePayloads")
class HostilePayloads:
    """Runs ``calls`` (activity name, raw JSON payload, task queue) and returns each outcome."""

    @workflow.run
    async def run(self, calls: list[dict[str, Any]]) -> list[str]:
        """One line per call: ``NAME: accepted`` or ``NAME: <why it was refused>``."""
        outcomes = []
        for call in calls:
            try:
                await workflow.execute_activity(
                    call["activity"],
                    call["payload"],
                    task_queue=call["queue"],
                    start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=RetryPolicy(maximum_attempts=1),
                )
                outcomes.append(f"{call['activity']}: accepted")
            except ActivityError as exc:
                outcomes.append(f"{call['activity']}: {cause_message(exc)}")
        return outcomes
