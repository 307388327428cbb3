"""Storing uploaded lifecycle code: who may, what passes, and what is stored.

The checks run cheapest first (role, name, size, static validation) and the dry run
last, and nothing is stored unless all pass. The dry run executes the code in the
lifecycle worker's sandbox, never in this process, one at a time per process (each is a
sandboxed Python with a Temporal test server).
"""

from __future__ import annotations

import asyncio

import asyncpg

from lifecycles.validation import check_lifecycle_name, check_source, format_problems
from mlc import names
from mlc.config import Settings
from mlc.domain import LifecycleDefinition
from mlc.errors import InvalidLifecycleError, PermissionDeniedError, RefusedError
from mlc.statements import Envelope
from mlc.store import governance as stored
from mlc.store import lifecycle_definitions, snapshots
from mlc.trust.governance import LIFECYCLE_UPLOAD
from server.operations import governance

MAX_SOURCE_BYTES = 256 * 1024
"""Largest lifecycle source (UTF-8): lifecycles are orchestration code, not data."""
DRY_RUN_APPROVERS = ("alice", "bob")
"""Approvers the dry run adds when fewer than two people hold the approver role."""
_dry_runs = asyncio.Lock()


async def upload(
    pool: asyncpg.Pool, settings: Settings, envelope: Envelope, *, name: str, source: str, filename: str
) -> tuple[LifecycleDefinition, bool]:
    """Validate, dry-run and store ``source`` as the next version of lifecycle ``name``,
    with its signed ``lifecycle.upload`` statement.

    Workers run only versions whose ``lifecycle.upload`` statement verifies, so a row
    written straight into the database is never executed.

    Returns:
        The stored version and whether it is new (the same source again is not).

    Raises:
        PermissionDeniedError: the signer lacks ``settings.author_role``.
        RefusedError: the statement names another lifecycle or source, or does not verify.
        InvalidLifecycleError: bad name, too large, a static problem or a failed dry run;
            the message carries ``file:line: reason``.
    """
    claim = governance.claim(envelope, LIFECYCLE_UPLOAD)
    sha256 = lifecycle_definitions.source_sha256(source)
    if (claim.args.get("name"), claim.args.get("sha256")) != (name, sha256):
        raise RefusedError(
            f"the statement uploads {claim.args.get('name')} ({str(claim.args.get('sha256'))[:12]}), "
            f"not {name} ({sha256[:12]})"
        )
    role = settings.author_role
    state = await stored.load(pool, pinned_root=settings.trust_root, author_role=role)
    held = state.roles_of(claim.signer)
    if role not in held:
        has = ", ".join(sorted(held)) or "no roles"
        raise PermissionDeniedError(
            f"{claim.signer} may not upload lifecycle code: it needs role {role} (has {has}); "
            f"an admin can grant it with `mlc user grant {claim.signer} --role {role}`"
        )
    try:
        lifecycle = check_lifecycle_name(name, built_in=names.BUILT_IN_WORKFLOWS)
    except ValueError as exc:
        raise InvalidLifecycleError(f"{filename}: {exc}") from None
    if len(source.encode()) > MAX_SOURCE_BYTES:
        raise InvalidLifecycleError(f"{filename}: lifecycle code may have at most {MAX_SOURCE_BYTES:,} bytes")
    problems = check_source(source, filename=filename)
    if problems:
        raise InvalidLifecycleError(
            f"{filename} is not a valid lifecycle; nothing was stored:\n{format_problems(filename, problems)}"
        )
    existing = await lifecycle_definitions.find_lifecycle_definition(pool, lifecycle, sha256)
    if existing is not None:
        return existing, False
    from workers.dry_run import DryRunWorld, default_snapshot, dry_run  # lazily: worker machinery

    registered = await snapshots.read_snapshots(pool)
    approvers = sorted(p.name for p in state.principals.values() if "approver" in p.roles)
    while len(approvers) < len(DRY_RUN_APPROVERS):
        approvers.append(next(n for n in DRY_RUN_APPROVERS if n not in approvers))
    async with _dry_runs:
        world = DryRunWorld(
            snapshot=registered[-1] if registered else default_snapshot(),
            version=await lifecycle_definitions.next_version(pool, lifecycle),
            approvers=tuple(approvers),
            runtime_dir=settings.runtime_dir,
        )
        await dry_run(source, name=lifecycle, path=filename, world=world)
    verified = await governance.submit(pool, settings, envelope)
    return await lifecycle_definitions.create_lifecycle_definition(
        pool, lifecycle, source, uploaded_by=verified.signer
    )
