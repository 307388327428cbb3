"""Submitting a signed governance statement, with the effect its verified action has.

The effect on the inventory (a runtime row written or deleted) is chosen by the action of
the predicate that verified, never by anything else a request says, so a statement can
only ever do what it says and its signer may do.
"""

from __future__ import annotations

import asyncpg
from pydantic import ValidationError

from mlc.config import Settings
from mlc.domain import Runtime
from mlc.errors import RefusedError
from mlc.statements import Envelope, GovernancePredicate
from mlc.store import governance, runtimes
from mlc.trust import governance as actions
from mlc.trust.governance import Governance


async def submit(
    pool: asyncpg.Pool, settings: Settings, envelope: Envelope, *, keep_runtime_row: bool = False
) -> GovernancePredicate:
    """Verify ``envelope`` against the current state, record it and apply its effect, in one
    transaction (nothing is recorded when any part is refused).

    ``keep_runtime_row``: a ``runtime.remove`` leaves the row for the ``runtime.add`` that
    replaces it (``mlc runtime add --replace`` on the direct path).

    Raises:
        RefusedError: the statement does not verify or its signer lacks the role.
        ConflictError: a runtime to remove still has live deployments.
    """

    async def effect(conn: asyncpg.Connection, verified: GovernancePredicate) -> None:
        if verified.action == actions.RUNTIME_ADD:
            runtime = Runtime.model_validate(verified.args["runtime"])
            await runtimes.create_runtime(conn, runtime, replace=True)
        elif verified.action == actions.RUNTIME_REMOVE and not keep_runtime_row:
            await runtimes.delete_runtime(conn, str(verified.args["name"]))

    return await governance.submit(
        pool, envelope, pinned_root=settings.trust_root, author_role=settings.author_role, then=effect
    )


def claim(envelope: Envelope, action: str | None = None) -> GovernancePredicate:
    """The governance predicate ``envelope`` carries, by structure only (it is verified when
    submitted): what routes read to pick their checks before anything is recorded.

    Raises:
        RefusedError: not a governance statement (for ``action``, when given).
    """
    try:
        predicate = GovernancePredicate.model_validate(envelope.statement().predicate)
    except (ValueError, ValidationError) as exc:
        raise RefusedError(f"not a governance statement: {exc}") from None
    if action is not None and predicate.action != action:
        raise RefusedError(f"expected a {action} statement, not {predicate.action}")
    return predicate


def signer_of(state: Governance, envelope: Envelope) -> str:
    """The principal whose registered key signed ``envelope`` (the signature is checked where
    the statement is verified; this only names whose key id it carries).

    Raises:
        RefusedError: no signature, or a key id no principal holds.
    """
    for signature in envelope.signatures:
        for principal in state.principals.values():
            if signature.keyid in principal.keys:
                return principal.name
    raise RefusedError("the statement is not signed by a registered key")
