"""Uploading lifecycle code: who may, what passes, and what is stored.

Shared by ``mlc lifecycle upload`` and tests. The checks run cheapest first (role,
name, static validation) and the dry run last, and nothing is stored unless all pass.
The dry run executes the code in the lifecycle worker's sandbox, never in this process.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg

from cli import admin
from lifecycles.validation import check_lifecycle_name, check_source, default_name, format_problems
from mlc import names
from mlc.config import Settings
from mlc.domain import LifecycleDefinition
from mlc.errors import InvalidLifecycleError, PermissionDeniedError
from mlc.store import lifecycle_definitions, snapshots
from mlc.trust.governance import LIFECYCLE_UPLOAD
from mlc.trust.signer import Signer

DRY_RUN_APPROVERS = ("alice", "bob")
"""Approvers the dry run adds when fewer than two people hold the approver role."""


async def upload_lifecycle(
    pool: asyncpg.Pool,
    path: Path,
    *,
    signer: Signer,
    settings: Settings,
    name: str | None = None,
) -> tuple[LifecycleDefinition, bool]:
    """Validate, dry-run, sign and store ``path`` as the next version of a lifecycle.

    Workers run only versions whose ``lifecycle.upload`` statement verifies, so a row
    written straight into the database is never executed.

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
    role = settings.author_role
    state = await admin.state(pool, settings)
    held = state.roles_of(signer.name)
    if role not in held:
        has = ", ".join(sorted(held)) or "no roles"
        raise PermissionDeniedError(
            f"{signer.name} may not upload lifecycle code: it needs role {role} (has {has}); "
            f"an admin can grant it with `mlc user grant {signer.name} --role {role}`"
        )
    try:
        lifecycle = check_lifecycle_name(name or default_name(path.stem), built_in=names.BUILT_IN_WORKFLOWS)
        source = path.read_text(encoding="utf-8")
    except (ValueError, OSError) as exc:
        raise InvalidLifecycleError(f"{path}: {exc}") from None
    problems = check_source(source, filename=str(path))
    if problems:
        raise InvalidLifecycleError(
            f"{path} is not a valid lifecycle; nothing was stored:\n{format_problems(str(path), problems)}"
        )
    sha256 = lifecycle_definitions.source_sha256(source)
    existing = await lifecycle_definitions.find_lifecycle_definition(pool, lifecycle, sha256)
    if existing is not None:
        return existing, False
    from workers.dry_run import DryRunWorld, default_snapshot, dry_run  # lazily: worker machinery

    registered = await snapshots.read_snapshots(pool)
    approvers = sorted(p.name for p in state.principals.values() if "approver" in p.roles)
    while len(approvers) < len(DRY_RUN_APPROVERS):
        approvers.append(next(n for n in DRY_RUN_APPROVERS if n not in approvers))
    world = DryRunWorld(
        snapshot=registered[-1] if registered else default_snapshot(),
        version=await lifecycle_definitions.next_version(pool, lifecycle),
        approvers=tuple(approvers),
        runtime_dir=settings.runtime_dir,
    )
    await dry_run(source, name=lifecycle, path=str(path), world=world)
    await admin.submit(
        pool, settings, signer, LIFECYCLE_UPLOAD, {"name": lifecycle, "sha256": sha256}, subject=lifecycle
    )
    return await lifecycle_definitions.create_lifecycle_definition(
        pool, lifecycle, source, uploaded_by=signer.name
    )
