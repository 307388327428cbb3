"""``RuntimeReconciler``: one long-running workflow per runtime that keeps the inventory true.

Every ``interval_seconds`` (or at once on the ``reconcile_now`` signal) it asks the
inventory for the runtime's serving deployments, has the runtime's worker probe them,
and lets the inventory judge the findings: restart (when the runtime's restart policy
allows), or mark failed with the log tail and tell the lifecycle's followers. On a
runtime with a gateway it also retires the warm standbys the inventory says are due
(answering no stable endpoint, grace passed, own lifecycle ended), and applies the
recorded routes of its stable endpoints again (a gateway that died comes back). It ends
when it has nothing to watch (a deployment becoming serving starts it again) or the
runtime is removed, and continues as new every ``ROUNDS_PER_RUN`` rounds.

A workflow rather than a Temporal Schedule: a schedule would start a fresh workflow per
tick, listing thousands of short runs in the Web UI, and each would have to find the
runtime's state again; here one run per runtime holds it, a signal makes it check at
once, and a round that overlaps the next cannot happen.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from lifecycles.api import cause_message
    from mlc.contracts import runtime as runtime_contracts
    from mlc.contracts import traffic as traffic_contracts
    from mlc.contracts.reconcile import (
        PLAN,
        PROBE,
        RECONCILE_NOW,
        RECONCILER,
        RESTART,
        ROUNDS_PER_RUN,
        SETTLE,
        GrantsInput,
        Plan,
        PlanInput,
        ReconcileInput,
        ReconcilerStatus,
        SettleInput,
        Settlement,
    )
    from mlc.contracts.runtime import RuntimeActionInput

REAPPLY_ROUTES = "reapply-routes"
"""Patch: rounds since this change end by applying the recorded stable-endpoint routes."""


@workflow.defn(name=RECONCILER)
class RuntimeReconciler:
    """Checks one runtime's serving deployments at an interval (see the module docstring)."""

    def __init__(self) -> None:
        self._now = False
        self._status: ReconcilerStatus | None = None

    @workflow.signal(name=RECONCILE_NOW)
    def reconcile_now(self) -> None:
        """Run a round at once (workers send it when they start)."""
        self._now = True

    @workflow.query(name="status")
    def status(self) -> ReconcilerStatus | None:
        """Rounds so far and what the last one did."""
        return self._status

    @workflow.run
    async def run(self, request: ReconcileInput) -> None:
        """Reconcile rounds until idle or removed; continue as new every ROUNDS_PER_RUN."""
        self._status = ReconcilerStatus(runtime=request.runtime)
        main_queue = workflow.info().task_queue
        for _ in range(ROUNDS_PER_RUN):
            self._now = False
            try:
                plan = await PLAN.execute(PlanInput(runtime=request.runtime), task_queue=main_queue)
            except ActivityError as exc:
                self._note((), f"could not read the inventory: {cause_message(exc)}")
            else:
                if plan.runtime is None or not (plan.probes or plan.retire or self._now):
                    gone = plan.runtime is None
                    self._note((), "the runtime was removed" if gone else "nothing serves here: ending")
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    return
                if plan.retire:
                    await self._retire(plan)
                await self._round(plan, main_queue)
                if plan.routes and workflow.patched(REAPPLY_ROUTES):
                    await self._reapply_routes(plan)
            if workflow.info().is_continue_as_new_suggested():
                break
            try:
                await workflow.wait_condition(
                    lambda: self._now, timeout=timedelta(seconds=request.interval_seconds)
                )
            except TimeoutError:
                pass
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(request)

    async def _round(self, plan: Plan, main_queue: str) -> None:
        """Probe, judge, restart, judge again, remove what failed; errors end the round."""
        assert plan.runtime is not None
        runtime = plan.runtime
        watching = plan.watching
        try:
            probed = await PROBE.execute(GrantsInput(grants=plan.probes), task_queue=runtime.task_queue)
            down = [f for f in probed.findings if not f.healthy]
            if not down and not plan.restarting:
                self._note(watching, f"{len(probed.findings)} healthy")
                return
            settled = await SETTLE.execute(
                SettleInput(runtime=runtime.name, findings=probed.findings), task_queue=main_queue
            )
            removals = settled.remove
            restarted: Settlement | None = None
            if settled.restart:
                back = await RESTART.execute(
                    GrantsInput(grants=settled.restart), task_queue=runtime.task_queue
                )
                restarted = await SETTLE.execute(
                    SettleInput(runtime=runtime.name, findings=back.findings), task_queue=main_queue
                )
                removals += restarted.remove
            for grant in removals:
                await runtime_contracts.UNDEPLOY.execute(
                    RuntimeActionInput(grant=grant), task_queue=runtime.task_queue
                )
        except ActivityError as exc:
            self._note(watching, f"round abandoned: {cause_message(exc)}")
            return
        failed = ", ".join(settled.failed + (restarted.failed if restarted else ())) or "none"
        back_up = ", ".join(restarted.restarted if restarted else ()) or "none"
        self._note(watching, f"{len(down)} down; restarted: {back_up}; failed: {failed}")

    async def _retire(self, plan: Plan) -> None:
        """Take down the warm standbys whose grace has passed (the inventory recorded them retired)."""
        assert plan.runtime is not None
        failed = []
        for deployment_id, grant in zip(plan.retired, plan.retire, strict=True):
            try:  # each on its own: one that fails must not leave the others running
                await runtime_contracts.UNDEPLOY.execute(
                    RuntimeActionInput(grant=grant), task_queue=plan.runtime.task_queue
                )
            except ActivityError as exc:
                failed.append(f"{deployment_id} ({cause_message(exc)})")
        if failed:
            leftovers = ", ".join(failed)
            self._note(plan.watching, f"retiring failed for {leftovers}; `mlc runtime cleanup` removes them")
            return
        self._note(plan.watching, f"retired {', '.join(plan.retired)}")

    async def _reapply_routes(self, plan: Plan) -> None:
        """Apply the recorded routes again: brings back a gateway that died with its worker
        and follows deployments a restart moved to another port (a no-op otherwise)."""
        assert plan.runtime is not None
        for model, grant in zip(plan.routed, plan.routes, strict=True):
            try:
                await traffic_contracts.ROUTE_TRAFFIC.execute(
                    RuntimeActionInput(grant=grant), task_queue=plan.runtime.task_queue
                )
            except ActivityError as exc:
                self._note(plan.watching, f"the stable endpoint of {model} is not live: {cause_message(exc)}")

    def _note(self, watching: tuple[str, ...], last: str) -> None:
        assert self._status is not None
        self._status = self._status.model_copy(
            update={"rounds": self._status.rounds + 1, "watching": watching, "last": last}
        )
        workflow.set_current_details(f"Reconciling runtime **{self._status.runtime}**: {last}")
