"""``Rollback``: one signed decision puts a previous version back behind a stage's endpoints.

Started by ``mlc rollback`` on the main queue with the signed statement. The trusted
``verify_rollback`` activity verifies it, resolves the version and records the run and the
decision; then, per gateway runtime of the stage and concurrently:

- **warm** (the version still runs there, serving or in standby): route all traffic to it
  (authorize -> route -> record, cause ``rollback by NAME: REASON``); the replaced version
  stays warm for the default grace, like after a promotion. Seconds.
- **cold** (retired there): redeploy it from its snapshot, smoke-test it, then route.

Deterministic code only; every side effect is an activity by its contract.
"""

from __future__ import annotations

import asyncio

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from lifecycles._run import LifecycleFailure, LifecycleRun, cause_message
    from mlc import names
    from mlc.contracts.rollback import (
        VERIFY_ROLLBACK,
        RollbackInput,
        RollbackResult,
        RollbackTarget,
        RolledBack,
        VerifyRollbackInput,
        VerifyRollbackResult,
    )
    from mlc.domain import LifecycleSpec, LifecycleState, StageSpec, TestKind, TrafficRoute


@workflow.defn(name=names.ROLLBACK)
class Rollback:
    """Verify a signed rollback, then route (warm) or redeploy and route (cold) per runtime."""

    @workflow.run
    async def run(self, request: RollbackInput) -> RollbackResult:
        """Roll back; fails with the refusal (``RefusedError``...) when the decision does not verify."""
        started = workflow.now()
        queue = names.main_task_queue(workflow.info().task_queue)
        try:
            verified = await VERIFY_ROLLBACK.execute(
                VerifyRollbackInput(envelope=request.envelope), task_queue=queue
            )
        except ActivityError as exc:
            raise ApplicationError(cause_message(exc), type=_cause_type(exc), non_retryable=True) from None
        snap = verified.snapshot
        run = LifecycleRun(
            name=names.ROLLBACK,
            model=snap.model,
            version=snap.version,
            spec=LifecycleSpec(stages=(StageSpec(name=verified.stage, tests=(TestKind.SMOKE,)),)),
        )
        run.snapshot = snap
        run.stage = verified.stage
        workflow.set_current_details(
            f"**{snap.model}@{snap.version}**: {verified.cause} (in {verified.stage})"
        )
        try:
            done = await asyncio.gather(*(_restore(run, verified, t) for t in verified.targets))
        except (LifecycleFailure, ActivityError) as exc:
            reason = exc.reason if isinstance(exc, LifecycleFailure) else cause_message(exc)
            run.state, run.reason = LifecycleState.FAILED, reason
            await run.record_run(ended=True)
            kind = exc.kind if isinstance(exc, LifecycleFailure) else _cause_type(exc)
            raise ApplicationError(reason, type=kind, non_retryable=True) from None
        run.state = LifecycleState.SUCCEEDED
        await run.record_run(ended=True)
        return RollbackResult(
            model=snap.model,
            stage=verified.stage,
            version=snap.version,
            replaced=verified.replaces,
            signer=verified.signer,
            reason=verified.reason,
            runtimes=tuple(done),
            seconds=(workflow.now() - started).total_seconds(),
            workflow_id=workflow.info().workflow_id,
            run_id=workflow.info().run_id,
        )


async def _restore(run: LifecycleRun, verified: VerifyRollbackResult, target: RollbackTarget) -> RolledBack:
    """Put the verified version behind one runtime's endpoint (redeploying it when cold)."""
    stage, runtime = verified.stage, target.runtime
    chosen = target.warm
    if chosen is None:
        deployed = await run.deploy_to(stage, runtime)
        report = await run.test(stage, [deployed], tests=(TestKind.SMOKE,))
        if not report.passed:
            await run.undeploy([deployed])
            raise LifecycleFailure(
                f"{run.model}@{run.version}, redeployed on runtime {runtime.name} from its snapshot, "
                f"failed its smoke test ({report.failures()}); nothing was routed there",
                kind="DeploymentFailed",
            )
        chosen = deployed
    routes = (TrafficRoute(deployment_id=chosen.id, version=chosen.version, weight=100),)
    endpoints = await run.route(stage, {runtime.name: routes}, verified.cause)
    return RolledBack(
        runtime=runtime.name,
        endpoint=endpoints[runtime.name],
        version=chosen.version,
        deployment_id=chosen.id,
        warm=target.warm is not None,
    )


def _cause_type(exc: BaseException) -> str:
    """The innermost application error's type (``RefusedError``, ``NotFoundError``...)."""
    kind = "RollbackFailed"
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, ApplicationError) and current.type:
            kind = current.type
        current = current.__cause__
    return kind
