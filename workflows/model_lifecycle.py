"""``ModelLifecycle``: the standard lifecycle, startable from the Web UI with plain JSON."""

from __future__ import annotations

from pydantic import ValidationError
from temporalio import workflow

from workflows.base import LifecycleWorkflow

with workflow.unsafe.imports_passed_through():
    from lifecycles import standard
    from mlc.contracts.lifecycle import LifecycleResult, StartLifecycleInput


@workflow.defn(name=standard.NAME, failure_exception_types=[ValidationError])
class ModelLifecycle(LifecycleWorkflow):
    """Promote one snapshot DEV -> SIT -> UAT -> PROD.

    ``failure_exception_types`` turns malformed input (a pydantic error while decoding the
    argument) into a failed run with pydantic's message, instead of a workflow task
    retried forever.
    """

    @workflow.run
    async def run(self, request: StartLifecycleInput) -> LifecycleResult:
        """Run the standard lifecycle for ``request.model@request.version``."""
        return await self.run_lifecycle(
            request, name=standard.NAME, default_spec=standard.SPEC, body=standard.run
        )
