"""Recorded histories replay against today's workflow code: proof of determinism.

Histories live in tests/histories/<workflow>/*.json, written by the tests that call
``keep_history`` (in tests/test_lifecycle.py and tests/test_custom_lifecycles.py); re-record
them with ``MLC_RECORD_HISTORIES=1 pytest tests/test_lifecycle.py tests/test_custom_lifecycles.py``
only when a change is meant to be incompatible (and then guard it with ``workflow.patched``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer
from temporalio.workflow import NondeterminismError

from tests.changed_workflow import ReorderedLifecycle
from tests.lifecycle_helpers import HISTORIES
from workers.catalog import ALL_WORKFLOWS

RECORDED = sorted(HISTORIES.glob("*/*.json"))


def _history(path: Path) -> WorkflowHistory:
    """The recorded history under its recorded workflow id: signed decisions name the run
    they are for, and the workflow checks that against ``workflow.info()`` on replay too."""
    recorded = json.loads(path.read_text())
    started = recorded["events"][0]["workflowExecutionStartedEventAttributes"]
    return WorkflowHistory.from_json(started["workflowId"], recorded)


def test_histories_are_recorded() -> None:
    assert {p.parent.name for p in RECORDED} >= {"ModelLifecycle"}


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: f"{p.parent.name}/{p.stem}")
async def test_recorded_history_replays(path: Path) -> None:
    replayer = Replayer(workflows=list(ALL_WORKFLOWS), data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(_history(path), raise_on_replay_failure=False)
    assert result.replay_failure is None, result.replay_failure


async def test_a_changed_workflow_is_caught() -> None:
    happy = HISTORIES / "ModelLifecycle" / "happy_path.json"
    replayer = Replayer(workflows=[ReorderedLifecycle], data_converter=pydantic_data_converter)
    with pytest.raises(NondeterminismError):
        await replayer.replay_workflow(_history(happy))
