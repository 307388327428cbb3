"""Uploaded lifecycle code: immutable, numbered versions per name, content-addressed."""

from __future__ import annotations

import hashlib

import asyncpg

from mlc.domain import LifecycleDefinition
from mlc.errors import NotFoundError
from mlc.names import BUILT_IN_LIFECYCLES
from mlc.store.db import row_dict

_COLUMNS = "name, version, sha256, source, uploaded_by, uploaded_at"


def source_sha256(source: str) -> str:
    """The content address of lifecycle source (UTF-8 bytes, as uploaded)."""
    return hashlib.sha256(source.encode()).hexdigest()


async def create_lifecycle_definition(
    pool: asyncpg.Pool, name: str, source: str, *, uploaded_by: str
) -> tuple[LifecycleDefinition, bool]:
    """Store ``source`` as the next version of ``name``; return it and whether it is new.

    The same source again returns the version that already holds it (no new row), so a
    repeated upload is harmless. A transaction-scoped advisory lock on the name numbers
    concurrent uploads 1, 2, ... without gaps or clashes.
    """
    sha256 = source_sha256(source)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('lifecycle:' || $1))", name)
        existing = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM lifecycle_definitions WHERE name = $1 AND sha256 = $2", name, sha256
        )
        if existing:
            return LifecycleDefinition.model_validate(row_dict(existing)), False
        row = await conn.fetchrow(
            f"""INSERT INTO lifecycle_definitions (name, version, sha256, source, uploaded_by)
                SELECT $1, COALESCE(MAX(version), 0) + 1, $2, $3, $4
                FROM lifecycle_definitions WHERE name = $1
                RETURNING {_COLUMNS}""",
            name,
            sha256,
            source,
            uploaded_by,
        )
        return LifecycleDefinition.model_validate(row_dict(row)), True


async def find_lifecycle_definition(pool: asyncpg.Pool, name: str, sha256: str) -> LifecycleDefinition | None:
    """The version of ``name`` holding exactly this source, if it was uploaded before."""
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM lifecycle_definitions WHERE name = $1 AND sha256 = $2", name, sha256
    )
    return LifecycleDefinition.model_validate(row_dict(row)) if row else None


async def read_lifecycle_definition(
    pool: asyncpg.Pool, name: str, version: int | None = None
) -> LifecycleDefinition:
    """Version ``version`` of ``name`` (the newest when None), or NotFoundError saying what exists."""
    row = await pool.fetchrow(
        f"""SELECT {_COLUMNS} FROM lifecycle_definitions
            WHERE name = $1 AND ($2::int IS NULL OR version = $2)
            ORDER BY version DESC LIMIT 1""",
        name,
        version,
    )
    if row is not None:
        return LifecycleDefinition.model_validate(row_dict(row))
    versions = [
        r["version"]
        for r in await pool.fetch(
            "SELECT version FROM lifecycle_definitions WHERE name = $1 ORDER BY version", name
        )
    ]
    if versions:
        raise NotFoundError(f"lifecycle {name} has no version {version} (uploaded versions: {versions})")
    uploaded = ", ".join(await read_lifecycle_names(pool)) or "none yet"
    raise NotFoundError(
        f"no lifecycle named {name}; uploaded: {uploaded}; built-in: {', '.join(BUILT_IN_LIFECYCLES)}; "
        f"upload one with `mlc lifecycle upload FILE --name {name}`"
    )


async def next_version(pool: asyncpg.Pool, name: str) -> int:
    """The version the next upload of ``name`` gets."""
    newest = await pool.fetchval("SELECT max(version) FROM lifecycle_definitions WHERE name = $1", name)
    return int(newest or 0) + 1


async def read_lifecycle_definitions(
    pool: asyncpg.Pool, *, after: tuple[str, int] | None = None, limit: int | None = None
) -> list[LifecycleDefinition]:
    """Stored versions by name and version; ``after`` a (name, version) cursor and ``limit``
    for pages."""
    rows = await pool.fetch(
        f"""SELECT {_COLUMNS} FROM lifecycle_definitions
            WHERE $1::text IS NULL OR (name, version) > ($1, $2)
            ORDER BY name, version LIMIT $3""",
        after[0] if after else None,
        after[1] if after else 0,
        limit,
    )
    return [LifecycleDefinition.model_validate(row_dict(r)) for r in rows]


async def read_lifecycle_names(pool: asyncpg.Pool) -> list[str]:
    """Names of the uploaded lifecycles."""
    rows = await pool.fetch("SELECT DISTINCT name FROM lifecycle_definitions ORDER BY name")
    return [r["name"] for r in rows]
