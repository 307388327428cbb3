"""Activity contracts: one name, input and result per activity, used by callers, workers and
the dry run alike, so that a mismatch is a type error."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlc.contracts import inventory as inv
from mlc.contracts import runtime as rt
from mlc.contracts import traffic
from mlc.contracts.base import ActivityContract, implementations
from workers.dry_run import DryRunWorld, StandInActivities, default_snapshot

ROOT = Path(__file__).resolve().parent.parent

PERSISTED = {
    inv.BEGIN_RUN.name: "begin_lifecycle_run",
    inv.RECORD_RUN.name: "record_lifecycle_run",
    inv.LOAD_LIFECYCLE.name: "load_lifecycle_definition",
    rt.DEPLOY_ONLINE.name: "deploy_online",
    rt.RUN_STAGE_TESTS.name: "run_stage_tests",
}


def test_contract_names_are_the_persisted_activity_names() -> None:
    contracts = [*inv.CONTRACTS, *rt.CONTRACTS]
    assert len({c.name for c in contracts}) == len(contracts), "one contract per activity"
    for name, persisted in PERSISTED.items():
        assert name == persisted, "running histories hold these names: they never change"
    assert {c.name for c in inv.CONTRACTS} >= {
        inv.BEGIN_RUN.name,
        inv.LOAD_LIFECYCLE.name,
        inv.VERIFY_DECISION.name,
    }


def test_stand_ins_implement_every_contract_the_workflows_call() -> None:
    stand_ins = StandInActivities(
        None,  # type: ignore[arg-type]
        name="X",
        source="",
        world=DryRunWorld(snapshot=default_snapshot()),
        task_queue="q",
    )
    registered = stand_ins.activities()
    assert len(registered) == len(inv.CONTRACTS) + len(rt.CONTRACTS) + len(traffic.INVENTORY_CONTRACTS) + len(
        traffic.RUNTIME_CONTRACTS
    )


def test_a_worker_without_an_implementation_refuses_to_start() -> None:
    class Partial:
        @inv.NOTIFY.implement
        async def notify(self, request: object) -> None:
            """Only one of the contracts."""

    with pytest.raises(TypeError, match="Partial implements no activity begin_lifecycle_run"):
        implementations(Partial(), [inv.NOTIFY, inv.BEGIN_RUN])
    assert isinstance(inv.NOTIFY, ActivityContract)


def test_mypy_refuses_an_implementation_or_call_that_disagrees(tmp_path: Path) -> None:
    snippet = tmp_path / "mismatch.py"
    snippet.write_text(
        textwrap.dedent(
            '''
            from mlc.contracts import inventory as inv
            from mlc.contracts.inventory import NotifyInput, RecordRunInput


            class Wrong:
                @inv.NOTIFY.implement
                async def notify(self, request: RecordRunInput) -> None:
                    """Takes another activity's input."""


            async def caller() -> None:
                begun = await inv.BEGIN_RUN.execute(NotifyInput(message="x"), task_queue="q")
                print(begun.snapshot)
            '''
        )
    )
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(snippet)],
        cwd=ROOT,
        env={"MYPYPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert checked.returncode == 1, checked.stdout
    assert 'incompatible type "Callable[[Wrong, RecordRunInput]' in checked.stdout
    assert (
        'Argument 1 to "execute" of "ActivityContract" has incompatible type "NotifyInput"' in checked.stdout
    )
