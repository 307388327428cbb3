"""The audit trail as ``mlc audit`` reads it: a snapshot's tests and decisions, exports
streamed a batch at a time, and the trail's verification."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlc.store import audit, trail
from mlc.trust import audit as verification
from mlc.trust.governance import Governance

if TYPE_CHECKING:
    import asyncpg

EXPORT_BATCH = 500
"""Trail entries read per query while exporting."""


@dataclass
class SnapshotAudit:
    """A snapshot's test results and gate decisions (``mlc audit show``); ``last`` is the
    ``seq`` of the last entry read."""

    tests: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    last: int = 0
    more: bool = False
    """More of its entries follow ``last``."""


async def snapshot_audit(
    pool: asyncpg.Pool, model: str, version: int, *, after: int = 0, limit: int | None = None
) -> SnapshotAudit:
    """Test results and decisions of ``model@version`` from the ``limit`` trail entries of
    theirs past ``after``, oldest first."""
    entries = await trail.read_entries(
        pool,
        kinds=(trail.TEST_REPORT, trail.DECISION),
        model=model,
        version=version,
        after=after,
        limit=None if limit is None else limit + 1,
    )
    more = limit is not None and len(entries) > limit
    entries = entries[:limit] if more else entries
    found = SnapshotAudit(last=entries[-1].seq if entries else after, more=more)
    for entry in entries:
        if entry.kind == trail.DECISION:
            found.decisions.append(audit.decision_row(entry))
        else:
            found.tests.extend(audit.test_rows(entry))
    return found


async def export_json(pool: asyncpg.Pool, *, trust_root: str | None, author_role: str) -> AsyncIterator[str]:
    """The verifiable bundle (``mlc audit export``) as JSON text, a batch of entries at a
    time: the keys an auditor needs come after the entries, learnt from them on the way."""
    yield "{\n"
    for name, value in verification.bundle_header(trust_root=trust_root, author_role=author_role).items():
        yield f"  {json.dumps(name)}: {json.dumps(value)},\n"
    yield '  "entries": ['
    state = Governance(pinned_root=trust_root, author_role=author_role)
    last, separator = None, "\n    "
    async for page in trail.entry_pages(pool, batch=EXPORT_BATCH):
        chunk = []
        for entry in page:
            chunk.append(separator + json.dumps(entry.to_json()))
            separator = ",\n    "
            verification.learn_keys(state, entry)
        last = page[-1]
        yield "".join(chunk)
    yield "\n  ],\n"
    tail = verification.bundle_keys(state, last)
    yield ",\n".join(f"  {json.dumps(name)}: {json.dumps(value)}" for name, value in tail.items()) + "\n}\n"


async def export_csv(pool: asyncpg.Pool) -> AsyncIterator[str]:
    """The trail as CSV, one row per entry, a batch at a time."""
    header = True
    async for page in trail.entry_pages(pool, batch=EXPORT_BATCH):
        yield verification.to_csv(page, header=header)
        header = False
    if header:
        yield verification.to_csv([])


async def verify(pool: asyncpg.Pool, *, trust_root: str, author_role: str) -> verification.Verification:
    """The whole trail's chain and signatures checked against ``trust_root``, every time (a
    row changed in the middle leaves the head as it was, so no verdict is reused); the
    checking runs off the event loop, which keeps serving meanwhile."""
    entries = [entry async for page in trail.entry_pages(pool) for entry in page]
    return await asyncio.to_thread(
        verification.verify_entries, entries, trust_root=trust_root, author_role=author_role
    )
