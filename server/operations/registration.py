"""Registering a snapshot from an archive already in the artifact store and a signed
``snapshot.register`` statement naming its model and sha256.

The manifest is read from the archive itself (never from what a request says about it),
so the statement, the stored bytes and the snapshot row always agree.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import asyncpg

from mlc.artifacts import ArtifactStore
from mlc.config import Settings
from mlc.domain import ModelSnapshot
from mlc.errors import InvalidPackageError, RefusedError
from mlc.manifest import ModelManifest, load_manifest
from mlc.statements import Envelope
from mlc.store import snapshots
from mlc.trust.governance import SNAPSHOT_REGISTER
from server.operations import governance


async def register(
    pool: asyncpg.Pool, settings: Settings, envelope: Envelope, manifest: ModelManifest, sha256: str
) -> tuple[ModelSnapshot, bool]:
    """Verify and record the statement, then the snapshot; return it and whether it is new.

    Raises:
        RefusedError: the statement names another model or archive than ``manifest`` and
            ``sha256``, does not verify, or was sent before.
    """
    args = governance.claim(envelope, SNAPSHOT_REGISTER).args
    if args.get("model") != manifest.name or args.get("sha256") != sha256:
        raise RefusedError(
            f"the statement registers {args.get('model')} ({str(args.get('sha256'))[:12]}), but the "
            f"archive holds {manifest.name} ({sha256[:12]})"
        )
    verified = await governance.submit(pool, settings, envelope)
    return await snapshots.register_snapshot(pool, manifest, sha256, registered_by=verified.signer)


async def manifest_in_store(artifacts: ArtifactStore, sha256: str) -> ModelManifest:
    """The manifest of a stored archive, unpacked into a scratch folder with the store's
    limits (links, devices, sizes and file counts refused as on the workers).

    Raises:
        NotFoundError: no archive with that digest was uploaded.
        InvalidPackageError: the archive is over a limit or holds no valid manifest.
    """

    def read() -> ModelManifest:
        with tempfile.TemporaryDirectory(dir=artifacts.incoming()) as scratch:
            folder = artifacts.unpack(sha256, Path(scratch) / "package")
            try:
                return load_manifest(folder)
            except InvalidPackageError as exc:
                raise InvalidPackageError(
                    f"artifact {sha256[:12]}: {str(exc).replace(str(folder), 'the package')}"
                ) from None

    return await asyncio.to_thread(read)
