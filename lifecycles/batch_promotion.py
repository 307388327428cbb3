"""Batch-only promotion: every stage scores the test dataset as a batch job; nothing serves.

For models consumed by scheduled scoring rather than an endpoint. In each stage the
snapshot runs as a batch job on every runtime serving its service tag, and the job's
output is checked by the smoke and metrics tests. One approval gate, at UAT, decides
whether the snapshot goes to PROD. Batch jobs leave no deployment behind, so there is
nothing to promote or retire: the run's result lists the PROD jobs and their outputs.
"""

from __future__ import annotations

from lifecycles.api import ApprovalGate, Decision, Lifecycle, LifecycleSpec, Mode, StageSpec, TestKind

NAME = "BatchPromotion"

TESTS = (TestKind.SMOKE, TestKind.METRICS)
"""Every stage checks the job's output: known samples, then metrics on labelled data."""

SPEC = LifecycleSpec(
    stages=(
        StageSpec(name="DEV", mode=Mode.BATCH, tests=TESTS),
        StageSpec(name="SIT", mode=Mode.BATCH, tests=TESTS),
        StageSpec(name="UAT", mode=Mode.BATCH, tests=TESTS, gate=ApprovalGate()),
        StageSpec(name="PROD", mode=Mode.BATCH, tests=TESTS),
    )
)
"""Default stages; a run's ``spec`` may change stages and gates, never the batch mode."""


async def run(mlc: Lifecycle) -> None:
    """Run and check a batch job in every stage, stopping at the gate before PROD."""
    for stage in mlc.stages:
        jobs = await mlc.deploy(stage.name, mode=Mode.BATCH)
        report = await mlc.test(stage.name, jobs, tests=TESTS)
        if not report.passed:
            mlc.fail(f"batch output failed its tests in {stage.name}: {report.failures()}")
        if stage.gate is not None:
            decision = await mlc.approval(stage.name)
            if decision.decision is not Decision.APPROVED:
                why = f": {decision.comment}" if decision.comment else ""
                mlc.fail(f"{stage.name} gate {decision.decision.value} by {decision.approver}{why}")
