"""The `mlc` command's contract with people and scripts: its version, readable usage errors
and an exit code per kind of failure, from the real CLI in a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.service import RPCError, RPCStatusCode

from tests.conftest import Stack


def mlc(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """Run `python -m mlc ARGS` with no servers configured (state under ``home``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLC_DATABASE_URL", "TEMPORAL_ADDRESS")}
    return subprocess.run(
        [sys.executable, "-m", "mlc", *args],
        env={**env, "MLC_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_version_prints_the_installed_version(tmp_path: Path) -> None:
    result = mlc("--version", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"mlc {metadata.version('mlc-orchestrator')}\n"
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("statuz",), "Error: No such command 'statuz'."),
        (("approve", "--bogus"), "Error: No such option: --bogus"),
        (("approve",), "Error: Missing argument"),
        (("lifecycle", "start"), "Error: Missing argument"),
    ],
    ids=["unknown-command", "unknown-option", "missing-argument", "missing-argument-subcommand"],
)
def test_usage_errors_exit_2_with_one_error_line(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    result = mlc(*args, home=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr
    assert result.stderr.startswith("Usage: "), "click's usage line and --help hint come first"
    assert "--help' for help." in result.stderr
    assert result.stdout == ""


def test_invalid_input_exits_1_and_unreachable_inventory_exits_5(tmp_path: Path) -> None:
    bad_ref = mlc("approve", "cc-fraud", "--stage", "DEV", home=tmp_path)
    assert bad_ref.returncode == 1, bad_ref.stderr
    assert "is not MODEL@VERSION" in bad_ref.stderr and "Traceback" not in bad_ref.stderr

    no_servers = mlc("approve", "cc-fraud@1", "--stage", "DEV", home=tmp_path)
    assert no_servers.returncode == 5, no_servers.stderr
    assert "no inventory database" in no_servers.stderr and "Traceback" not in no_servers.stderr


async def test_start_refuses_an_unregistered_snapshot(stack: Stack) -> None:
    missing = await stack.mlc("lifecycle", "start", "nope@3")
    assert missing.returncode == 3, missing.stderr
    assert "snapshot nope@3 does not exist" in missing.stderr
    assert "mlc model register DIR" in missing.stderr
    assert "Traceback" not in missing.stderr and "started" not in missing.stdout
    with pytest.raises(RPCError) as no_run:
        await stack.client.get_workflow_handle("mlc-nope-v3").describe()
    assert no_run.value.status == RPCStatusCode.NOT_FOUND, "no workflow was started"


async def test_start_json_names_the_run(stack: Stack, example_package: Path) -> None:
    snap = await stack.register(example_package)
    ref = f"{snap.model}@{snap.version}"
    result = await stack.mlc("lifecycle", "start", ref, "--json")
    assert result.returncode == 0, result.stderr
    started = json.loads(result.stdout)
    assert set(started) == {"workflow_id", "run_id", "model", "version", "lifecycle", "task_queue"}
    assert (started["model"], started["version"], started["lifecycle"], started["task_queue"]) == (
        snap.model,
        snap.version,
        "ModelLifecycle",
        stack.task_queue,
    )
    assert started["workflow_id"] == f"mlc-{snap.model}-v{snap.version}"
    handle = stack.client.get_workflow_handle(started["workflow_id"], run_id=started["run_id"])
    described = await handle.describe()
    assert described.run_id == started["run_id"] and described.workflow_type == "ModelLifecycle"
    with pytest.raises(WorkflowFailureError) as failure:  # the stack has no runtimes
        await asyncio.wait_for(handle.result(), timeout=60)
    assert "no runtime" in str(failure.value.cause).lower()
