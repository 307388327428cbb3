"""Champion/challenger tests in a stage, on real Temporal, PostgreSQL and local runtimes.

The champion is the version serving the stage on the runtime (promoted by an earlier run);
the challenger is this run's deployment. Both score the challenger's labelled data and the
stage's gate sees both AUCs as the evidence it signs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError

from mlc.domain import ApprovalGate, DeploymentState, LifecycleSpec, StageSpec, TestKind
from mlc.store import audit, deployments
from tests.conftest import APPROVER, FIXTURES, Stack
from tests.lifecycle_helpers import wait_for_gate

STAGE = "SIT"
CHALLENGE = (TestKind.SMOKE, TestKind.CHAMPION_CHALLENGER)


def spec(*, gate: bool = False) -> LifecycleSpec:
    return LifecycleSpec(
        stages=(
            StageSpec(name=STAGE, tests=CHALLENGE, gate=ApprovalGate() if gate else None, max_auc_drop=0.01),
        )
    )


def champion_challenger(report_results: tuple[object, ...]) -> object:
    return next(r for r in report_results if r.test is TestKind.CHAMPION_CHALLENGER)  # type: ignore[attr-defined]


async def test_worse_challenger_refused_comparable_one_passes(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    await stack.add_local_runtimes((STAGE,))

    # v1: nothing serves SIT yet, so the test passes with a note and v1 becomes the champion.
    champion = await stack.register(example_package)
    first = await stack.start(champion, spec=spec())
    await first.result()
    results = await audit.read_test_results(stack.pool, champion.model, champion.version)
    assert any(
        t["test"] == "champion_challenger" and t["passed"] and "no champion" in t["summary"] for t in results
    ), results

    # v2: same model, no skill: refused against v1, and v1 keeps serving.
    weak = await stack.register(FIXTURES / "models" / "cc-fraud-weak")
    assert weak.model == champion.model and weak.version == champion.version + 1
    second = await stack.start(weak, spec=spec())
    with pytest.raises(WorkflowFailureError) as failure:
        await second.result()
    message = str(failure.value.cause)
    assert f"tests failed in {STAGE}" in message and "champion_challenger" in message, message
    assert "worse than the champion by more than 0.010" in message and "challenger AUC 0.500" in message
    assert f"champion {champion.model}@{champion.version}" in message, message
    live = await deployments.read_deployments(stack.pool, model=champion.model, stage=STAGE)
    assert [(d.version, d.state) for d in live] == [(champion.version, DeploymentState.SERVING)]

    # v3: the same model as v1 (another snapshot): comparable, passes; the gate's evidence
    # holds both AUCs and the approval signs that report.
    copy = tmp_path / "cc-fraud-copy"
    shutil.copytree(example_package, copy)
    (copy / "NOTES.md").write_text("retrained on the same data\n")
    comparable = await stack.register(copy)
    third = await stack.start(comparable, spec=spec(gate=True))
    status = await wait_for_gate(third, STAGE)
    report = next(r for r in status.reports if r.stage == STAGE)
    result = champion_challenger(report.results)
    assert result.passed, result  # type: ignore[attr-defined]
    metrics = result.metrics  # type: ignore[attr-defined]
    assert metrics["champion_auc"] > 0.8 and abs(metrics["auc_drop"]) < 1e-9, metrics
    ref = f"{comparable.model}@{comparable.version}"
    approved = await stack.mlc("approve", ref, "--stage", STAGE, "--comment", "as good as v1")
    assert approved.returncode == 0, approved.stderr
    await third.result()
    decisions = await audit.read_decisions(stack.pool, comparable.model, comparable.version)
    evidence = decisions[-1]["evidence"]["results"]
    assert any(r["test"] == "champion_challenger" and "champion_auc" in r["metrics"] for r in evidence)
    assert decisions[-1]["approver"] == APPROVER
