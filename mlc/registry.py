"""Registering model packages as snapshots, and the default runtimes of a dev stack."""

from __future__ import annotations

import contextlib
from pathlib import Path

import asyncpg

from mlc.artifacts import ArtifactStore, build_archive
from mlc.domain import DEFAULT_STAGES, ModelSnapshot, Runtime
from mlc.errors import ConflictError
from mlc.manifest import load_manifest
from mlc.store import runtimes, snapshots


async def register_package(
    pool: asyncpg.Pool, artifacts: ArtifactStore, package_dir: Path, *, registered_by: str
) -> tuple[ModelSnapshot, bool]:
    """Validate, archive and record a package; return the snapshot and whether it is new.

    The archive is stored before the row, so a snapshot row never points at a missing
    artifact; identical content yields the existing snapshot. Both checks run before
    anything is stored: the manifest's (requirements, paths inside the package) and the
    archive's (no link leading outside, no FIFO or device).

    Raises:
        InvalidPackageError: naming the manifest entry or file that is refused.
    """
    manifest = load_manifest(package_dir)
    sha = artifacts.put(build_archive(package_dir))
    return await snapshots.register_snapshot(pool, manifest, sha, registered_by=registered_by)


async def ensure_dev_runtimes(pool: asyncpg.Pool, task_queue: str) -> None:
    """Add a local runtime per default stage (serving every service tag) if missing."""
    for stage in DEFAULT_STAGES:
        runtime = Runtime(name=f"local-{stage.lower()}", stage=stage, task_queue=task_queue)
        with contextlib.suppress(ConflictError):
            await runtimes.create_runtime(pool, runtime)
