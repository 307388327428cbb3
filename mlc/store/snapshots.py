"""Models and their immutable snapshots."""

from __future__ import annotations

import asyncpg

from mlc.domain import ModelSnapshot
from mlc.errors import NotFoundError
from mlc.manifest import ModelManifest
from mlc.store.db import row_dict

_COLUMNS = "model, version, sha256, service_tags, entry_module, requirements, created_at"


async def register_snapshot(
    pool: asyncpg.Pool, manifest: ModelManifest, sha256: str, *, registered_by: str
) -> tuple[ModelSnapshot, bool]:
    """Record a snapshot; return it and whether it is new.

    The same content (same sha256) for the same model returns the existing snapshot, so
    registering twice is harmless. Versions are numbered 1, 2, ... per model.
    """
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO models (name) VALUES ($1) ON CONFLICT DO NOTHING", manifest.name)
        await conn.execute("SELECT 1 FROM models WHERE name = $1 FOR UPDATE", manifest.name)
        existing = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM snapshots WHERE model = $1 AND sha256 = $2",
            manifest.name,
            sha256,
        )
        if existing:
            return ModelSnapshot.model_validate(row_dict(existing)), False
        row = await conn.fetchrow(
            f"""INSERT INTO snapshots (model, version, sha256, service_tags, entry_module,
                                       requirements, manifest, registered_by)
                SELECT $1, COALESCE(MAX(version), 0) + 1, $2, $3, $4, $5, $6, $7
                FROM snapshots WHERE model = $1
                RETURNING {_COLUMNS}""",
            manifest.name,
            sha256,
            list(manifest.service_tags),
            manifest.entry_module,
            list(manifest.requirements),
            manifest.model_dump(mode="json"),
            registered_by,
        )
        return ModelSnapshot.model_validate(row_dict(row)), True


async def read_snapshot(pool: asyncpg.Pool, model: str, version: int) -> ModelSnapshot:
    """Return snapshot ``model@version`` or raise NotFoundError saying what exists."""
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM snapshots WHERE model = $1 AND version = $2", model, version
    )
    if row is None:
        versions = [
            r["version"]
            for r in await pool.fetch(
                "SELECT version FROM snapshots WHERE model = $1 ORDER BY version", model
            )
        ]
        known = f"known versions: {versions}" if versions else "no such model is registered"
        raise NotFoundError(
            f"snapshot {model}@{version} does not exist ({known}); "
            "register a package with `mlc model register DIR`"
        )
    return ModelSnapshot.model_validate(row_dict(row))


async def read_snapshots(
    pool: asyncpg.Pool,
    model: str | None = None,
    *,
    after: tuple[str, int] | None = None,
    limit: int | None = None,
) -> list[ModelSnapshot]:
    """Snapshots, optionally of one model, by model and version; ``after`` a (model, version)
    cursor and ``limit`` for pages."""
    rows = await pool.fetch(
        f"""SELECT {_COLUMNS} FROM snapshots
            WHERE ($1::text IS NULL OR model = $1) AND ($2::text IS NULL OR (model, version) > ($2, $3))
            ORDER BY model, version LIMIT $4""",
        model,
        after[0] if after else None,
        after[1] if after else 0,
        limit,
    )
    return [ModelSnapshot.model_validate(row_dict(r)) for r in rows]


async def read_snapshot_page(
    pool: asyncpg.Pool, *, limit: int, after: tuple[str, int] | None = None, model: str | None = None
) -> list[ModelSnapshot]:
    """At most ``limit`` snapshots by model, newest version first, from after ``after``
    (the last ``(model, version)`` of the previous page): one index range, however many exist."""
    last_model, last_version = after if after is not None else (None, None)
    rows = await pool.fetch(
        f"""SELECT {_COLUMNS} FROM snapshots
            WHERE ($1::text IS NULL OR model = $1)
              AND ($2::text IS NULL OR model > $2 OR (model = $2 AND version < $3))
            ORDER BY model, version DESC LIMIT $4""",
        model,
        last_model,
        last_version,
        limit,
    )
    return [ModelSnapshot.model_validate(row_dict(r)) for r in rows]
