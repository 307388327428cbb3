"""Pool creation and versioned SQL migrations applied on start."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import asyncpg

from mlc.errors import RuntimeUnavailableError

_MIGRATION_LOCK = 727_001
"""Advisory lock id so concurrent workers don't migrate at the same time."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def connect(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """Open a pool with JSON codecs and the schema migrated to the newest version."""
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, init=_init_connection
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise RuntimeUnavailableError(
            f"cannot reach PostgreSQL at {_redact(dsn)}: {exc}; is `mlc dev` running, "
            "or is MLC_DATABASE_URL right?"
        ) from exc
    await migrate(pool)
    return pool


def _redact(dsn: str) -> str:
    """Hide the password in a DSN before it lands in an error message."""
    head, at, tail = dsn.rpartition("@")
    if not at:
        return dsn
    scheme, _, userinfo = head.partition("://")
    return f"{scheme}://{userinfo.split(':')[0]}:***@{tail}"


def _migrations() -> list[tuple[int, str, str]]:
    folder = resources.files("mlc.store") / "migrations"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            number = int(entry.name.split("_", 1)[0])
            found.append((number, entry.name, entry.read_text()))
    return sorted(found)


async def migrate(pool: asyncpg.Pool) -> list[str]:
    """Apply every migration not yet recorded in ``schema_migrations``; return their names."""
    applied: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for number, name, sql in _migrations():
                if number in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", number, name
                    )
                applied.append(name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied


def row_dict(row: asyncpg.Record | None) -> dict[str, Any] | None:
    """A record as a plain dict (arrays become tuples for frozen pydantic models)."""
    if row is None:
        return None
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(row).items()}
