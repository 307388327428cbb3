"""Registering model packages as snapshots, with a signed statement naming who registered them.

Who registered a snapshot matters for segregation of duties (by default a registrant may
not approve their own snapshot), so it is taken from the signed ``snapshot.register``
statement, never from the ``registered_by`` column. The CLI signs; recording is
:mod:`server.operations.registration`, which ``mlc server`` runs for API clients.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg

from mlc.artifacts import ArtifactStore, build_archive
from mlc.config import Settings
from mlc.domain import ModelSnapshot
from mlc.manifest import load_manifest
from mlc.statements import Envelope
from mlc.trust.governance import SNAPSHOT_REGISTER
from mlc.trust.signer import Signer
from server.operations import registration


def sign_registration(signer: Signer, model: str, sha256: str) -> Envelope:
    """``signer``'s ``snapshot.register`` statement for one archive of ``model``."""
    return signer.governance(SNAPSHOT_REGISTER, {"model": model, "sha256": sha256}, subject=model)


async def register_package(
    pool: asyncpg.Pool, artifacts: ArtifactStore, package_dir: Path, *, signer: Signer, settings: Settings
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
    envelope = sign_registration(signer, manifest.name, sha)
    return await registration.register(pool, settings, envelope, manifest, sha)
