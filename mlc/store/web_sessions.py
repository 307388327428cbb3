"""Browser sessions of the web page: single-use links, then cookies (only hashes are kept)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

LINK_LIFETIME = timedelta(seconds=60)
"""How long the link ``mlc login --web`` prints can be followed (once)."""
SESSION_LIFETIME = timedelta(hours=8)
"""How long a browser session lasts from following its link; no renewal."""


@dataclass(frozen=True)
class WebSession:
    """Who a live session's cookie stands for, and how they proved it when it was made."""

    principal: str
    role: int
    made_by: str
    expires_at: datetime


async def create_link(
    pool: asyncpg.Pool, *, link_hash: str, principal: str, role: int, made_by: str
) -> datetime:
    """Record a single-use link for ``principal`` (expired sessions and links go first);
    return when the link expires."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM web_sessions WHERE coalesce(expires_at, link_expires_at) < now()")
        expires: datetime = await conn.fetchval(
            """INSERT INTO web_sessions (principal, role, made_by, link_hash, link_expires_at)
               VALUES ($1, $2, $3, $4, now() + $5::interval) RETURNING link_expires_at""",
            principal,
            role,
            made_by,
            link_hash,
            LINK_LIFETIME,
        )
        return expires


async def redeem_link(pool: asyncpg.Pool, *, link_hash: str, token_hash: str) -> WebSession | None:
    """Turn an unexpired, unused link into a session held by ``token_hash``'s cookie; None
    when the link is unknown, used or expired (one statement: two clicks cannot both win)."""
    row = await pool.fetchrow(
        """UPDATE web_sessions SET link_hash = NULL, token_hash = $2, expires_at = now() + $3::interval
           WHERE link_hash = $1 AND link_expires_at > now() AND token_hash IS NULL
           RETURNING principal, role, made_by, expires_at""",
        link_hash,
        token_hash,
        SESSION_LIFETIME,
    )
    return None if row is None else WebSession(**dict(row))


async def read_session(pool: asyncpg.Pool, token_hash: str) -> WebSession | None:
    """The live session whose cookie hashes to ``token_hash``, if any."""
    row = await pool.fetchrow(
        """SELECT principal, role, made_by, expires_at FROM web_sessions
           WHERE token_hash = $1 AND expires_at > now()""",
        token_hash,
    )
    return None if row is None else WebSession(**dict(row))
