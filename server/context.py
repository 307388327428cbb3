"""What every request handler shares: the owner pool, the verified governance state and
Temporal clients, opened once per server process."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol

from mlc.store.governance import GovernanceCache
from mlc.trust.governance import Governance
from server.config import ServerConfig
from server.limits import RateLimits
from workers.client import connect as connect_temporal

if TYPE_CHECKING:
    import asyncpg
    from temporalio.client import Client

    from mlc.config import Settings
    from server.principal import Principal

GOVERNANCE_REFRESH_SECONDS = 1.0
"""How stale the governance state may be: a revoked key stops working within this."""
_IDENTITY_CLIENTS = 32
"""Temporal clients kept per acting principal (the identity is per connection, not per call)."""


class TokenVerifier(Protocol):
    """Checks bearer tokens (``server/auth/oidc.py``'s ``OidcVerifier``)."""

    async def authenticate(self, token: str) -> Principal: ...


class ServerContext:
    """The server's shared resources; handlers reach them as ``call.ctx``."""

    def __init__(
        self, config: ServerConfig, pool: asyncpg.Pool, *, oidc: TokenVerifier | None = None
    ) -> None:
        self.config = config
        self.pool = pool
        self.oidc = oidc
        """Checks bearer tokens; None when no identity provider is configured."""
        self.limits = RateLimits()
        """Request rates per principal and failed authentications per address, this process only."""
        self._governance = GovernanceCache(
            pinned_root=config.settings.trust_root, author_role=config.settings.author_role
        )
        self._governance_at = -GOVERNANCE_REFRESH_SECONDS
        self._shared: Client | None = None
        self._as: OrderedDict[str, Client] = OrderedDict()
        self._connect = asyncio.Lock()

    @property
    def settings(self) -> Settings:
        return self.config.settings

    async def governance(self) -> Governance:
        """The verified governance state, at most a second old (stamped when the read began:
        a revocation committed while it ran is seen by the next refresh within the second)."""
        started = time.monotonic()
        if started - self._governance_at >= GOVERNANCE_REFRESH_SECONDS:
            state = await self._governance.current(self.pool)
            self._governance_at = started
            return state
        return self._governance.state

    async def temporal(self) -> Client:
        """The shared client for queries and updates (the acting principal is in the payload)."""
        async with self._connect:
            if self._shared is None:
                self._shared = await connect_temporal(self.settings, identity="mlc-server")
            return self._shared

    async def temporal_as(self, name: str) -> Client:
        """A client whose identity is ``name``: a lifecycle's starter is read from Temporal's
        caller identity (segregation of duties), which a client sets per connection."""
        async with self._connect:
            if name in self._as:
                self._as.move_to_end(name)
                return self._as[name]
            client = await connect_temporal(self.settings, identity=name)
            self._as[name] = client
            if len(self._as) > _IDENTITY_CLIENTS:
                self._as.popitem(last=False)
            return client
