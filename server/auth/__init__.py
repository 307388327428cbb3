"""Who sent a request: a signature by a registered key, an OIDC token, or a page session.

A token or a session authenticates the caller; it never replaces the signature on a decision
or a governance statement, which are verified where they always were.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.auth.signatures import verify_request
from server.errors import unauthenticated

if TYPE_CHECKING:
    from starlette.requests import Request

    from server.context import ServerContext
    from server.principal import Principal


def target_uri(request: Request, ctx: ServerContext) -> str:
    """The URL the client signed: our public URL and the raw path and query as received."""
    path = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string") or b""
    return ctx.config.public_url + path.decode("latin-1") + (f"?{query.decode('latin-1')}" if query else "")


async def authenticate(request: Request, ctx: ServerContext, body: bytes | None) -> Principal:
    """The caller, or a 401 with the reason (``body=None``: an upload checked while streamed)."""
    if "signature-input" in request.headers:
        return await verify_request(
            method=request.method,
            target_uri=target_uri(request, ctx),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]],
            body=body,
            governance=await ctx.governance(),
            pool=ctx.pool,
        )
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        if ctx.oidc is None:
            raise unauthenticated(
                "bad-token", "this server accepts no bearer tokens (no MLC_OIDC_ISSUER): sign the request"
            )
        return await ctx.oidc.authenticate(token.strip())
    raise unauthenticated(
        "no-credentials", "sign the request with your mlc key (the CLI does) or send an OIDC bearer token"
    )
