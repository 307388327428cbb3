"""The audit trail: one append-only, hash-chained log of everything that was decided or done.

Each entry stores its body as canonical JSON text (hashed exactly as stored), the DSSE
envelope when a person signed it, and the hash of the previous entry. Appends are
serialised by a transaction-scoped advisory lock, so the chain has no forks and no gaps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg

from mlc.errors import RefusedError
from mlc.statements import Envelope, canonical
from mlc.trust.entries import (
    DECISION,
    DEPLOYMENT,
    GENESIS,
    GOVERNANCE,
    KINDS,
    RECONCILER,
    RUN,
    TEST_REPORT,
    TRAFFIC,
    Entry,
    entry_hash,
)

__all__ = [
    "DECISION",
    "DEPLOYMENT",
    "GENESIS",
    "GOVERNANCE",
    "KINDS",
    "RECONCILER",
    "RUN",
    "TEST_REPORT",
    "TRAFFIC",
    "Entry",
    "entry_hash",
    "append",
    "entry_pages",
    "lock",
    "read_entries",
    "read_recent",
]
"""The trail's storage, and the entry format it stores (:mod:`mlc.trust.entries`, where its
verification lives)."""

_APPEND_LOCK = 727_002


_COLUMNS = "seq, kind, body, prev_hash, hash, model, version, workflow_id, run_id, envelope, nonce"


def _entry(row: asyncpg.Record) -> Entry:
    return Entry(**{k: row[k] for k in _COLUMNS.split(", ")})


@asynccontextmanager
async def _connection(pool_or_conn: asyncpg.Connection | asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A connection: acquired from a pool, or the one given (whose transaction we then join)."""
    if isinstance(pool_or_conn, asyncpg.Pool):
        async with pool_or_conn.acquire() as conn:
            yield conn
    else:
        yield pool_or_conn


async def append(
    pool_or_conn: asyncpg.Connection | asyncpg.Pool,
    kind: str,
    body: dict[str, Any],
    *,
    envelope: Envelope | None = None,
    model: str | None = None,
    version: int | None = None,
    workflow_id: str | None = None,
    run_id: str | None = None,
    nonce: str | None = None,
    idempotency_key: str | None = None,
) -> Entry:
    """Append one entry (inside its own transaction unless ``conn`` is already in one).

    Raises:
        RefusedError: ``nonce`` was used before (a replayed statement).
    """
    async with _connection(pool_or_conn) as conn, conn.transaction():
        await lock(conn)
        if idempotency_key is not None:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM audit_log WHERE idempotency_key = $1", idempotency_key
            )
            if row is not None:
                return _entry(row)
        last = await conn.fetchrow("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        fields: dict[str, Any] = {
            "seq": (last["seq"] + 1) if last else 1,
            "kind": kind,
            "model": model,
            "version": version,
            "workflow_id": workflow_id,
            "run_id": run_id,
            "body": canonical({**body, "recorded_at": datetime.now(UTC).isoformat()}).decode(),
            "envelope": canonical(envelope.to_json()).decode() if envelope else None,
            "nonce": nonce,
            "prev_hash": last["hash"] if last else GENESIS,
        }
        entry = Entry(**fields, hash=entry_hash(**fields))
        try:
            await conn.execute(
                """INSERT INTO audit_log (seq, kind, body, prev_hash, hash, model, version,
                                          workflow_id, run_id, envelope, nonce, idempotency_key)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)""",
                entry.seq,
                entry.kind,
                entry.body,
                entry.prev_hash,
                entry.hash,
                entry.model,
                entry.version,
                entry.workflow_id,
                entry.run_id,
                entry.envelope,
                entry.nonce,
                idempotency_key,
            )
        except asyncpg.UniqueViolationError:
            raise RefusedError(f"replayed statement: nonce {nonce} has been used before") from None
        return entry


async def lock(conn: asyncpg.Connection) -> None:
    """Take the trail's append lock for the current transaction (serialises check-then-append)."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _APPEND_LOCK)


async def read_entries(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    kinds: tuple[str, ...] | None = None,
    after: int = 0,
    model: str | None = None,
    version: int | None = None,
    workflow_id: str | None = None,
    run_id: str | None = None,
    stage: str | None = None,
    limit: int | None = None,
) -> list[Entry]:
    """Entries in chain order, filtered (``stage``: the body's); ``after`` a ``seq`` and
    ``limit`` read one page of them (None: all)."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM audit_log
            WHERE seq > $1 AND ($2::text[] IS NULL OR kind = ANY($2))
              AND ($3::text IS NULL OR model = $3) AND ($4::int IS NULL OR version = $4)
              AND ($5::text IS NULL OR workflow_id = $5) AND ($6::text IS NULL OR run_id = $6)
              AND ($7::text IS NULL OR body::jsonb ->> 'stage' = $7)
            ORDER BY seq LIMIT $8""",
        after,
        list(kinds) if kinds else None,
        model,
        version,
        workflow_id,
        run_id,
        stage,
        limit,
    )
    return [_entry(r) for r in rows]


async def read_recent(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    limit: int,
    before: int | None = None,
    kinds: tuple[str, ...] | None = None,
    model: str | None = None,
    stage: str | None = None,
) -> list[Entry]:
    """The newest ``limit`` entries before ``before`` (a ``seq``; None: the head), newest
    first (``stage``: only those whose body names that stage)."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM audit_log
            WHERE ($1::bigint IS NULL OR seq < $1) AND ($2::text[] IS NULL OR kind = ANY($2))
              AND ($3::text IS NULL OR model = $3)
              AND ($4::text IS NULL OR body::jsonb ->> 'stage' = $4)
            ORDER BY seq DESC LIMIT $5""",
        before,
        list(kinds) if kinds else None,
        model,
        stage,
        limit,
    )
    return [_entry(r) for r in rows]


async def entry_pages(pool: asyncpg.Pool, *, batch: int = 500) -> AsyncIterator[list[Entry]]:
    """The whole trail in chain order, ``batch`` entries at a time (exports stream it without
    holding it; entries appended meanwhile come at the end, so what was read is always a
    prefix of the chain)."""
    after = 0
    while True:
        page = await read_entries(pool, after=after, limit=batch)
        if page:
            yield page
        if len(page) < batch:
            return
        after = page[-1].seq
