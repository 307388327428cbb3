"""The `mlc` CLI as people use it: real subprocesses against the test's servers."""

from __future__ import annotations

import json
from pathlib import Path

from mlc.domain import ModelRef
from mlc.lifecycle_client import find_handle
from tests.conftest import ADMIN, Stack
from tests.lifecycle_helpers import wait_for_gate


async def test_register_add_runtimes_start_and_list(stack: Stack, example_package: Path) -> None:
    registered = await stack.mlc("model", "register", str(example_package))
    assert registered.returncode == 0, registered.stderr
    assert "cc-fraud@1 registered" in registered.stdout
    again = await stack.mlc("model", "register", str(example_package), "--json")
    assert json.loads(again.stdout)[0]["version"] == 1, "same content, same snapshot"

    for stage in ("DEV", "SIT"):
        added = await stack.mlc(
            "runtime",
            "add",
            f"local-{stage.lower()}",
            "--stage",
            stage,
            "--tag",
            "cc-fraud",
            "--task-queue",
            stack.task_queue,
            user=ADMIN,
        )
        assert added.returncode == 0, added.stderr
    duplicate = await stack.mlc("runtime", "add", "local-dev", "--stage", "DEV", user=ADMIN)
    assert duplicate.returncode == 4 and "already exists" in duplicate.stderr
    listed = json.loads((await stack.mlc("runtime", "list", "--json")).stdout)
    assert [(r["name"], r["stage"], r["service_tags"]) for r in listed] == [
        ("local-dev", "DEV", ["cc-fraud"]),
        ("local-sit", "SIT", ["cc-fraud"]),
    ]

    started = await stack.mlc("lifecycle", "start", "cc-fraud@1")
    assert started.returncode == 0, started.stderr
    assert "mlc-cc-fraud-v1" in started.stdout
    twice = await stack.mlc("lifecycle", "start", "cc-fraud@1")
    assert twice.returncode == 4 and "already has a running lifecycle" in twice.stderr

    handle = await find_handle(stack.client, stack.pool, ModelRef(model="cc-fraud", version=1))
    await wait_for_gate(handle, "DEV")
    status = await stack.mlc("status", "cc-fraud@1")
    assert "awaiting_approval in DEV" in status.stdout and "4/4 samples match" in status.stdout
    runs = json.loads((await stack.mlc("status", "--json")).stdout)
    assert runs[0]["workflow_id"] == "mlc-cc-fraud-v1" and runs[0]["stage"] == "DEV"
    shown = json.loads((await stack.mlc("deployments", "--json")).stdout)
    assert [(d["stage"], d["version"], d["state"]) for d in shown] == [("DEV", 1, "serving")]
    await handle.terminate("test over")


async def test_errors_are_one_readable_line(stack: Stack, tmp_path: Path) -> None:
    missing = await stack.mlc("lifecycle", "start", "nope@3")
    assert missing.returncode == 3 and "snapshot nope@3 does not exist" in missing.stderr
    bad_ref = await stack.mlc("approve", "cc-fraud", "--stage", "DEV")
    assert bad_ref.returncode == 1
    assert "is not MODEL@VERSION" in bad_ref.stderr and "Traceback" not in bad_ref.stderr
    not_a_package = await stack.mlc("model", "register", str(tmp_path))
    assert not_a_package.returncode == 1
    assert "manifest.yaml is missing" in not_a_package.stderr
    unknown = await stack.mlc("status", "ghost@1")
    assert unknown.returncode == 3 and "ghost@1 has no lifecycle run" in unknown.stderr
    debug = await stack.mlc("--debug", "status", "ghost@1")
    assert "Traceback" in debug.stderr
