"""What every lifecycle workflow shares: its message handlers and how a run begins and ends.

The built-in lifecycles and the dynamic workflow that runs uploaded ones subclass
:class:`LifecycleWorkflow`, so approvals, queries and the audit trail behave the same
whichever lifecycle code drives the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from lifecycles._run import LifecycleFailure, LifecycleRun, attach, cause_message
    from lifecycles.api import Lifecycle
    from mlc import names
    from mlc.contracts import inventory as inv
    from mlc.contracts.lifecycle import (
        LifecycleResult,
        LifecycleStatus,
        SignalDecision,
        SignedDecision,
        StartLifecycleInput,
    )
    from mlc.domain import ApprovalRecord, Decision, LifecycleSpec, LifecycleState
    from mlc.statements import decision_of

LifecycleFunction = Callable[[Lifecycle], Awaitable[None]]
"""A lifecycle's entry point: it gets the :class:`Lifecycle` facade, never the run itself."""


class LifecycleWorkflow:
    """Handlers and the begin/run/finish frame around a lifecycle function."""

    def __init__(self) -> None:
        self._mlc: LifecycleRun | None = None
        self._refused_early: list[str] = []
        """Signals refused before the run began (e.g. sent with its start), shown once it has."""

    # --- queries, updates, signals --------------------------------------------------------

    @workflow.query(name="status")
    def status(self) -> LifecycleStatus | None:
        """Current stage, state, test reports, pending gate and decisions."""
        return self._mlc.status() if self._mlc else None

    @workflow.update(name="approve")
    async def approve(self, request: SignedDecision) -> ApprovalRecord:
        """Approve the pending gate with a signed statement; returns the decision once recorded."""
        return await self._lifecycle.submit_decision(request.envelope, Decision.APPROVED)

    @approve.validator
    def _check_approve(self, request: SignedDecision) -> None:
        self._lifecycle.check_decision(request.envelope, Decision.APPROVED)

    @workflow.update(name="reject")
    async def reject(self, request: SignedDecision) -> ApprovalRecord:
        """Reject the pending gate with a signed statement; the run undeploys that stage and fails."""
        return await self._lifecycle.submit_decision(request.envelope, Decision.REJECTED)

    @reject.validator
    def _check_reject(self, request: SignedDecision) -> None:
        self._lifecycle.check_decision(request.envelope, Decision.REJECTED)

    @workflow.signal(name="decide")
    async def decide(self, *inputs: Any) -> None:
        """The same signed decision as a signal, for ``temporal workflow signal``.

        A signal cannot be refused to its sender, so an invalid one is ignored and listed
        under ``refused`` in the status query. Its input is decoded here, not by the SDK,
        which would drop one that does not decode (the old unsigned form, no input) unseen.
        """
        try:
            signal = _signal_decision(inputs)
            claim = decision_of(signal.envelope)[1]
            await self._lifecycle.submit_decision(signal.envelope, Decision(claim.decision))
        except (ValueError, ApplicationError) as exc:
            self._refuse(str(exc.message if isinstance(exc, ApplicationError) else exc))

    def _refuse(self, message: str) -> None:
        if self._mlc is None:
            self._refused_early.append(message)
        else:
            self._mlc.refuse(message)

    @property
    def _lifecycle(self) -> LifecycleRun:
        if self._mlc is None:
            raise ValueError("the lifecycle has not started yet; try again in a moment")
        return self._mlc

    # --- the run frame --------------------------------------------------------------------

    async def run_lifecycle(
        self,
        request: StartLifecycleInput,
        *,
        name: str,
        default_spec: LifecycleSpec,
        body: LifecycleFunction,
    ) -> LifecycleResult:
        """Claim the snapshot, run ``body``, and record how the run ended.

        On any failure the current stage's live deployments are undeployed, so a failed
        run leaves nothing half-done behind, and the workflow fails with the reason.
        """
        mlc = LifecycleRun(
            name=name,
            model=request.model,
            version=request.version,
            spec=request.spec or default_spec,
        )
        self._mlc = mlc
        for message in self._refused_early:
            mlc.refuse(message)
        facade = Lifecycle()
        attach(facade, mlc)
        workflow.upsert_search_attributes(
            [
                names.SA_MODEL.value_set(request.model),
                names.SA_VERSION.value_set(request.version),
            ]
        )
        try:
            begun = await inv.BEGIN_RUN.execute(
                inv.BeginRunInput(model=request.model, version=request.version),
                task_queue=names.main_task_queue(workflow.info().task_queue),
            )
        except ActivityError as exc:
            raise ApplicationError(cause_message(exc), type="LifecycleNotStarted") from exc
        mlc.snapshot = begun.snapshot
        workflow.upsert_search_attributes([names.SA_SERVICE_TAG.value_set(list(begun.snapshot.service_tags))])
        try:
            await body(facade)
        except (LifecycleFailure, ActivityError) as exc:
            kind = exc.kind if isinstance(exc, LifecycleFailure) else "LifecycleFailed"
            reason = exc.reason if isinstance(exc, LifecycleFailure) else cause_message(exc)
            await self._fail(mlc, reason)
            raise ApplicationError(reason, type=kind, non_retryable=True) from exc
        except asyncio.CancelledError:
            # Cancelled from the Web UI or `temporal workflow cancel`: the cancellation is
            # delivered once, so the run can still clean up like a failure (undeploy the
            # stage it was in, record its end, tell its followers), then end cancelled.
            await self._fail(mlc, "the run was cancelled")
            raise
        mlc.state = LifecycleState.SUCCEEDED
        workflow.set_current_details(f"**{mlc.model}@{mlc.version}** finished: succeeded")
        await mlc.record_run(ended=True)
        await mlc.notify(f"{mlc.model}@{mlc.version} completed {name}")
        await workflow.wait_condition(workflow.all_handlers_finished)
        last = mlc.stages[-1].name
        return LifecycleResult(
            model=mlc.model,
            version=mlc.version,
            stages=tuple(s.name for s in mlc.stages),
            deployments=tuple(mlc.deployments(last, live=False)),
        )

    async def _fail(self, mlc: LifecycleRun, reason: str) -> None:
        if mlc.stage is not None:
            await mlc.undeploy(mlc.deployments(mlc.stage))
        mlc.reason = reason
        mlc.state = LifecycleState.FAILED
        workflow.set_current_details(f"**{mlc.model}@{mlc.version}** failed: {reason}")
        await mlc.record_run(ended=True)
        await mlc.notify(f"{mlc.model}@{mlc.version} failed: {reason}")
        await workflow.wait_condition(workflow.all_handlers_finished)


def _signal_decision(inputs: tuple[Any, ...]) -> SignalDecision:
    """The ``decide`` signal's one input as a :class:`SignalDecision`.

    Raises:
        ValueError: no input, several, or one that is not a signed statement.
    """
    if len(inputs) != 1:
        raise ValueError(f"the decide signal takes one signed statement as its input, not {len(inputs)}")
    try:
        return SignalDecision.model_validate(inputs[0])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the input"
        raise ValueError(
            f"the decide signal's input is not a signed statement (`mlc approve ... --print-statement` "
            f"prints one): {where}: {first['msg']}"
        ) from None
