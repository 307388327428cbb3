"""Pool creation and versioned SQL migrations applied on start."""

from __future__ import annotations

import json
import secrets
from importlib import resources
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from mlc.errors import RuntimeUnavailableError

WORKER_ROLE = "mlc_worker"
"""The workers' PostgreSQL role: SELECT/INSERT on the trail, no UPDATE/DELETE (0002_trust.sql)."""
_MIGRATION_LOCK = 727_001
"""Advisory lock id so concurrent workers don't migrate at the same time."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def connect(
    dsn: str, *, min_size: int = 1, max_size: int = 10, migrate_schema: bool = True
) -> asyncpg.Pool:
    """Open a pool with JSON codecs and the schema migrated to the newest version.

    The workers' least-privilege role cannot migrate (``migrate_schema=False``): it only
    checks that the owner has migrated the schema this code needs.
    """
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, init=_init_connection
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise RuntimeUnavailableError(
            f"cannot reach PostgreSQL at {_redact(dsn)}: {exc}; is `mlc dev` running, "
            "or is MLC_DATABASE_URL right?"
        ) from exc
    if migrate_schema:
        await migrate(pool)
    else:
        await _check_schema(pool)
    return pool


async def _check_schema(pool: asyncpg.Pool) -> None:
    newest = max(number for number, _, _ in _migrations())
    try:
        applied = await pool.fetchval("SELECT max(version) FROM schema_migrations")
    except asyncpg.PostgresError:
        applied = None
    if applied is None or applied < newest:
        await pool.close()
        raise RuntimeUnavailableError(
            f"the inventory schema is at version {applied or 0}, this worker needs {newest}: run any "
            "`mlc` command with the owner's MLC_DATABASE_URL to migrate it"
        )


async def enable_worker_login(pool: asyncpg.Pool, dsn: str) -> str:
    """Give the ``mlc_worker`` role (created by the migrations) a fresh password; return its DSN.

    For stacks this project starts itself (``mlc dev``, tests); team deployments create the
    login with their own secret management and pass ``MLC_WORKER_DATABASE_URL``.
    """
    password = secrets.token_urlsafe(24)  # [A-Za-z0-9_-]: safe inside the quoted literal
    await pool.execute(f"ALTER ROLE {WORKER_ROLE} LOGIN PASSWORD '{password}'")
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{WORKER_ROLE}:{quote(password)}@{host}"))


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
