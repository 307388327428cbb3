"""The OIDC settings of ``mlc server`` (``MLC_OIDC_*``), read once at start.

Apart from the verifier (``server/auth/oidc.py``) so the server's configuration can name
them without importing the authentication code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from mlc.errors import MLCError
from server.principal import Role

ROLE_NAMES = {"read-only": Role.READ_ONLY, "member": Role.MEMBER, "admin": Role.ADMIN}
"""The API roles a group can map to, by the names ``MLC_OIDC_ROLE_MAP`` uses."""
DEFAULT_ROLE_MAP = "mlc-readers=read-only,mlc-approvers=member,mlc-admins=admin"
DEFAULT_JWKS_COOLDOWN = 30.0
"""Seconds after a successful key fetch during which an unknown ``kid`` does not refetch."""


class OidcSetupError(MLCError):
    """The OIDC settings or the provider's discovery document are unusable; the message says which."""


def parse_role_map(text: str) -> tuple[tuple[str, Role], ...]:
    """``group=role,...`` as pairs, refusing unknown roles and malformed entries by name."""
    pairs: list[tuple[str, Role]] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        group, sep, role = (s.strip() for s in entry.partition("="))
        if not sep or not group or role not in ROLE_NAMES:
            raise OidcSetupError(
                f"MLC_OIDC_ROLE_MAP: entry {entry!r} is not group=role with role one of "
                f"{', '.join(ROLE_NAMES)}"
            )
        pairs.append((group, ROLE_NAMES[role]))
    if not pairs:
        raise OidcSetupError("MLC_OIDC_ROLE_MAP maps no group: nobody could sign in with a token")
    return tuple(pairs)


@dataclass(frozen=True)
class OidcConfig:
    """Which provider's tokens are accepted and how their claims become principals."""

    issuer: str
    """The provider's issuer URL, compared exactly with discovery and every token's ``iss``."""
    audience: str
    """Our client id: the ``aud`` every accepted token carries."""
    principal_claim: str = "preferred_username"
    """The claim holding the principal name (a governance principal, the Temporal starter)."""
    roles_claim: str = "groups"
    """The claim holding the caller's groups, mapped through ``role_map``."""
    role_map: tuple[tuple[str, Role], ...] = field(default_factory=lambda: parse_role_map(DEFAULT_ROLE_MAP))
    """Group → API role; the highest mapped group wins, no mapped group is refused (403)."""
    jwks_cooldown: float = DEFAULT_JWKS_COOLDOWN
    client_secret: str | None = field(default=None, repr=False)
    """Our secret as the provider's confidential client (``MLC_OIDC_CLIENT_SECRET``): set,
    the web page offers ``/login`` through the provider; never logged or shown."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OidcConfig | None:
        """The ``MLC_OIDC_*`` settings, or None when ``MLC_OIDC_ISSUER`` is unset (tokens refused)."""
        env = os.environ if env is None else env
        issuer = env.get("MLC_OIDC_ISSUER", "").strip()
        if not issuer:
            return None
        audience = env.get("MLC_OIDC_AUDIENCE", "").strip()
        if not audience:
            raise OidcSetupError("MLC_OIDC_ISSUER is set but MLC_OIDC_AUDIENCE (our client id) is not")
        cooldown_text = env.get("MLC_OIDC_JWKS_COOLDOWN", str(DEFAULT_JWKS_COOLDOWN))
        try:
            cooldown = float(cooldown_text)
        except ValueError:
            cooldown = -1.0
        if not 0 <= cooldown <= 3600:
            raise OidcSetupError(f"MLC_OIDC_JWKS_COOLDOWN={cooldown_text!r}: give seconds between 0 and 3600")
        return cls(
            issuer=issuer,
            audience=audience,
            principal_claim=env.get("MLC_OIDC_PRINCIPAL_CLAIM", "").strip() or "preferred_username",
            roles_claim=env.get("MLC_OIDC_ROLES_CLAIM", "").strip() or "groups",
            role_map=parse_role_map(env.get("MLC_OIDC_ROLE_MAP", DEFAULT_ROLE_MAP)),
            jwks_cooldown=cooldown,
            client_secret=env.get("MLC_OIDC_CLIENT_SECRET") or None,
        )
