"""Model registration through the API: upload the archive, then the signed statement.

``PUT /v1/artifacts/{sha256}`` streams a raw ``.tar.gz`` to a file while hashing it (never
the whole archive in memory), and keeps it only when its sha-256 is the one in the URL and
in the signed ``Content-Digest``. ``POST /v1/snapshots`` then registers it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
import tempfile
from pathlib import Path

from pydantic import BaseModel

from mlc.artifacts import ArtifactStore
from mlc.domain import ModelSnapshot
from mlc.statements import Envelope
from mlc.trust.governance import SNAPSHOT_REGISTER
from server.api import Call, endpoint
from server.errors import ApiError, unauthenticated
from server.limits import declared_length, stream_body
from server.operations import governance, registration
from server.principal import Role
from server.signed import check_signer

ARCHIVE_LIMIT_SETTING = "MLC_MAX_PACKAGE_ARCHIVE_BYTES"
UPLOADS_AT_ONCE = 2
"""Archives received (or unpacked to read their manifest) at the same time per server; one
per principal (each may be up to a GiB)."""
_uploads = asyncio.Semaphore(UPLOADS_AT_ONCE)
_uploading: set[str] = set()
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DIGEST = re.compile(r"^sha-256=:([A-Za-z0-9+/=]+):$")


class ArtifactReceipt(BaseModel):
    """An archive the store holds now."""

    sha256: str
    bytes: int
    new: bool
    """False when the store already had it (the body was not read)."""


class Registration(BaseModel):
    """A signed ``snapshot.register`` statement for an uploaded archive."""

    envelope: Envelope


class Registered(BaseModel):
    snapshot: ModelSnapshot
    new: bool


def _store(call: Call) -> ArtifactStore:
    return ArtifactStore(call.ctx.settings.artifact_dir)


def _signed_digest(call: Call, sha256: str) -> bytes:
    """The sha-256 the signed ``Content-Digest`` names; it must be the URL's."""
    match = _DIGEST.match(call.request.headers.get("content-digest", "").strip())
    if match is None:
        raise unauthenticated("digest-mismatch", "an upload needs a signed `Content-Digest: sha-256=:...:`")
    digest = base64.b64decode(match.group(1))
    if not hmac.compare_digest(digest, bytes.fromhex(sha256)):
        raise ApiError(422, f"the URL names archive {sha256[:12]}, but Content-Digest another", "invalid")
    return digest


@endpoint(
    "PUT",
    "/v1/artifacts/{sha256}",
    role=Role.MEMBER,
    response=ArtifactReceipt,
    streamed=True,
    summary="Upload a model package's .tar.gz (raw body; `mlc model register`, step 1)",
)
async def put_artifact(call: Call) -> ArtifactReceipt:
    sha256 = call.path("sha256")
    if not _SHA256.match(sha256):
        raise ApiError(422, "the URL must end in the archive's sha256 (64 lowercase hex digits)", "invalid")
    expected = _signed_digest(call, sha256)
    store = _store(call)
    limit = store.limits.archive_bytes
    declared_length(call.request, limit, ARCHIVE_LIMIT_SETTING)  # refused before anything is read
    if store.path_for(sha256).is_file():
        return ArtifactReceipt(sha256=sha256, bytes=store.path_for(sha256).stat().st_size, new=False)
    who = call.principal.name
    if who in _uploading:
        raise ApiError(429, f"{who} has an upload under way already; one at a time", "busy")
    if _uploads.locked():
        raise ApiError(429, f"{UPLOADS_AT_ONCE} uploads are under way; try again shortly", "busy")
    _uploading.add(who)
    try:
        async with _uploads:
            size = await _receive(call, store, sha256, expected, limit)
    finally:
        _uploading.discard(who)
    return ArtifactReceipt(sha256=sha256, bytes=size, new=True)


async def _receive(call: Call, store: ArtifactStore, sha256: str, expected: bytes, limit: int) -> int:
    """Write the body to a scratch file while hashing; move it into the store if it matches."""
    fd, name = tempfile.mkstemp(dir=store.incoming(), suffix=".upload")
    scratch = Path(name)
    try:
        hasher, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            async for chunk in stream_body(call.request, limit, ARCHIVE_LIMIT_SETTING):
                size += len(chunk)
                hasher.update(chunk)
                out.write(chunk)
        if not hmac.compare_digest(hasher.digest(), expected):
            raise unauthenticated(
                "digest-mismatch", "the body does not match its URL and signed Content-Digest"
            )
        store.put_file(scratch, sha256)
        return size
    finally:
        scratch.unlink(missing_ok=True)


@endpoint(
    "POST",
    "/v1/snapshots",
    role=Role.MEMBER,
    body=Registration,
    response=Registered,
    summary="Register an uploaded archive as a snapshot (`mlc model register`, step 2)",
)
async def register_snapshot(call: Call) -> Registered:
    envelope = call.body.envelope
    await check_signer(call, envelope)
    args = governance.claim(envelope, SNAPSHOT_REGISTER).args
    sha256 = str(args.get("sha256", ""))
    if not _SHA256.match(sha256):
        raise ApiError(422, "the statement's sha256 is not an archive digest", "invalid")
    async with _uploads:  # unpacking may write up to MLC_MAX_PACKAGE_UNPACKED_BYTES
        manifest = await registration.manifest_in_store(_store(call), sha256)
    snapshot, new = await registration.register(call.ctx.pool, call.ctx.settings, envelope, manifest, sha256)
    return Registered(snapshot=snapshot, new=new)
