"""OIDC bearer tokens: an ID token of the installation's identity provider names the caller.

Design §3.2. The token's signature is checked against the provider's published keys
(``PyJWKClient``: cached for five minutes, one forced refetch for an unknown ``kid`` unless a
fetch succeeded within the cooldown, so a rotated key is picked up without a restart while
random kids cannot hammer the provider). Claims map to a principal name and an API role;
a token never replaces a statement's signature.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import httpx
import jwt
from jwt import PyJWK, PyJWKClient, PyJWKClientConnectionError, PyJWKClientError

from server.errors import ApiError, unauthenticated
from server.oidc_config import OidcConfig, OidcSetupError
from server.principal import Principal

JWKS_LIFESPAN = 300.0
"""Seconds the provider's key set is cached before it is fetched again."""
LEEWAY = 30
"""Seconds of clock difference with the provider tolerated on ``exp``/``iat``/``nbf``."""
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub"]
MAX_TOKEN_CHARS = 16_384
"""Longer bearer values are refused before any parsing (ID tokens are ~1 KiB)."""
MAX_PRINCIPAL_CHARS = 128
DISCOVERY_ATTEMPTS = 10
DISCOVERY_DELAY = 1.0
"""Seconds between discovery attempts: the provider may start together with the server."""
DISCOVERY_TIMEOUT = 10.0


@dataclass(frozen=True)
class Discovery:
    """What we use of the provider's ``/.well-known/openid-configuration``."""

    jwks_uri: str
    algorithms: tuple[str, ...]
    """Its ID token signing algorithms minus ``none`` and HMAC (a shared secret is no proof)."""
    authorization_endpoint: str | None = None
    """Where a browser signs in (``/login``); None: the provider offers no browser sign-in."""
    token_endpoint: str | None = None
    """Where ``/login/callback`` exchanges the code for an ID token."""


def _usable_algorithms(document: Mapping[str, Any]) -> tuple[str, ...]:
    offered = document.get("id_token_signing_alg_values_supported") or ["RS256"]
    if not isinstance(offered, list):
        raise OidcSetupError("discovery: id_token_signing_alg_values_supported is not a list")
    known = set(jwt.algorithms.get_default_algorithms())
    usable = tuple(
        a for a in offered if isinstance(a, str) and a in known and a != "none" and not a.startswith("HS")
    )
    if not usable:
        raise OidcSetupError(f"discovery: no asymmetric ID token algorithm we can check among {offered}")
    return usable


def parse_discovery(config: OidcConfig, document: Any) -> Discovery:
    """The discovery document's parts we need, refusing one that is not the configured issuer's."""
    if not isinstance(document, dict):
        raise OidcSetupError("discovery: the provider's openid-configuration is not a JSON object")
    if document.get("issuer") != config.issuer:
        raise OidcSetupError(
            f"discovery: the provider calls itself {document.get('issuer')!r}, not MLC_OIDC_ISSUER="
            f"{config.issuer!r} (they must be equal, character for character)"
        )
    jwks_uri = document.get("jwks_uri")
    if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
        raise OidcSetupError(f"discovery: jwks_uri {jwks_uri!r} is not an http(s) URL")
    endpoints = {name: document.get(name) for name in ("authorization_endpoint", "token_endpoint")}
    for name, url in endpoints.items():
        if url is not None and not (isinstance(url, str) and url.startswith(("https://", "http://"))):
            raise OidcSetupError(f"discovery: {name} {url!r} is not an http(s) URL")
    return Discovery(
        jwks_uri=jwks_uri,
        algorithms=_usable_algorithms(document),
        authorization_endpoint=endpoints["authorization_endpoint"],
        token_endpoint=endpoints["token_endpoint"],
    )


async def discover(config: OidcConfig, *, attempts: int = DISCOVERY_ATTEMPTS) -> Discovery:
    """Fetch and check the provider's discovery document, retrying while it is unreachable."""
    url = config.issuer.rstrip("/") + "/.well-known/openid-configuration"
    problem = ""
    async with httpx.AsyncClient(timeout=DISCOVERY_TIMEOUT, follow_redirects=False) as client:
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(DISCOVERY_DELAY)
            try:
                response = await client.get(url)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code != 200:
                problem = f"HTTP {response.status_code}"
                continue
            try:
                document = response.json()
            except ValueError:
                raise OidcSetupError(f"discovery: {url} did not return JSON") from None
            return parse_discovery(config, document)
    raise OidcSetupError(f"discovery: {url} unreachable after {attempts} attempts ({problem})")


class OidcVerifier:
    """Checks bearer tokens against one provider and turns their claims into principals."""

    def __init__(self, config: OidcConfig, discovery: Discovery) -> None:
        self.config = config
        self.discovery = discovery
        self._jwks = PyJWKClient(
            discovery.jwks_uri,
            lifespan=JWKS_LIFESPAN,
            cooldown_duration=config.jwks_cooldown,
            timeout=DISCOVERY_TIMEOUT,
        )

    @classmethod
    async def start(cls, config: OidcConfig, *, attempts: int = DISCOVERY_ATTEMPTS) -> OidcVerifier:
        """A verifier for ``config``'s provider, after its discovery (at server start)."""
        return cls(config, await discover(config, attempts=attempts))

    async def authenticate(self, token: str) -> Principal:
        """The principal ``token`` names, or an ApiError: 401 with a reason, 403 without a role."""
        claims = await anyio.to_thread.run_sync(self.verify, token)
        return self.principal(claims)

    def verify(self, token: str) -> dict[str, Any]:
        """The verified claims of ``token`` (blocking: the key fetch is synchronous urllib)."""
        if len(token) > MAX_TOKEN_CHARS:
            raise unauthenticated(
                "bad-token", f"the bearer token is longer than {MAX_TOKEN_CHARS} characters"
            )
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise unauthenticated("bad-token", "the bearer token is not a well-formed JWT") from None
        if header.get("alg") not in self.discovery.algorithms:
            raise unauthenticated(
                "bad-token",
                f"the bearer token's algorithm {header.get('alg')!r} is not one of "
                f"{', '.join(self.discovery.algorithms)}",
            )
        # Checked before the key lookup: another provider's token names a kid we will never
        # know, and "wrong issuer" is the useful answer for it.
        if unverified.get("iss") != self.config.issuer:
            raise unauthenticated(
                "wrong-issuer", f"the bearer token was not issued by {self.config.issuer} (MLC_OIDC_ISSUER)"
            )
        key = self._signing_key(header.get("kid"))
        try:
            return jwt.decode(
                token,
                key,
                algorithms=list(self.discovery.algorithms),
                audience=self.config.audience,
                issuer=self.config.issuer,
                options={"require": REQUIRED_CLAIMS},
                leeway=LEEWAY,
            )
        except jwt.ExpiredSignatureError:
            raise unauthenticated("expired-token", "the bearer token has expired: get a new one") from None
        except jwt.InvalidAudienceError:
            raise unauthenticated(
                "wrong-audience",
                f"the bearer token is not meant for this server (audience {self.config.audience})",
            ) from None
        except jwt.InvalidIssuerError:
            raise unauthenticated(
                "wrong-issuer", f"the bearer token was not issued by {self.config.issuer}"
            ) from None
        except jwt.PyJWTError as exc:
            raise unauthenticated("bad-token", f"the bearer token was refused: {exc}") from None

    def _signing_key(self, kid: Any) -> PyJWK:
        try:
            if kid is None:
                return self._only_key()
            if not isinstance(kid, str):
                raise unauthenticated("bad-token", "the bearer token's kid is not a string")
            return self._jwks.get_signing_key(kid)
        except PyJWKClientConnectionError:
            raise ApiError(
                503, "the identity provider's keys cannot be fetched right now; try again shortly", None
            ) from None
        except PyJWKClientError:
            raise unauthenticated(
                "unknown-kid", "the bearer token is signed with a key the identity provider does not publish"
            ) from None

    def _only_key(self) -> PyJWK:
        """A kid-less token is checked against the provider's only signing key (OIDC Core 10.1);
        with several keys we cannot tell which one was meant and refuse."""
        keys = [k for k in self._jwks.get_jwk_set().keys if k.public_key_use in ("sig", None)]
        if len(keys) != 1:
            raise unauthenticated(
                "unknown-kid", f"the bearer token names no key (kid) and the provider publishes {len(keys)}"
            )
        return keys[0]

    def principal(self, claims: Mapping[str, Any]) -> Principal:
        """The principal of verified ``claims``: its name claim and its highest mapped group."""
        name = claims.get(self.config.principal_claim)
        if (
            not isinstance(name, str)
            or not name
            or len(name) > MAX_PRINCIPAL_CHARS
            or not name.isprintable()
            or name != name.strip()
        ):
            raise unauthenticated(
                "bad-token",
                f"the bearer token has no usable {self.config.principal_claim!r} claim "
                f"(MLC_OIDC_PRINCIPAL_CLAIM; a printable name of at most {MAX_PRINCIPAL_CHARS} characters)",
            )
        groups = claims.get(self.config.roles_claim) or []
        if isinstance(groups, str):
            groups = [groups]
        held = {g for g in groups if isinstance(g, str)} if isinstance(groups, list) else set()
        roles = [role for group, role in self.config.role_map if group in held]
        if not roles:
            wanted = ", ".join(group for group, _ in self.config.role_map)
            raise ApiError(
                403,
                f"{name} is signed in but in none of the groups {wanted} "
                f"(claim {self.config.roles_claim!r}): ask an administrator for one",
                "no-role",
            )
        return Principal(name, max(roles), "oidc")
