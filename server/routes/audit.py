"""The audit trail: pages of entries, a snapshot's tests and decisions, streamed exports and
the server's own verification (``mlc audit show/export/verify``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from starlette.responses import StreamingResponse

from mlc.store import trail
from server import paging
from server.api import Call, Page, endpoint
from server.errors import ApiError
from server.principal import Role
from server.reads import audit
from server.routes.runs import model_ref


class SnapshotAuditPage(BaseModel):
    """Tests and decisions from one page of a snapshot's trail entries; ``next`` as in a Page."""

    tests: list[dict[str, Any]]
    decisions: list[dict[str, Any]]
    next: str | None = None


class ServerVerification(BaseModel):
    """The trail as the **server** verified it, against the server's trust root. A client that
    does not trust the server verifies the export itself (``mlc audit verify``)."""

    verified_by: str = "server"
    trust_root: str
    ok: bool
    entries: int
    signed: int
    evidence: int
    head: str
    problems: list[str]


@endpoint(
    "GET",
    "/v1/audit/entries",
    role=Role.READ_ONLY,
    response=Page[dict[str, Any]],
    params=("limit", "after"),
    summary="The trail's entries in chain order, as stored (body, envelope, hashes)",
)
async def list_entries(call: Call) -> Page[dict[str, Any]]:
    limit = call.limit()
    after = paging.decode(call.query("after"), int)
    rows = await trail.read_entries(call.ctx.pool, after=after[0] if after else 0, limit=limit + 1)
    return paging.cut([e.to_json() for e in rows], limit, lambda row: (row["seq"],))


@endpoint(
    "GET",
    "/v1/audit/export",
    role=Role.READ_ONLY,
    params=("format",),
    summary="The whole trail, streamed: format=json a verifiable bundle (`mlc audit export`), "
    "format=csv rows",
)
async def export(call: Call) -> StreamingResponse:
    fmt = call.query("format", "json")
    if fmt == "csv":
        return StreamingResponse(audit.export_csv(call.ctx.pool), media_type="text/csv; charset=utf-8")
    if fmt != "json":
        raise ApiError(422, f"format must be json or csv, not {fmt!r}", "invalid")
    settings = call.ctx.settings
    chunks = audit.export_json(
        call.ctx.pool, trust_root=settings.trust_root, author_role=settings.author_role
    )
    return StreamingResponse(chunks, media_type="application/json")


@endpoint(
    "GET",
    "/v1/audit/verify",
    role=Role.READ_ONLY,
    response=ServerVerification,
    summary="The server's own check of the chain and every signature, against its trust root "
    "(labelled verified_by=server; `mlc audit verify` checks the export client-side)",
)
async def verify(call: Call) -> ServerVerification:
    settings = call.ctx.settings
    if not settings.trust_root:
        raise ApiError(
            503, "the server has no trust root (MLC_TRUST_ROOT) to verify against", "no-trust-root"
        )
    found = await audit.verify(
        call.ctx.pool, trust_root=settings.trust_root, author_role=settings.author_role
    )
    return ServerVerification(trust_root=settings.trust_root, **found.summary())


@endpoint(
    "GET",
    "/v1/audit/{model}/{version}",
    role=Role.READ_ONLY,
    response=SnapshotAuditPage,
    params=("limit", "after"),
    summary="A snapshot's test results and gate decisions, a page of trail entries at a time "
    "(`mlc audit show`)",
)
async def snapshot_audit(call: Call) -> SnapshotAuditPage:
    ref = model_ref(call)
    limit = call.limit()
    after = paging.decode(call.query("after"), int)
    found = await audit.snapshot_audit(
        call.ctx.pool, ref.model, ref.version, after=after[0] if after else 0, limit=limit
    )
    cursor = paging.encode((found.last,)) if found.more else None
    return SnapshotAuditPage(tests=found.tests, decisions=found.decisions, next=cursor)
