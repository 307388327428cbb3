"""The standard model life cycle: DEV -> SIT -> UAT -> PROD with tests and approval gates.

In each stage the snapshot is deployed to every runtime serving its service tag, tested
there, and held at the stage's gate. Approval at a gate promotes the snapshot in that
stage (older versions there are retired) and moves it on; PROD has no gate because the
UAT approval is the decision to go to production, and the previous PROD version keeps
serving until the new one is deployed, healthy and tested. A stage's ``rollout`` spec
chooses how live traffic moves: blue/green (default), canary (in steps, rolled back by
itself on a breach) or shadow (mirrored before the gate, its comparison part of the evidence).
"""

from __future__ import annotations

from lifecycles.api import (
    ApprovalGate,
    Decision,
    Lifecycle,
    LifecycleSpec,
    RolloutStrategy,
    StageSpec,
    TestKind,
)

NAME = "ModelLifecycle"

SPEC = LifecycleSpec(
    stages=(
        StageSpec(name="DEV", tests=(TestKind.SMOKE,), gate=ApprovalGate()),
        StageSpec(name="SIT", tests=(TestKind.SMOKE, TestKind.METRICS), gate=ApprovalGate()),
        StageSpec(name="UAT", tests=(TestKind.SMOKE, TestKind.METRICS), gate=ApprovalGate()),
        StageSpec(name="PROD", tests=(TestKind.SMOKE,)),
    )
)
"""Default stages; a run may pass its own ``spec`` (another ordered list of stages)."""


async def run(mlc: Lifecycle) -> None:
    """Promote the snapshot through every stage of ``mlc.spec``."""
    for stage in mlc.stages:
        deployments = await mlc.deploy(stage.name)
        report = await mlc.test(stage.name, deployments)
        if not report.passed:
            await mlc.undeploy(deployments)
            mlc.fail(f"tests failed in {stage.name}: {report.failures()}")
        if stage.rollout is not None and stage.rollout.strategy is RolloutStrategy.SHADOW:
            report = await mlc.shadow(stage.name, deployments)  # evidence for the gate
            if not report.passed:
                await mlc.undeploy(deployments)
                mlc.fail(f"shadow comparison failed in {stage.name}: {report.failures()}")
        if stage.gate is not None:
            decision = await mlc.approval(stage.name)
            if decision.decision is not Decision.APPROVED:
                await mlc.undeploy(deployments)
                why = f": {decision.comment}" if decision.comment else ""
                mlc.fail(f"{stage.name} gate {decision.decision.value} by {decision.approver}{why}")
        await mlc.rollout(stage.name, deployments)
