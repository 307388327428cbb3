"""Governance statements in the trail: submit one (verified first), and load the verified state.

The CLI submits; workers only read. Both derive who may do what by replaying the signed
statements with :class:`mlc.trust.governance.Governance`, never from mutable rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from pydantic import ValidationError

from mlc.errors import RefusedError
from mlc.statements import Envelope, GovernancePredicate
from mlc.store import trail
from mlc.trust.governance import Governance

log = logging.getLogger(__name__)

AfterApply = Callable[[asyncpg.Connection, GovernancePredicate], Awaitable[Any]]
"""Writes a statement's effect on the inventory (a runtime row, a lifecycle version)."""


class GovernanceCache:
    """The verified state, brought up to date incrementally from the append-only trail.

    Entries never change once written, so a worker replays each one once; one that
    fails verification is skipped (and reported by ``mlc audit verify``), never applied.
    """

    def __init__(self, *, pinned_root: str | None, author_role: str) -> None:
        self.state = Governance(pinned_root=pinned_root, author_role=author_role)
        self.seq = 0
        self.skipped: list[tuple[int, str]] = []
        self._lock = asyncio.Lock()

    async def current(self, conn: asyncpg.Connection | asyncpg.Pool) -> Governance:
        """The state after every governance entry appended so far."""
        async with self._lock:
            for entry in await trail.read_entries(conn, kinds=(trail.GOVERNANCE,), after=self.seq):
                try:
                    self.state.apply(Envelope.model_validate_json(entry.envelope or "null"))
                except (RefusedError, ValueError, ValidationError) as exc:
                    log.warning("governance entry %s does not count: %s", entry.seq, exc)
                    self.skipped.append((entry.seq, str(exc)))
                self.seq = entry.seq
            return self.state


async def load(
    conn: asyncpg.Connection | asyncpg.Pool, *, pinned_root: str | None, author_role: str
) -> Governance:
    """The verified state, replayed from scratch."""
    return await GovernanceCache(pinned_root=pinned_root, author_role=author_role).current(conn)


async def submit(
    pool: asyncpg.Pool,
    envelope: Envelope,
    *,
    pinned_root: str | None,
    author_role: str,
    then: AfterApply | None = None,
) -> GovernancePredicate:
    """Verify a signed governance statement against the current state, then record it.

    Verification, the append and ``then`` run in one transaction under the trail's lock,
    so two admins cannot race each other past a check. The state is this process's
    cache of the pool's trail, brought up to date under that lock (entries never change
    once written), so many submits in one process (a bulk registration) cost one replay,
    not one each; a submit that fails drops the cache, which may hold what rolled back.

    Raises:
        RefusedError: the statement does not verify or the signer lacks the role;
            nothing is recorded.
    """
    cache = _submit_cache(pool, pinned_root=pinned_root, author_role=author_role)
    try:
        async with pool.acquire() as conn, conn.transaction():
            await trail.lock(conn)
            state = await cache.current(conn)
            predicate = state.apply(envelope)
            entry = await trail.append(
                conn,
                trail.GOVERNANCE,
                {"action": predicate.action, "args": predicate.args, "signer": predicate.signer},
                envelope=envelope,
                nonce=predicate.nonce,
            )
            cache.seq = entry.seq  # applied above: not to be replayed again
            if then is not None:
                await then(conn, predicate)
    except BaseException:
        _SUBMIT_CACHES.pop(id(pool), None)
        raise
    return predicate


_SUBMIT_CACHES: OrderedDict[int, tuple[asyncpg.Pool, GovernanceCache]] = OrderedDict()
"""Recently used pools' submit caches (the pool is kept so its id cannot be reused)."""
_SUBMIT_CACHE_POOLS = 8


def _submit_cache(pool: asyncpg.Pool, *, pinned_root: str | None, author_role: str) -> GovernanceCache:
    found = _SUBMIT_CACHES.get(id(pool))
    if found is not None and (found[1].state.pinned_root, found[1].state.author_role) == (
        pinned_root,
        author_role,
    ):
        _SUBMIT_CACHES.move_to_end(id(pool))
        return found[1]
    cache = GovernanceCache(pinned_root=pinned_root, author_role=author_role)
    _SUBMIT_CACHES[id(pool)] = (pool, cache)
    while len(_SUBMIT_CACHES) > _SUBMIT_CACHE_POOLS:
        _SUBMIT_CACHES.popitem(last=False)
    return cache
