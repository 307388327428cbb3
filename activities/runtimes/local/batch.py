"""Batch jobs on a local runtime: a child process per job, its input, output and summary."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from activities.runtimes.base import (
    BatchJobRequest,
    Heartbeat,
)
from activities.runtimes.local.layout import (
    BATCH_SUMMARY,
    HEARTBEAT_INTERVAL_SECONDS,
    OUTPUT_DRAIN_SECONDS,
    tail,
)
from activities.runtimes.local.servers import alive, child_env, fork_client
from mlc import isolation, processes
from mlc.errors import DeploymentFailedError
from mlc.evaluation import test_dataset
from mlc.isolation import ModelUser
from mlc.manifest import load_manifest
from mlc.serving.forkserver import ForkClient


def write_test_dataset(package: Path, path: Path) -> None:
    records = test_dataset(load_manifest(package), package)
    isolation.write_file(path, "".join(json.dumps(r) + "\n" for r in records), mode=0o644)


def input_for(path: Path, workdir: Path, user: ModelUser | None) -> Path:
    """``path``, or a copy in the deployment folder (``input/NAME``) when the deployment's
    user could not read it (a file only root may read, or under a folder others cannot
    traverse): the job reads what the runtime hands it, not whatever root can read."""
    if user is None or _readable_by_others(path):
        return path
    folder = workdir / "input"  # the file keeps its name: the job's errors name it
    isolation.clear_for_root(folder)
    folder.mkdir(mode=0o755, exist_ok=True)
    copy = folder / path.name
    tmp = folder / f".{path.name}.tmp"
    isolation.clear_for_root(tmp)
    with path.open("rb") as source:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
    tmp.replace(copy)
    return copy


def _readable_by_others(path: Path) -> bool:
    try:
        resolved = path.resolve(strict=True)
        if not resolved.stat().st_mode & 0o004:
            return False
        return all(p.stat().st_mode & 0o001 for p in resolved.parents)
    except OSError:
        return False


async def run_job(
    request: BatchJobRequest,
    package: Path,
    input_path: Path,
    output_path: Path,
    log_path: Path,
    user: ModelUser | None,
    heartbeat: Heartbeat,
    *,
    home: Path,
) -> dict[str, Any]:
    """Run ``python -m mlc.serving batch`` (as ``user``) to completion, heartbeating; return
    its summary. Forked from the warm forkserver when it is ready (no interpreter start, no
    import of the model's libraries: most of a short job's time), else spawned."""
    argv = ["batch", "--package", str(package), "--input", str(input_path), "--output", str(output_path)]
    forks = fork_client(home)
    if forks is not None:
        summary_path = log_path.parent / BATCH_SUMMARY
        isolation.clear_for_root(summary_path)
        with isolation.open_log(log_path, user):
            pass  # the log exists and is the user's, as for a spawned job
        pid = forks.fork(
            argv,
            cwd=log_path.parent,
            env=child_env(request.snapshot, log_path.parent),
            log=log_path,
            die_with_parent=False,
            user=None if user is None else asdict(user),
            stdout=summary_path,
        )
        if pid is not None:
            code = await _wait_forked(pid, forks, request, heartbeat)
            return _summary(request, code, isolation.read_tail(summary_path) or "", log_path)
    with isolation.open_log(log_path, user) as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mlc.serving", "batch",
            "--package", str(package), "--input", str(input_path), "--output", str(output_path),
            cwd=log_path.parent,
            env=child_env(request.snapshot, log_path.parent),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            **isolation.popen_options(user),
        )  # fmt: skip
    chunks: list[bytes] = []

    async def drain() -> None:
        assert process.stdout is not None
        while chunk := await process.stdout.read(1 << 16):
            chunks.append(chunk)

    reading = asyncio.ensure_future(drain())
    try:
        # Not process.wait(): it also waits for the pipes, which a process the job left
        # running may hold open forever.
        started = noted = time.monotonic()
        heartbeat(f"batch job for {request.snapshot.ref} started")
        while process.returncode is None:
            if time.monotonic() - noted >= HEARTBEAT_INTERVAL_SECONDS:
                noted = time.monotonic()
                heartbeat(f"batch job for {request.snapshot.ref}: {noted - started:.0f} s")
            if reading.done():
                await asyncio.sleep(0.01)
            else:
                await asyncio.wait({reading}, timeout=0.05)
        # Whatever the job left running (holding its output pipe open) ends with it.
        await asyncio.to_thread(isolation.kill_user, user)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reading), timeout=OUTPUT_DRAIN_SECONDS)
    finally:
        reading.cancel()
        if process.returncode is None:
            process.kill()
            await process.wait()
    return _summary(request, process.returncode, b"".join(chunks).decode(errors="replace"), log_path)


async def _wait_forked(
    pid: int, forks: ForkClient, request: BatchJobRequest, heartbeat: Heartbeat
) -> int | None:
    """Wait for a forked batch job to exit, heartbeating; return its exit code. Cancelled,
    it kills the job's process group."""
    started = noted = time.monotonic()
    heartbeat(f"batch job for {request.snapshot.ref} started")
    try:
        while alive(pid):
            if time.monotonic() - noted >= HEARTBEAT_INTERVAL_SECONDS:
                noted = time.monotonic()
                heartbeat(f"batch job for {request.snapshot.ref}: {noted - started:.0f} s")
            await asyncio.sleep(0.01)
    except BaseException:
        processes.signal_group(pid, signal.SIGKILL)
        raise
    deadline = time.monotonic() + 1.0  # the forkserver notes the code as it reaps the job
    while (code := forks.exit_code(pid)) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return code


def _summary(request: BatchJobRequest, code: int | None, stdout: str, log_path: Path) -> dict[str, Any]:
    """The job's summary (the last line it printed), or the error its exit code means."""
    if code != 0:
        raise DeploymentFailedError(
            f"batch job for {request.snapshot.ref} on runtime {request.runtime.name} "
            f"(deployment {request.deployment_id}) exited with code {code}; "
            f"last lines of {log_path}:\n{tail(log_path)}"
        )
    lines = stdout.strip().splitlines()
    if not lines:
        raise DeploymentFailedError(
            f"batch job for {request.snapshot.ref} (deployment {request.deployment_id}) exited "
            f"without printing its summary; see {log_path}"
        )
    return dict(json.loads(lines[-1]))
