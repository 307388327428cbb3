"""Who is calling the API, and what the API lets them do.

API roles are coarse on purpose (read, act on runs, administer): what a principal may
*decide* is still checked where decisions are verified (governance roles and stage policies),
so a generous API role never widens who may approve.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from mlc.trust.governance import Governance


class Role(IntEnum):
    """Ordered: each role may do everything the ones below it may."""

    READ_ONLY = 1
    MEMBER = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


READ_ONLY_ROLE = "read-only"
"""The governance role that keeps a key principal to reads (``mlc user grant NAME read-only``)."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a governance principal's name and the API role it holds."""

    name: str
    role: Role
    method: str
    """How it authenticated: ``signature``, ``oidc`` or ``session``."""
    keyid: str | None = None
    """The key that signed the request (``signature`` only)."""


def role_of(governance: Governance, name: str) -> Role:
    """A key principal's API role from its governance roles: ``admin`` administers; a
    principal whose only role is ``read-only`` reads; everyone else registered acts."""
    roles = governance.principals[name].roles
    if "admin" in roles:
        return Role.ADMIN
    if roles == {READ_ONLY_ROLE}:
        return Role.READ_ONLY
    return Role.MEMBER
