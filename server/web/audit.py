"""The audit trail's page (``/audit``): whether the chain verifies, and its newest entries.

The verdict is this server's own check (``mlc.trust.audit.verify_entries`` against the
server's trust root), labelled so: an auditor who trusts neither the server nor the
database runs ``mlc audit verify`` over an export with their own ``--trust-root``. The
check reads the trail in bounded batches and runs once per new head (cached on the app).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import Response

from mlc.store import trail
from mlc.trust import audit as verification
from server.context import ServerContext
from server.principal import Principal
from server.web.common import PAGE_SIZE, View, int_param, page, render

BATCH = 1000
"""Entries read per query while verifying."""


class EntryRow(View):
    """One trail entry as listed."""

    seq: int
    kind: str
    subject: str
    signed: bool
    hash: str


class AuditView(View):
    """The server's verdict on the trail and a page of its newest entries."""

    ok: bool
    entries: int
    signed: int
    evidence: int
    head: str
    problem: str | None
    trust_root: str | None
    checked_at: datetime
    recent: tuple[EntryRow, ...]
    next: int | None


@dataclass(frozen=True)
class _Checked:
    seq: int
    head: str
    result: verification.Verification
    at: datetime


async def _verify(ctx: ServerContext, cache: dict[str, _Checked]) -> _Checked:
    """The verdict for the trail as it is now: reused while the head is unchanged."""
    last = await trail.read_recent(ctx.pool, limit=1)
    seq, head = (last[0].seq, last[0].hash) if last else (0, trail.GENESIS)
    known = cache.get("trail")
    if known is not None and (known.seq, known.head) == (seq, head):
        return known
    entries: list[trail.Entry] = []
    while True:
        batch = await trail.read_entries(ctx.pool, after=entries[-1].seq if entries else 0, limit=BATCH)
        entries.extend(batch)
        if len(batch) < BATCH:
            break
    settings = ctx.settings
    result = await asyncio.to_thread(
        verification.verify_entries, entries, trust_root=settings.trust_root, author_role=settings.author_role
    )
    checked = _Checked(seq=seq, head=head, result=result, at=datetime.now(UTC))
    cache["trail"] = checked
    return checked


async def build(ctx: ServerContext, cache: dict[str, _Checked], *, before: int | None) -> AuditView:
    """The verdict and up to :data:`PAGE_SIZE` entries before ``before``, newest first."""
    checked = await _verify(ctx, cache)
    recent = await trail.read_recent(ctx.pool, limit=PAGE_SIZE, before=before)
    result = checked.result
    return AuditView(
        ok=result.ok and ctx.settings.trust_root is not None,
        entries=result.entries,
        signed=result.signed,
        evidence=result.evidence,
        head=result.head,
        problem=(result.problems[0] if result.problems else None)
        if ctx.settings.trust_root is not None
        else "the server has no trust root (MLC_TRUST_ROOT): nothing can be verified against it",
        trust_root=ctx.settings.trust_root,
        checked_at=checked.at,
        recent=tuple(
            EntryRow(
                seq=e.seq,
                kind=e.kind,
                subject=f"{e.model}@{e.version}" if e.model and e.version else (e.model or ""),
                signed=e.envelope is not None,
                hash=e.hash,
            )
            for e in recent
        ),
        next=recent[-1].seq if len(recent) == PAGE_SIZE else None,
    )


@page
async def audit(request: Request, ctx: ServerContext, principal: Principal) -> Response:
    """``GET /audit[?before=SEQ]``: the server's verdict on the trail and its newest entries."""
    cache: dict[str, _Checked] | None = getattr(request.app.state, "web_audit", None)
    if cache is None:
        cache = request.app.state.web_audit = {}
    view = await build(ctx, cache, before=int_param(request, "before"))
    return render(request, "audit.html", principal, view=view)
