"""A signed statement sent through the API must be the caller's own.

Authenticating a request proves who sent it; the statement inside proves who decided.
They must be the same principal: otherwise a caller could relay someone else's captured
(still valid) statement under their own session and the trail would credit the signer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.errors import ApiError
from server.operations.governance import signer_of

if TYPE_CHECKING:
    from mlc.statements import Envelope
    from server.api import Call


async def check_signer(call: Call, envelope: Envelope) -> str:
    """The statement's signer, refused (403) unless it is the authenticated principal."""
    signer = signer_of(await call.ctx.governance(), envelope)
    if signer != call.principal.name:
        raise ApiError(
            403,
            f"the statement is signed by {signer}'s key, but the request comes from {call.principal.name}: "
            "send statements signed with your own key",
            "foreign-statement",
        )
    return signer
