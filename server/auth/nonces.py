"""Forgetting spent request nonces once their signatures have expired.

A nonce only has to be remembered while its signature could still verify (a minute plus
the clock skew); afterwards the signature is refused as stale anyway. Deleting expired rows
every minute keeps ``api_nonces`` to about a minute of requests (≤ 12k rows at 200 req/s).
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

log = logging.getLogger(__name__)

SWEEP_SECONDS = 60.0


async def purge_expired_nonces(pool: asyncpg.Pool) -> int:
    """Delete the nonces whose signatures have expired; how many went."""
    status: str = await pool.execute("DELETE FROM api_nonces WHERE expires_at < now()")
    return int(status.rsplit(" ", 1)[-1])


async def sweep_nonces(pool: asyncpg.Pool, *, every: float = SWEEP_SECONDS) -> None:
    """Purge expired nonces now and then every ``every`` seconds until cancelled; a failed
    sweep is logged and retried next time (the rows only cost space meanwhile)."""
    while True:
        try:
            await purge_expired_nonces(pool)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("could not delete expired request nonces (will retry): %s", type(exc).__name__)
        await asyncio.sleep(every)
