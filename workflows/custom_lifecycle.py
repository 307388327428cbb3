"""``CustomLifecycle``: one dynamic workflow that runs every uploaded lifecycle.

It serves each workflow type that no registered class claims, so a lifecycle uploaded
with ``mlc lifecycle upload`` can be started by its name at once, on workers that were
running before the upload. Each run loads the newest source through an activity; that
result lands in the run's history, so replays and restarted workers keep running the
version the run started with.

Only the sandboxed lifecycle worker (``mlc worker --lifecycles``, task queue
``<main>-lifecycles``) registers it; every activity it schedules goes to the main queue,
served by trusted workers that treat its payloads as hostile.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError
from temporalio import workflow
from temporalio.common import RawValue
from temporalio.exceptions import ActivityError, ApplicationError

from workflows.base import LifecycleFunction, LifecycleWorkflow

with workflow.unsafe.imports_passed_through():
    from temporalio.worker.workflow_sandbox import RestrictedWorkflowAccessError

    from lifecycles import standard
    from lifecycles._run import LifecycleFailure, cause_message
    from lifecycles.api import Lifecycle
    from lifecycles.lifecycle_code import code_filename, describe_error, load_lifecycle
    from mlc import names
    from mlc.contracts import inventory as inv
    from mlc.contracts.inventory import LoadLifecycleInput
    from mlc.contracts.lifecycle import LifecycleResult, StartLifecycleInput
    from mlc.errors import InvalidLifecycleError

START_INPUT_HINT = '{"model": "cc-fraud", "version": 1}'


# The SDK's typing overloads omit failure_exception_types for dynamic workflows; at run
# time defn() applies it to them as to named ones (malformed input fails the run).
@workflow.defn(dynamic=True, failure_exception_types=[ValidationError])  # type: ignore[call-overload]
class CustomLifecycle(LifecycleWorkflow):
    """Run the uploaded lifecycle named by the workflow type.

    Every failure that retrying the workflow task cannot fix ends the run with a
    readable reason: an unknown name, code that does not load, or an exception from the
    uploaded code (its version is pinned, so a redeploy could never repair the run).
    """

    @workflow.run
    async def run(self, args: Sequence[RawValue]) -> LifecycleResult:
        """Load the newest version of the lifecycle and run it for the decoded input."""
        name = workflow.info().workflow_type
        try:
            loaded = await inv.LOAD_LIFECYCLE.execute(
                LoadLifecycleInput(name=name), task_queue=names.main_task_queue(workflow.info().task_queue)
            )
        except ActivityError as exc:
            raise ApplicationError(cause_message(exc), type="LifecycleNotFound", non_retryable=True) from exc
        if not args:
            raise ApplicationError(
                f"{name} needs an input such as {START_INPUT_HINT}",
                type="LifecycleNotStarted",
                non_retryable=True,
            )
        request = workflow.payload_converter().from_payload(args[0].payload, StartLifecycleInput)
        filename = code_filename(loaded.name, loaded.version)
        try:
            code = load_lifecycle(loaded.source, filename=filename)
        except InvalidLifecycleError as exc:
            # The message starts with <lifecycle NAME@VERSION>:LINE, naming what failed.
            raise ApplicationError(str(exc), type="InvalidLifecycleError", non_retryable=True) from None
        return await self.run_lifecycle(
            request,
            name=f"{loaded.name}@{loaded.version}",
            default_spec=code.spec or standard.SPEC,
            body=_guarded(code.run, filename),
        )


def _guarded(entry: LifecycleFunction, filename: str) -> LifecycleFunction:
    """Wrap uploaded ``run`` so its bugs fail the run with ``file:line`` instead of a task retry.

    Lifecycle failures and activity errors pass through unchanged: the frame reports
    them. Nondeterminism errors pass too, except the sandbox's refusals, which only
    uploaded code can trigger here.
    """

    async def body(mlc: Lifecycle) -> None:
        try:
            await entry(mlc)
        except (LifecycleFailure, ActivityError):
            raise
        except Exception as exc:
            sdk_error = isinstance(exc, workflow.NondeterminismError)
            if sdk_error and not isinstance(exc, RestrictedWorkflowAccessError):
                raise
            raise LifecycleFailure(describe_error(exc, filename), kind="LifecycleCodeError") from exc

    return body
