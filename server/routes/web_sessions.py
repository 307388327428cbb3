"""``POST /v1/web-sessions``: a single-use link into the web page (``mlc login --web``)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from server.api import Call, endpoint
from server.auth import sessions
from server.principal import Role


class WebSessionLink(BaseModel):
    """Open ``url`` in a browser within a minute; it works once and sets an 8-hour session."""

    url: str
    expires_at: datetime
    principal: str
    role: str


@endpoint(
    "POST",
    "/v1/web-sessions",
    role=Role.READ_ONLY,
    response=WebSessionLink,
    summary="A single-use link (60 s) that opens an 8-hour browser session for the caller",
)
async def create_web_session(call: Call) -> WebSessionLink:
    url, expires = await sessions.create_link(call.ctx, call.principal)
    return WebSessionLink(
        url=url, expires_at=expires, principal=call.principal.name, role=call.principal.role.label
    )
