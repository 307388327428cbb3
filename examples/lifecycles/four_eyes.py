"""Four-eyes promotion: two different people must approve UAT before a model reaches PROD.

A common control in regulated teams: no single person can put a model into production.
The snapshot goes DEV -> UAT -> PROD. DEV needs no approval; at UAT the tests must pass
and then two approvals by two different people are needed (anyone holding the
``approver`` role). A second approval by the person who already approved is recorded in
the audit trail but does not count: the run keeps waiting for someone else. A rejection
or an expired gate at any point undeploys UAT and ends the run.

Upload:  mlc lifecycle upload examples/lifecycles/four_eyes.py
Start:   Web UI -> Start Workflow: Workflow Type ``FourEyes``, Task Queue ``mlc-lifecycles``,
         Input ``{"model": "cc-fraud", "version": 1}``
"""

from __future__ import annotations

from lifecycles.api import (
    ApprovalGate,
    Decision,
    Deployment,
    Lifecycle,
    LifecycleSpec,
    StageSpec,
    TestKind,
)

APPROVALS_NEEDED = 2
"""Distinct people who must approve the gate."""

SPEC = LifecycleSpec(
    stages=(
        StageSpec(name="DEV", tests=(TestKind.SMOKE,)),
        StageSpec(
            name="UAT",
            tests=(TestKind.SMOKE, TestKind.METRICS),
            gate=ApprovalGate(approvers=("role:approver",)),
        ),
        StageSpec(name="PROD", tests=(TestKind.SMOKE,)),
    )
)


async def run(mlc: Lifecycle) -> None:
    """Deploy, test and promote stage by stage; gated stages need two different approvers."""
    for stage in mlc.stages:
        deployments = await mlc.deploy(stage.name)
        report = await mlc.test(stage.name, deployments)
        if not report.passed:
            await mlc.undeploy(deployments)
            mlc.fail(f"tests failed in {stage.name}: {report.failures()}")
        if stage.gate is not None:
            await four_eyes(mlc, stage.name, deployments)
        await mlc.promote(stage.name, deployments)


async def four_eyes(mlc: Lifecycle, stage: str, deployments: list[Deployment]) -> None:
    """Wait until APPROVALS_NEEDED different people approved ``stage``; any rejection ends the run."""
    approvers: list[str] = []
    while len(approvers) < APPROVALS_NEEDED:
        record = await mlc.approval(stage)
        if record.decision is not Decision.APPROVED:
            await mlc.undeploy(deployments)
            why = f": {record.comment}" if record.comment else ""
            mlc.fail(f"{stage} gate {record.decision.value} by {record.approver}{why}")
        if record.approver in approvers:
            await mlc.notify(
                f"{mlc.model}@{mlc.version}: {record.approver} already approved {stage}; "
                "a second, different approver is needed"
            )
            continue
        approvers.append(record.approver)
        mlc.log(f"{stage} approved by {record.approver} ({len(approvers)}/{APPROVALS_NEEDED})")
    mlc.log(f"{stage} approved by {' and '.join(approvers)}")
