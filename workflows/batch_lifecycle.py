"""``BatchPromotion``: the built-in batch-only lifecycle, startable from the Web UI."""

from __future__ import annotations

from pydantic import ValidationError
from temporalio import workflow

from workflows.base import LifecycleWorkflow

with workflow.unsafe.imports_passed_through():
    from lifecycles import batch_promotion
    from mlc.contracts.lifecycle import LifecycleResult, StartLifecycleInput


@workflow.defn(name=batch_promotion.NAME, failure_exception_types=[ValidationError])
class BatchPromotion(LifecycleWorkflow):
    """Promote one snapshot DEV -> SIT -> UAT -> PROD as batch jobs, one gate before PROD.

    ``failure_exception_types`` makes malformed input a failed run with pydantic's
    message, as for ``ModelLifecycle``.
    """

    @workflow.run
    async def run(self, request: StartLifecycleInput) -> LifecycleResult:
        """Run the batch promotion for ``request.model@request.version``."""
        return await self.run_lifecycle(
            request, name=batch_promotion.NAME, default_spec=batch_promotion.SPEC, body=batch_promotion.run
        )
