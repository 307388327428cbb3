"""People and their roles: who may approve at a gate, who may upload lifecycles."""

from __future__ import annotations

import asyncpg

ROLE_PREFIX = "role:"


async def grant_roles(pool: asyncpg.Pool, name: str, roles: list[str]) -> list[str]:
    """Give ``name`` these roles (added to what it has); return all its roles."""
    row = await pool.fetchrow(
        """INSERT INTO principals (name, roles) VALUES ($1, $2)
           ON CONFLICT (name) DO UPDATE SET roles = (
               SELECT array_agg(DISTINCT r ORDER BY r)
               FROM unnest(principals.roles || EXCLUDED.roles) AS r)
           RETURNING roles""",
        name,
        sorted(set(roles)),
    )
    return list(row["roles"])


async def read_roles(pool: asyncpg.Pool, name: str) -> list[str]:
    """The roles of ``name`` (empty when unknown)."""
    roles = await pool.fetchval("SELECT roles FROM principals WHERE name = $1", name)
    return list(roles or [])


async def read_principals(pool: asyncpg.Pool) -> dict[str, list[str]]:
    """Everyone and their roles."""
    rows = await pool.fetch("SELECT name, roles FROM principals ORDER BY name")
    return {r["name"]: list(r["roles"]) for r in rows}


async def resolve_identities(pool: asyncpg.Pool, entries: tuple[str, ...]) -> list[str]:
    """Expand gate approver entries (names and ``role:NAME``) into identities."""
    names = {e for e in entries if not e.startswith(ROLE_PREFIX)}
    roles = [e.removeprefix(ROLE_PREFIX) for e in entries if e.startswith(ROLE_PREFIX)]
    if roles:
        rows = await pool.fetch("SELECT name FROM principals WHERE roles && $1::text[]", roles)
        names.update(r["name"] for r in rows)
    return sorted(names)
