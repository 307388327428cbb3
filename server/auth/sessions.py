"""Browser sessions (design §3.3): the ``mlc_session`` cookie the web page is read with.

A signed ``POST /v1/web-sessions`` (``mlc login --web``) returns a single-use link valid
60 s; following it sets the cookie (32 random bytes, HttpOnly, SameSite=Strict, Secure
unless the server is plain http on a loopback address) for 8 hours. The database keeps
only sha-256 hashes of the link and the cookie. A session stands for the principal and API
role of the request that made it; a session cannot make another one, so a stolen cookie
dies with its session, and one made with a key ends when its owner's keys are revoked.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from datetime import datetime
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from mlc.store import web_sessions
from server.context import ServerContext
from server.errors import ApiError, unauthenticated
from server.principal import Principal, Role, role_of

COOKIE = "mlc_session"
COOKIE_BYTES = 32
LINK_PATH = "/session/"
"""Where a link points: ``{public_url}/session/{token}``."""
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _well_formed(token: str | None) -> bool:
    """A token we could have made (43 base64url characters), checked before any query."""
    return token is not None and len(token) == 43 and set(token) <= _TOKEN_CHARS


def secure_cookie(public_url: str) -> bool:
    """Secure unless the server is reached over plain http on a loopback address, where
    browsers would otherwise drop the cookie (``mlc dev``'s ``http://127.0.0.1:8280``)."""
    parts = urlsplit(public_url)
    if parts.scheme != "http":
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


async def create_link(ctx: ServerContext, principal: Principal) -> tuple[str, datetime]:
    """A single-use link that opens a session for ``principal``; and when it expires.

    Raises:
        ApiError: 403 when ``principal`` came by a session cookie (a session makes no other).
    """
    if principal.method == "session":
        raise ApiError(
            403,
            "a browser session cannot open another one: run `mlc login --web` with your key",
            reason="session-from-session",
        )
    token = secrets.token_urlsafe(COOKIE_BYTES)
    expires = await web_sessions.create_link(
        ctx.pool,
        link_hash=_hash(token),
        principal=principal.name,
        role=int(principal.role),
        made_by=principal.method,
    )
    return ctx.config.public_url.rstrip("/") + LINK_PATH + token, expires


async def redeem_link(ctx: ServerContext, link_token: str, response: Response) -> Principal | None:
    """Use a link once: set the session cookie on ``response`` and return who it is for;
    None when the link is malformed, unknown, used or expired."""
    if not _well_formed(link_token):
        return None
    cookie = secrets.token_urlsafe(COOKIE_BYTES)
    found = await web_sessions.redeem_link(ctx.pool, link_hash=_hash(link_token), token_hash=_hash(cookie))
    if found is None:
        return None
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=int(web_sessions.SESSION_LIFETIME.total_seconds()),
        path="/",
        secure=secure_cookie(ctx.config.public_url),
        httponly=True,
        samesite="strict",
    )
    return Principal(name=found.principal, role=Role(found.role), method="session")


async def authenticate(request: Request, ctx: ServerContext) -> Principal:
    """The principal of the request's live session cookie.

    Raises:
        ApiError: 401 ``no-session`` (none, malformed, unknown or expired).
    """
    token = request.cookies.get(COOKIE)
    if not _well_formed(token):
        raise unauthenticated("no-session", "no browser session: run `mlc login --web` and open its link")
    assert token is not None
    found = await web_sessions.read_session(ctx.pool, _hash(token))
    if found is None:
        raise unauthenticated(
            "no-session", "the browser session expired or is unknown: run `mlc login --web` again"
        )
    role = Role(found.role)
    if found.made_by == "signature":
        # Made with a key: it ends when its owner has no active key left (revoked within
        # a second), and its role follows the owner's governance roles as they are now.
        state = await ctx.governance()
        who = state.principals.get(found.principal)
        if who is None or not who.active_keys():
            raise unauthenticated(
                "revoked-key", f"{found.principal} has no active key any more: the session ended"
            )
        role = min(role, role_of(state, found.principal))
    return Principal(name=found.principal, role=role, method="session")
