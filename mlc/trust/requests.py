"""How a client signs an API request with its ``mlc`` key (HTTP Message Signatures, RFC 9421).

Both halves read these constants: the CLI signs, ``server/auth/signatures.py`` verifies.
Every request is signed when sent, with a fresh nonce, for at most a minute, so a captured
request cannot be replayed later or elsewhere (``@target-uri`` is covered).
"""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from http_message_signatures import HTTPMessageSigner, HTTPSignatureKeyResolver, algorithms

from mlc.trust.keys import key_id

if TYPE_CHECKING:
    import httpx
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

TAG = "mlc-api"
"""Signed application tag: a signature made for something else never counts as an API request."""
LABEL = "mlc"
MAX_AGE = timedelta(seconds=60)
"""How long a signature is valid (the library's default is a day); also how long the server
remembers its nonce."""
CLOCK_SKEW = timedelta(seconds=5)
COVERED = ("@method", "@target-uri")
COVERED_WITH_BODY = (*COVERED, "content-type", "content-digest")


class KeyResolver(HTTPSignatureKeyResolver):
    """The one key a client signs with (the library asks a resolver by key id)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key

    def resolve_private_key(self, key_id: str) -> Any:
        return self.key

    def resolve_public_key(self, key_id: str) -> Any:
        return self.key.public_key()


def sign_request(request: httpx.Request, key: Ed25519PrivateKey) -> None:
    """Add Signature-Input and Signature (and Content-Digest for a body) to ``request``.

    An upload streamed from a file carries its ``Content-Digest`` already (the client hashed
    the file): the signature covers that digest and the server checks it against the stream.
    """
    now = datetime.now(UTC)
    streamed = "content-digest" in request.headers
    content = b"" if streamed else request.content
    covered = COVERED_WITH_BODY if streamed else COVERED_WITH_BODY[:3] if content else COVERED
    HTTPMessageSigner(signature_algorithm=algorithms.ED25519, key_resolver=KeyResolver(key)).sign(
        request,
        key_id=key_id(key.public_key()),
        created=now,
        expires=now + MAX_AGE - CLOCK_SKEW,
        nonce=base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("="),
        label=LABEL,
        tag=TAG,
        covered_component_ids=covered,
        body=content or None,
        use_existing_digest=streamed,
    )
