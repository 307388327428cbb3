"""``GET /v1/me``: who the server thinks you are (the CLI's ``whoami``)."""

from __future__ import annotations

from pydantic import BaseModel

from server.api import Call, endpoint
from server.principal import Role


class Me(BaseModel):
    name: str
    role: str
    method: str
    keyid: str | None = None
    governance_roles: list[str]


@endpoint("GET", "/v1/me", role=Role.READ_ONLY, response=Me, summary="The authenticated principal")
async def me(call: Call) -> Me:
    governance = await call.ctx.governance()
    known = governance.principals.get(call.principal.name)
    return Me(
        name=call.principal.name,
        role=call.principal.role.label,
        method=call.principal.method,
        keyid=call.principal.keyid,
        governance_roles=sorted(known.roles) if known else [],
    )
