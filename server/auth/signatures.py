"""Requests signed with a principal's registered Ed25519 key (HTTP Message Signatures, RFC 9421).

People who already have an ``mlc`` key need no new secret: the key that signs their decisions
signs their requests. The library checks the signature, coverage and age; replay is ours
(the library leaves it to the caller): each ``(keyid, nonce)`` is accepted once.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import http_sf
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from http_message_signatures import (
    HTTPMessageSignaturesException,
    HTTPMessageVerifier,
    HTTPSignatureKeyResolver,
    InvalidSignature,
    algorithms,
)

from mlc.trust.requests import CLOCK_SKEW, COVERED, COVERED_WITH_BODY, LABEL, MAX_AGE, TAG
from server.errors import unauthenticated
from server.principal import Principal, role_of

if TYPE_CHECKING:
    import asyncpg

    from mlc.trust.governance import Governance


@dataclass(frozen=True)
class _Message:
    """The view of a request the library reads: method, absolute URL, header lines."""

    method: str
    url: str
    headers: _Headers


class _Headers(list[tuple[str, str]]):
    def items(self) -> Any:
        return iter(self)


class _Keys(HTTPSignatureKeyResolver):
    """Public keys from the verified governance state; unknown and revoked keys refused by name."""

    def __init__(self, governance: Governance, keyid: object) -> None:
        for principal in governance.principals.values():
            if isinstance(keyid, str) and keyid in principal.keys:
                if keyid in principal.revoked:
                    raise unauthenticated("revoked-key", f"key {keyid} has been revoked")
                self.owner = principal.name
                self.key = principal.keys[keyid]
                return
        raise unauthenticated("unknown-key", f"key {keyid} is not registered to any principal")

    def resolve_public_key(self, key_id: str) -> Ed25519PublicKey:
        return self.key

    def resolve_private_key(self, key_id: str) -> Any:
        raise NotImplementedError("the server never signs requests")


def _parameters(headers: dict[str, str]) -> dict[str, Any]:
    """The ``mlc`` signature's parameters, read before verifying so refusals can say why."""
    try:
        members: Any = http_sf.parse(headers["signature-input"].encode(), tltype="dictionary")
        return dict(members[LABEL][1])
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise unauthenticated("bad-signature", f"no `{LABEL}` signature in Signature-Input") from exc


def _check_times(params: dict[str, Any], now: datetime) -> None:
    created, expires = params.get("created"), params.get("expires")
    if not isinstance(created, int) or not isinstance(expires, int):
        raise unauthenticated("bad-signature", "the signature must carry `created` and `expires`")
    if expires - created > MAX_AGE.total_seconds():
        raise unauthenticated("stale", f"a signature may be valid for at most {MAX_AGE.seconds} s")
    stamp = now.timestamp()
    if created > stamp + CLOCK_SKEW.total_seconds():
        raise unauthenticated("stale", "the signature was created in the future: check the client's clock")
    if expires < stamp - CLOCK_SKEW.total_seconds() or created < stamp - MAX_AGE.total_seconds():
        raise unauthenticated("stale", "the signature has expired: sign each request when sending it")


def _check_digest(headers: dict[str, str], body: bytes) -> None:
    try:
        members: Any = http_sf.parse(headers["content-digest"].encode(), tltype="dictionary")
        digest = members["sha-256"][0]
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise unauthenticated("digest-mismatch", "a body needs a sha-256 Content-Digest") from exc
    if not hmac.compare_digest(digest, hashlib.sha256(body).digest()):
        raise unauthenticated("digest-mismatch", "the body does not match its signed Content-Digest")


async def verify_request(
    *,
    method: str,
    target_uri: str,
    headers: list[tuple[str, str]],
    body: bytes | None,
    governance: Governance,
    pool: asyncpg.Pool,
) -> Principal:
    """The principal whose active key signed this request, or a 401 saying why not.

    ``body=None``: the caller checks the streamed body against ``content-digest`` itself
    (uploads too large to hold); the signature must still cover the digest.
    """
    lookup: dict[str, str] = {}
    for name, value in headers:  # repeated fields combine, as the library reads them
        lookup[name.lower()] = f"{lookup[name.lower()]}, {value}" if name.lower() in lookup else value
    params = _parameters(lookup)
    _check_times(params, datetime.now(UTC))
    if params.get("tag") != TAG:
        raise unauthenticated("bad-signature", f"the signature's tag must be {TAG!r}")
    nonce = params.get("nonce")
    if not isinstance(nonce, str) or not 16 <= len(nonce) <= 64:
        raise unauthenticated("bad-signature", "the signature needs a random nonce of 16 to 64 characters")
    has_body = body is None or len(body) > 0
    if has_body and body is not None:
        _check_digest(lookup, body)
    keys = _Keys(governance, params.get("keyid"))
    verifier = HTTPMessageVerifier(signature_algorithm=algorithms.ED25519, key_resolver=keys)
    verifier.max_clock_skew = CLOCK_SKEW
    try:
        [result] = verifier.verify(
            _Message(method, target_uri, _Headers(headers)),
            max_age=MAX_AGE,
            expect_tag=TAG,
            expect_label=LABEL,
            require_components=COVERED_WITH_BODY if has_body else COVERED,
            body=body or None,
        )
    except (InvalidSignature, HTTPMessageSignaturesException, ValueError) as exc:
        raise unauthenticated(
            "bad-signature", f"the signature does not verify{': ' + str(exc) if str(exc) else ''}"
        ) from exc
    keyid = str(result.parameters["keyid"])
    if not await _first_use(
        pool, keyid, nonce, read_only=method in ("GET", "HEAD"), expires=params["expires"]
    ):
        raise unauthenticated("replay", "this signed request was already received (its nonce is spent)")
    return Principal(keys.owner, role_of(governance, keys.owner), "signature", keyid)


async def _first_use(pool: asyncpg.Pool, keyid: str, nonce: str, *, read_only: bool, expires: int) -> bool:
    """Spend ``nonce``; False when it was spent before. A read's nonce is written without
    waiting for the disk: a crash can forget under a second of them, all expiring within a minute."""
    until = datetime.fromtimestamp(expires, UTC) + CLOCK_SKEW
    async with pool.acquire() as conn, conn.transaction():
        if read_only:
            await conn.execute("SET LOCAL synchronous_commit = off")
        row = await conn.fetchval(
            "INSERT INTO api_nonces (keyid, nonce, expires_at) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING RETURNING 1",
            keyid,
            nonce,
            until,
        )
    return row is not None
