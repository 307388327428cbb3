"""Batch jobs on a docker runtime: one container without a network per job, removed after."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import orjson

from activities.runtimes.base import (
    BatchJobRequest,
    BatchJobResult,
    Heartbeat,
    RuntimeDriver,
)
from activities.runtimes.docker.containers import (
    container_name,
    log_tail,
    model_labels,
    model_network,
    remove,
    run_model_container,
)
from activities.runtimes.docker.engine import HEARTBEAT_SECONDS, connect, docker_settings
from activities.runtimes.docker.images import PACKAGE_DIR, ensure_image
from mlc.artifacts import ArtifactStore
from mlc.errors import DeploymentFailedError
from mlc.evaluation import test_dataset
from mlc.manifest import load_manifest


async def run_batch(driver: RuntimeDriver, request: BatchJobRequest, heartbeat: Heartbeat) -> BatchJobResult:
    """Score the input in a one-off container with no network; remove it in every case.

    Raises:
        DeploymentFailedError: the image could not be built or the job failed (quoting
            the container's last log lines).
        RuntimeUnavailableError: the engine cannot be reached.
    """
    runtime, snapshot = request.runtime, request.snapshot
    settings = docker_settings(runtime)
    workdir = driver.workdir(runtime, request.deployment_id)
    input_path, output_path = workdir / "input.jsonl", workdir / "output.jsonl"
    records = await asyncio.to_thread(_prepare_input, driver, request, workdir, input_path)
    async with connect(runtime, f"run a batch job of {snapshot.ref}") as client:
        name = container_name(request.deployment_id, suffix="-batch")
        leftovers = await asyncio.to_thread(
            client.containers.list,
            ignore_removed=True,
            all=True,
            filters={"label": [f"mlc.deployment-id={request.deployment_id}", "mlc.mode=batch"]},
        )
        for leftover in leftovers:  # from an attempt whose worker died: start afresh
            await asyncio.to_thread(remove, leftover)
        image = await ensure_image(
            client,
            settings=driver.settings,
            runtime=runtime,
            snapshot=snapshot,
            heartbeat=heartbeat,
            log_path=workdir / "build.log",
        )
        command = [
            "python3", "-m", "mlc.serving", "batch", "--package", PACKAGE_DIR,
            "--input", "/data/input.jsonl", "--output", "/data/output.jsonl",
        ]  # fmt: skip
        started = time.monotonic()
        container = await asyncio.to_thread(
            run_model_container,
            client,
            image.id,
            command,
            name=name,
            labels=model_labels(
                deployment_id=request.deployment_id,
                runtime=runtime,
                snapshot=snapshot,
                stage=request.stage,
                mode="batch",
            ),
            settings=settings,
            snapshot=snapshot,
            restart=False,
            network_mode=model_network(runtime),
            volumes={str(workdir): {"bind": "/data", "mode": "rw"}},
        )
        try:
            summary = await _wait_batch(container, request, heartbeat)
        finally:
            await asyncio.to_thread(remove, container)
    return BatchJobResult(
        output_path=str(output_path),
        records=int(summary.get("records", records)),
        seconds=float(summary.get("seconds", time.monotonic() - started)),
        details={
            "image": image.tag,
            "image_id": image.id,
            "image_built": image.built,
            "image_seconds": round(image.seconds, 3),
            "container_seconds": round(time.monotonic() - started, 3),
            "load_seconds": summary.get("load_seconds"),
        },
    )


def _prepare_input(driver: RuntimeDriver, request: BatchJobRequest, workdir: Path, input_path: Path) -> int:
    """Put the job's input at ``input_path`` and return its record count.

    The working directory is made world-writable because the job runs as an
    unprivileged user (``docker.user``) that owns nothing on the host, and must create
    its output there.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o777)
    (workdir / "output.jsonl").unlink(missing_ok=True)
    if request.input_path is not None:
        shutil.copyfile(request.input_path, input_path)
        with input_path.open("rb") as fh:
            count = sum(1 for line in fh if line.strip())
    else:
        package = ArtifactStore(driver.settings.artifact_dir).unpack(
            request.snapshot.sha256, workdir / "package"
        )
        dataset = test_dataset(load_manifest(package), package)
        input_path.write_bytes(b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in dataset))
        count = len(dataset)
    os.chmod(input_path, 0o644)
    return count


async def _wait_batch(container: Any, request: BatchJobRequest, heartbeat: Heartbeat) -> dict[str, Any]:
    """Wait for the job to exit and return its summary (its last stdout line)."""
    started = time.monotonic()
    while True:
        await asyncio.to_thread(container.reload)
        state = container.attrs["State"]
        if state["Status"] in ("exited", "dead"):
            break
        heartbeat(f"batch job {container.name} running for {time.monotonic() - started:.0f} s")
        await asyncio.sleep(min(HEARTBEAT_SECONDS, 0.1 + (time.monotonic() - started) / 4))
    what = f"batch job of {request.snapshot.ref} in {request.stage} on runtime {request.runtime.name}"
    if state["ExitCode"] != 0:
        tail = await asyncio.to_thread(log_tail, container)
        raise DeploymentFailedError(
            f"{what} failed: container {container.name} exited with code {state['ExitCode']}. "
            f"Last log lines:\n{tail}"
        )
    stdout = await asyncio.to_thread(container.logs, stdout=True, stderr=False, tail=5)
    for line in reversed(bytes(stdout).decode(errors="replace").splitlines()):
        with contextlib.suppress(json.JSONDecodeError):
            summary = json.loads(line)
            if isinstance(summary, dict):
                return summary
    tail = await asyncio.to_thread(log_tail, container)
    raise DeploymentFailedError(
        f"{what}: container {container.name} exited 0 but printed no JSON summary. Last log lines:\n{tail}"
    )
