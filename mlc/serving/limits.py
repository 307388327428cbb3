"""How much one request may ask of a model server, and the checks that hold it to that.

Requests are hostile input. Decoded JSON is much bigger than its text (``[{},{},...]``
costs about 20 bytes of memory per byte of body), so sizes are checked before parsing:
the body against ``max_body_bytes`` from its Content-Length and again while it streams
in, and arrays of many small containers against ``max_records`` by a scan that stops
as soon as the limit is passed. The limits come from the server's environment, so each
deployment can be given its own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from mlc.errors import MLCError

DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
"""Largest request body (10 MiB); bigger ones get 413 before they are read."""

DEFAULT_MAX_RECORDS = 10_000
"""Largest array ``/score`` and ``/metrics`` accept; bigger ones get 413 (use a batch job)."""

DEFAULT_LIMIT_CONCURRENCY = 64
"""Connections plus requests in flight before uvicorn answers 503 (bounds memory too)."""

MAX_BODY_BYTES_ENV = "MLC_SERVING_MAX_BODY_BYTES"
MAX_RECORDS_ENV = "MLC_SERVING_MAX_RECORDS"
LIMIT_CONCURRENCY_ENV = "MLC_SERVING_LIMIT_CONCURRENCY"
LIMIT_ENVS = (MAX_BODY_BYTES_ENV, MAX_RECORDS_ENV, LIMIT_CONCURRENCY_ENV)
"""Every variable the model server reads its limits from (runtimes pass these through)."""


class LimitExceededError(MLCError):
    """A request is bigger than this server accepts (answered with 413)."""


class ServingLimits(BaseModel):
    """The limits one model server enforces."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, gt=0)
    max_records: int = Field(default=DEFAULT_MAX_RECORDS, gt=0)
    limit_concurrency: int = Field(default=DEFAULT_LIMIT_CONCURRENCY, gt=0)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingLimits:
        """Defaults, overridden by ``MLC_SERVING_*`` variables that are set.

        Raises:
            MLCError: a variable is not a positive integer (naming it).
        """
        env = os.environ if environ is None else environ
        values: dict[str, int] = {}
        for field, name in (
            ("max_body_bytes", MAX_BODY_BYTES_ENV),
            ("max_records", MAX_RECORDS_ENV),
            ("limit_concurrency", LIMIT_CONCURRENCY_ENV),
        ):
            raw = env.get(name, "").strip()
            if not raw:
                continue
            try:
                values[field] = int(raw)
            except ValueError:
                values[field] = 0
            if values[field] <= 0:
                raise MLCError(f"{name}={raw!r} is not a positive integer; unset it or give a number")
        return cls(**values)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused as soon as it is known to exceed ``max_bytes``.

    A declared Content-Length is checked before anything is read; the stream is counted
    as it arrives (chunked bodies, lying clients). Chunks are joined once, as Starlette
    itself would; a single chunk is returned as it is.

    Raises:
        LimitExceededError: the body is bigger than ``max_bytes``.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise LimitExceededError(_too_big(f"{int(declared)} bytes", max_bytes))
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise LimitExceededError(_too_big(f"more than {max_bytes} bytes", max_bytes))
        if chunk:
            chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_big(size: str, max_bytes: int) -> str:
    return (
        f"request body of {size} exceeds this server's limit of {max_bytes} bytes "
        f"({MAX_BODY_BYTES_ENV}); split the records over several requests or run a batch job"
    )


_LEADING_SPACE = re.compile(rb"[ \t\r\n]*")
_STRUCTURE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[][{},]')
"""JSON strings (skipped whole, so brackets inside them do not count) and structure."""


def too_many_records(body: bytes, max_records: int) -> bool:
    """True when ``body`` is a JSON array sure to hold more than ``max_records`` elements.

    Only bodies holding more than twice as many objects and arrays as the limit are
    scanned (decoding fewer is cheap, and the caller's check of the decoded length then
    gives an exact count), so ordinary batches cost two ``bytes.count`` calls; the scan
    stops at the first comma past the limit. False does not promise the array is small,
    but the arrays that cost most to decode (many small containers) never get decoded.
    """
    allowed = 2 * max_records + 1
    if len(body) < 2 * allowed:  # every container takes two bytes: too short to hold more
        return False
    leading = _LEADING_SPACE.match(body)
    start = leading.end() if leading is not None else 0
    if body[start : start + 1] != b"[":
        return False
    if body.count(b"{") + body.count(b"[") <= allowed:
        return False
    depth = 0
    commas = 0
    for token in _STRUCTURE.finditer(body, start):
        char = body[token.start()]
        if char in b"[{":
            depth += 1
        elif char in b"]}":
            depth -= 1
            if depth == 0:
                return False
        elif char == ord(",") and depth == 1:
            commas += 1
            if commas >= max_records:
                return True
    return False
