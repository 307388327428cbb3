"""Uploading lifecycle code: read the file, sign the upload, have it checked and stored.

Shared by ``mlc lifecycle upload`` and tests. Signing happens here, with the uploader's
key; the checks (role, name, static validation, the dry run in the lifecycle worker's
sandbox) and storing are :mod:`server.operations.lifecycles`, which ``mlc server`` runs
for API clients too.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg

from lifecycles.validation import default_name
from mlc.config import Settings
from mlc.domain import LifecycleDefinition
from mlc.errors import InvalidLifecycleError
from mlc.statements import Envelope
from mlc.store import lifecycle_definitions
from mlc.trust.governance import LIFECYCLE_UPLOAD
from mlc.trust.signer import Signer
from server.operations import lifecycles


def read_lifecycle(path: Path, name: str | None) -> tuple[str, str]:
    """The workflow type to run ``path`` as (default: its stem in CamelCase) and its source.

    Raises:
        InvalidLifecycleError: the file cannot be read as UTF-8 text.
    """
    try:
        return name or default_name(path.stem), path.read_text(encoding="utf-8")
    except (ValueError, OSError) as exc:
        raise InvalidLifecycleError(f"{path}: {exc}") from None


def sign_upload(signer: Signer, name: str, source: str) -> Envelope:
    """``signer``'s ``lifecycle.upload`` statement for ``source`` as lifecycle ``name``."""
    sha256 = lifecycle_definitions.source_sha256(source)
    return signer.governance(LIFECYCLE_UPLOAD, {"name": name, "sha256": sha256}, subject=name)


async def upload_lifecycle(
    pool: asyncpg.Pool,
    path: Path,
    *,
    signer: Signer,
    settings: Settings,
    name: str | None = None,
) -> tuple[LifecycleDefinition, bool]:
    """Validate, dry-run, sign and store ``path`` as the next version of a lifecycle.

    Args:
        pool: The inventory.
        path: The lifecycle's Python file.
        signer: Who uploads; must hold ``settings.author_role``.
        settings: Trust root and author role.
        name: The workflow type to run it as; default: the file stem in CamelCase.

    Returns:
        The stored version and whether it is new (the same source again is not).

    Raises:
        PermissionDeniedError: ``uploader`` lacks the role.
        InvalidLifecycleError: bad name, unreadable file, a static problem or a failed
            dry run; the message carries ``file:line: reason``.
    """
    lifecycle, source = read_lifecycle(path, name)
    envelope = sign_upload(signer, lifecycle, source)
    return await lifecycles.upload(
        pool, settings, envelope, name=lifecycle, source=source, filename=str(path)
    )
