"""The audit trail's page (``/audit``): whether the chain verifies, and its newest entries.

The verdict is this server's own check (``mlc.trust.audit.verify_entries`` against the
server's trust root), labelled so: an auditor who trusts neither the server nor the
database runs ``mlc audit verify`` over an export with their own ``--trust-root``. The
check runs on every view (a row changed in the middle leaves the head as it was, so no
verdict is reused), off the event loop.
"""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import Response

from mlc.store import trail
from server.context import ServerContext
from server.principal import Principal
from server.reads import audit as reads
from server.web.common import PAGE_SIZE, View, int_param, page, render


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


async def build(ctx: ServerContext, *, before: int | None) -> AuditView:
    """The verdict and up to :data:`PAGE_SIZE` entries before ``before``, newest first."""
    settings = ctx.settings
    checked_at = datetime.now(UTC)
    result = await reads.verify(
        ctx.pool, trust_root=settings.trust_root or "", author_role=settings.author_role
    )
    recent = await trail.read_recent(ctx.pool, limit=PAGE_SIZE, before=before)
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
        checked_at=checked_at,
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
    view = await build(ctx, before=int_param(request, "before"))
    return render(request, "audit.html", principal, view=view)
