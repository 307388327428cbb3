"""Rollout strategies on stable endpoints: canary and shadow, private to the workflows.

Built on :class:`lifecycles._run.LifecycleRun`'s traffic primitives (``current_routes``,
``route``, ``observe``): every traffic change is authorized, applied by the runtime's
driver and recorded in the audit trail with its cause. Lifecycle code reaches these
through ``mlc.rollout`` and ``mlc.shadow`` (:mod:`lifecycles.api`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from temporalio import workflow
from temporalio.exceptions import ActivityError

from lifecycles._run import LifecycleFailure, LifecycleRun, cause_message

with workflow.unsafe.imports_passed_through():
    from mlc.contracts import traffic as tr
    from mlc.domain import (
        Deployment,
        LifecycleState,
        Rollout,
        RolloutStrategy,
        StageTestReport,
        TestKind,
        TestResult,
        TrafficRoute,
    )
    from mlc.statements import Envelope

Routes = dict[str, tuple[TrafficRoute, ...]]

GIVE_BACK_PATCH = "rollout-gives-traffic-back"
"""``workflow.patched`` id: a canary step or shadow window that fails (an observation or a
traffic change refused or failing) gives the traffic back to the current version before
the run fails, instead of leaving routes to a version the failed run then undeploys."""


VERIFIED_OBSERVATIONS_PATCH = "canary-judges-verified-observations"
"""``workflow.patched`` id: a canary step is judged only once the inventory verified that its
observations are what the gateway runtime signed; a refusal gives the traffic back."""


def plan_of(run: LifecycleRun, stage: str) -> Rollout:
    """The stage's rollout spec (blue/green when it names none or the stage is unknown)."""
    for spec in run.stages:
        if spec.name == stage:
            return spec.rollout or Rollout()
    return Rollout()


async def rollout(run: LifecycleRun, stage: str, deployments: Sequence[Deployment]) -> list[Deployment]:
    """Move ``stage``'s live traffic to ``deployments`` as its rollout spec says, then promote.

    Blue/green (and shadow, whose comparison came before the gate) is ``promote``. Canary
    raises the new version's share step by step; at each step it compares the new
    version's error rate and p99 latency with the current version's over the window, and
    on a breach routes everything back, undeploys the new version and fails the run.
    """
    plan = plan_of(run, stage)
    if plan.strategy is RolloutStrategy.CANARY:
        pairs = await _pairs(run, stage, deployments, "canary")
        if pairs:
            await _canary(run, stage, plan, pairs, deployments)
    return await run.promote(stage, deployments)


async def shadow(run: LifecycleRun, stage: str, deployments: Sequence[Deployment]) -> StageTestReport:
    """Mirror live traffic to ``deployments``, compare both versions' answers, record the result.

    The comparison (pairs, agreement rate, score differences) joins the stage's test
    report, so it is evidence for the stage's gate; the shadow routes are removed after
    ``duration`` whatever the outcome. Returns the stage's updated report.
    """
    plan = plan_of(run, stage)
    pairs = await _pairs(run, stage, deployments, "shadow")
    results: list[TestResult] = []
    observed: list[Envelope] = []  # the gateway runtimes' signed observations judged on
    if not pairs:
        results = [
            TestResult(
                test=TestKind.SHADOW,
                deployment_id=d.id,
                passed=True,
                summary="no current version to shadow: nothing answers the stable endpoint yet",
            )
            for d in run._own(deployments)
        ]
    else:
        mirrored: Routes = {
            name: (
                *current,
                TrafficRoute(deployment_id=new.deployment_id, version=new.version, shadow=True, weight=0),
            )
            for name, (new, current) in pairs.items()
        }
        back = {name: current for name, (_, current) in pairs.items()}
        run._enter(stage, LifecycleState.TESTING, f"Shadowing live traffic in {stage} for {plan.duration}")
        try:
            await run.route(stage, mirrored, f"shadow v{run.version}")
            since = workflow.now()
            await workflow.sleep(plan.duration)
            until = workflow.now()
            seen = await asyncio.gather(
                *(run.observe(stage, name, mirrored[name], since, until) for name in sorted(mirrored))
            )
        except (LifecycleFailure, ActivityError, asyncio.CancelledError) as exc:
            await _give_back(run, stage, back, "shadow stopped", exc)
            raise
        await run.route(stage, back, "shadow ended")
        for name, observation in zip(sorted(mirrored), seen, strict=True):
            results.append(_shadow_verdict(plan, pairs[name][0], observation))
            observed.extend(() if observation.evidence is None else (observation.evidence,))
    previous = run._reports.get(stage)
    kept = tuple(r for r in previous.results if r.test is not TestKind.SHADOW) if previous else ()
    report = StageTestReport(stage=stage, results=(*kept, *results))
    return await run.record_report(report, (*run._evidence.get(stage, ()), *observed))


async def _pairs(
    run: LifecycleRun, stage: str, deployments: Sequence[Deployment], strategy: str
) -> dict[str, tuple[TrafficRoute, tuple[TrafficRoute, ...]]]:
    """Runtime -> (the new deployment's route, the routes answering there now).

    Runtimes where nothing else answers yet are left out (there is nothing to compare
    with: the rollout is blue/green there). A stage without a gateway runtime cannot
    split live traffic, so the run fails naming the stage.
    """
    gated = run._gated(stage, deployments)
    if not gated:
        raise LifecycleFailure(
            f"rollout {strategy} in {stage} needs an online deployment on a runtime with a gateway "
            f"(a stable endpoint) to split live traffic; {run.model}@{run.version} has none there: "
            f"add a runtime with a gateway to {stage}, or use strategy blue_green",
            kind="NoRuntimeError",
        )
    live = await run.current_routes(stage)
    pairs: dict[str, tuple[TrafficRoute, tuple[TrafficRoute, ...]]] = {}
    for name, (new,) in sorted(gated.items()):
        busy = rollout_in_progress(new, live.get(name, ()))
        if busy is not None:
            raise LifecycleFailure(
                f"rollout {strategy} of {run.model}@{run.version} in {stage} on {name}: {busy}; "
                "start it again once that rollout has ended",
                kind="RolloutInProgress",
            )
        current = tuple(
            r
            for r in live.get(name, ())
            if not r.shadow and r.weight > 0 and r.deployment_id != new.deployment_id
        )
        if current:
            pairs[name] = (new, _scaled(current, 100))
    return pairs


def rollout_in_progress(new: TrafficRoute, live: Sequence[TrafficRoute]) -> str | None:
    """Why another run's rollout holds the endpoint now (a split or a shadow of versions
    other than ``new``), or None. Two rollouts at once would each compute their steps
    from what they saw first and drop the other's share."""
    others = [r for r in live if r.deployment_id != new.deployment_id]
    answering = [r for r in others if not r.shadow and r.weight > 0]
    shadows = [r for r in others if r.shadow]
    if len(answering) > 1:
        shares = ", ".join(f"v{r.version} {r.weight}%" for r in answering)
        return f"the stable endpoint is split ({shares}): another canary is in progress"
    if shadows:
        return f"v{shadows[0].version} shadows the stable endpoint: another shadow is in progress"
    return None


def _scaled(routes: tuple[TrafficRoute, ...], total: int) -> tuple[TrafficRoute, ...]:
    """``routes`` with weights scaled to sum to ``total`` (the remainder to the first)."""
    before = sum(r.weight for r in routes) or 1
    weights = [r.weight * total // before for r in routes]
    weights[0] += total - sum(weights)
    return tuple(r.model_copy(update={"weight": w}) for r, w in zip(routes, weights, strict=True))


async def _canary(
    run: LifecycleRun,
    stage: str,
    plan: Rollout,
    pairs: dict[str, tuple[TrafficRoute, tuple[TrafficRoute, ...]]],
    deployments: Sequence[Deployment],
) -> None:
    back = {n: current for n, (_, current) in pairs.items()}
    for share in plan.steps:
        step: Routes = {
            name: (new.model_copy(update={"weight": share}), *_scaled(current, 100 - share))
            for name, (new, current) in pairs.items()
        }
        run._enter(
            stage, LifecycleState.PROMOTING, f"Canary in {stage}: {share}% of live traffic for {plan.window}"
        )
        names_ = sorted(step)
        try:
            await run.route(stage, step, f"canary {share}%")
            since = workflow.now()
            await workflow.sleep(plan.window)
            until = workflow.now()
            seen = await asyncio.gather(*(run.observe(stage, n, step[n], since, until) for n in names_))
            if workflow.patched(VERIFIED_OBSERVATIONS_PATCH):
                await run.verified(stage, seen)
        except (LifecycleFailure, ActivityError, asyncio.CancelledError) as exc:
            await _give_back(run, stage, back, f"canary stopped at {share}%", exc)
            raise
        for name, observation in zip(names_, seen, strict=True):
            why = canary_breach(plan, pairs[name][0], observation)
            if why is None:
                continue
            why = f"at {share}% on {name}: {why}"
            await run.route(stage, back, f"canary rolled back: {why}")
            await run.undeploy(deployments)
            await run.notify(f"{run.model}@{run.version}: canary in {stage} rolled back: {why}")
            raise LifecycleFailure(f"canary in {stage} rolled back: {why}", kind="CanaryRolledBack")
        run.log(f"canary in {stage} at {share}%: within limits")


async def _give_back(run: LifecycleRun, stage: str, back: Routes, what: str, exc: BaseException) -> None:
    """Route ``back`` (the current versions) after a failed canary step or shadow window.

    The run is failing with ``exc`` (or was cancelled) and will undeploy its new version:
    consumers must not keep being sent to it. When giving back fails too, the run still
    fails with ``exc``.
    """
    if not workflow.patched(GIVE_BACK_PATCH):
        return
    if isinstance(exc, asyncio.CancelledError):
        reason = "the run was cancelled"
    else:
        reason = exc.reason if isinstance(exc, LifecycleFailure) else cause_message(exc)
    try:
        await run.route(stage, back, f"{what}: {reason}")
    except LifecycleFailure as failed:
        run.log(f"giving {stage}'s traffic back after '{reason}' failed too: {failed.reason}")


def canary_breach(plan: Rollout, new: TrafficRoute, seen: tr.TrafficObservation) -> str | None:
    """Why the new version's window breaks the plan's limits against the current one, or None."""
    mine = next((s for s in seen.routes if s.deployment_id == new.deployment_id), None)
    others = [s for s in seen.routes if s.deployment_id != new.deployment_id]
    if mine is None or mine.requests < plan.min_requests:
        got = mine.requests if mine else 0
        return (
            f"v{new.version} answered {got} requests in the window, fewer than min_requests "
            f"{plan.min_requests}: too little traffic to judge it"
        )
    requests = sum(s.requests for s in others)
    errors = sum(s.errors for s in others)
    theirs = errors / requests if requests else 0.0
    if mine.error_rate - theirs > plan.max_error_rate_increase:
        return (
            f"error rate {mine.error_rate:.1%} ({mine.errors}/{mine.requests}) against "
            f"{theirs:.1%} of the current version, more than {plan.max_error_rate_increase:.1%} higher"
        )
    # 0 ms is a measurement (answers under the gateway's 1 ms resolution), not a missing one
    p99s = [s.p99_ms for s in others if s.p99_ms is not None]
    if mine.p99_ms is not None and p99s:
        current = max(p99s)
        if mine.p99_ms > current * plan.max_p99_ratio and mine.p99_ms - current > plan.p99_tolerance_ms:
            return (
                f"p99 latency {mine.p99_ms:.0f} ms against {current:.0f} ms of the current version, "
                f"more than {plan.max_p99_ratio:g}x and {plan.p99_tolerance_ms:g} ms slower"
            )
    return None


def _shadow_verdict(plan: Rollout, new: TrafficRoute, seen: tr.TrafficObservation) -> TestResult:
    """The shadow comparison as a test result: enough pairs, agreement, score difference."""
    comparison = seen.shadow
    if comparison is None or comparison.pairs == 0:
        return TestResult(
            test=TestKind.SHADOW,
            deployment_id=new.deployment_id,
            passed=False,
            summary="no mirrored request was answered by both versions in the window",
        )
    metrics = comparison.metrics()
    problems: list[str] = []
    if comparison.pairs < plan.min_pairs:
        problems.append(f"{comparison.pairs} pairs < min_pairs {plan.min_pairs}")
    agreement = comparison.agreement_rate
    if agreement is None or agreement < plan.min_agreement:
        shown = "not computed" if agreement is None else f"{agreement:.3f}"
        problems.append(f"agreement {shown} < {plan.min_agreement:.3f}")
    diff = comparison.mean_abs_diff
    if plan.max_mean_abs_diff is not None and (diff is None or diff > plan.max_mean_abs_diff):
        problems.append(f"mean abs score diff {diff} > {plan.max_mean_abs_diff}")
    facts = (
        f"{comparison.pairs} mirrored requests, agreement "
        f"{'n/a' if agreement is None else f'{agreement:.3f}'}, mean abs diff "
        f"{'n/a' if diff is None else f'{diff:.4f}'}, shadow errors {comparison.shadow_errors}"
    )
    return TestResult(
        test=TestKind.SHADOW,
        deployment_id=new.deployment_id,
        passed=not problems,
        summary=f"{facts}: {'; '.join(problems)}" if problems else f"{facts}: within limits",
        metrics=metrics,
    )
