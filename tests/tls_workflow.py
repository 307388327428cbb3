"""A tiny workflow and activity for the mTLS test (in their own module, which the workflow
sandbox re-imports): one workflow task, one activity task and their completions, each a
separate gRPC call through the TLS proxy."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow


@activity.defn
async def greet(name: str) -> str:
    """Say hello from an activity of the workflow type that called it."""
    return f"hello {name} from {activity.info().workflow_type}"


@workflow.defn
class TlsGreeting:
    """Run ``greet`` once and return its answer."""

    @workflow.run
    async def run(self, name: str) -> str:
        """Greet ``name`` through an activity."""
        return await workflow.execute_activity(greet, name, start_to_close_timeout=timedelta(seconds=30))
