"""A deliberately changed ``ModelLifecycle`` for the replay test: it skips DEV, so replaying
a recorded history against it must raise a nondeterminism error."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from lifecycles import standard
    from lifecycles.api import Lifecycle
    from mlc.contracts.lifecycle import LifecycleResult, StartLifecycleInput
    from workflows.base import LifecycleWorkflow


async def _skip_dev(mlc: Lifecycle) -> None:
    for stage in mlc.stages[1:]:
        await mlc.deploy(stage.name)


@workflow.defn(name="ModelLifecycle")
class ReorderedLifecycle(LifecycleWorkflow):
    """Same name and input as the real one; different commands."""

    @workflow.run
    async def run(self, request: StartLifecycleInput) -> LifecycleResult:
        """Run the changed body."""
        return await self.run_lifecycle(request, name="x", default_spec=standard.SPEC, body=_skip_dev)
