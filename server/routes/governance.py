"""Governance statements through the API: keys, roles, policies, runtimes and their keys.

The server forwards what an admin signed to the same verification the direct CLI uses
(:mod:`server.operations.governance`); it can refuse or delay a statement, never forge one.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from mlc.statements import Envelope
from mlc.store import governance as stored
from mlc.trust import governance as actions
from server.api import Call, endpoint
from server.errors import ApiError
from server.operations import governance
from server.principal import Role
from server.signed import check_signer

ACTIONS = (
    actions.KEY_ADD,
    actions.KEY_REVOKE,
    actions.ROLE_GRANT,
    actions.ROLE_REVOKE,
    actions.POLICY_SET,
    actions.RUNTIME_ADD,
    actions.RUNTIME_REMOVE,
    actions.RUNTIME_KEY_ADD,
    actions.RUNTIME_KEY_REVOKE,
)
"""What this route records. ``init`` stays on the server's host (over HTTP the first caller
would own the installation); registrations and uploads have routes that check their content."""


class GovernanceRequest(BaseModel):
    envelope: Envelope


class GovernanceResult(BaseModel):
    """The statement as recorded, and the roles its principal holds now (if it names one)."""

    action: str
    signer: str
    args: dict[str, Any]
    roles: list[str] | None = None


@endpoint(
    "POST",
    "/v1/governance",
    role=Role.MEMBER,
    body=GovernanceRequest,
    response=GovernanceResult,
    summary="Record a signed governance statement (`mlc key/user/policy/runtime ...`); "
    "admin, except revoking one's own key",
)
async def submit_statement(call: Call) -> GovernanceResult:
    envelope = call.body.envelope
    signer = await check_signer(call, envelope)
    claim = governance.claim(envelope)
    action = claim.action
    if action not in ACTIONS:
        raise ApiError(422, f"{action} statements cannot be sent here ({_where(action)})", "invalid")
    own_key = action == actions.KEY_REVOKE and claim.args.get("principal") == signer
    if call.principal.role < Role.ADMIN and not own_key:
        raise ApiError(
            403, f"{call.principal.name} is {call.principal.role.label}; {action} needs admin", "role"
        )
    verified = await governance.submit(call.ctx.pool, call.ctx.settings, envelope)
    roles = None
    named = verified.args.get("principal")
    if verified.action in (actions.ROLE_GRANT, actions.ROLE_REVOKE) and isinstance(named, str):
        state = await stored.load(
            call.ctx.pool, pinned_root=call.ctx.settings.trust_root, author_role=call.ctx.settings.author_role
        )
        roles = sorted(state.roles_of(named))
    return GovernanceResult(action=verified.action, signer=verified.signer, args=verified.args, roles=roles)


def _where(action: str) -> str:
    if action == actions.INIT:
        return "`mlc admin init` runs on the server's host, with the owner DSN"
    if action == actions.SNAPSHOT_REGISTER:
        return "use POST /v1/snapshots"
    if action == actions.LIFECYCLE_UPLOAD:
        return "use POST /v1/lifecycles"
    return "unknown action"
