"""Keyset pages: the cursor is the last row's key, opaque to clients, checked when it comes back.

Every list the API returns is cut this way (``?limit=`` at most 500, ``?after=`` the previous
page's ``next``), so no request reads or returns an unbounded number of rows: a query asks
for one row more than the page, and that extra row only says whether there is a next page.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from server.api import Page
from server.errors import ApiError

T = TypeVar("T")
Key = tuple[str | int | datetime, ...]

_BAD_CURSOR = "after must be the `next` value of the previous page"


def encode(key: Key) -> str:
    """The cursor naming ``key`` (datetimes as ISO text)."""
    values = [v.isoformat() if isinstance(v, datetime) else v for v in key]
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def decode(after: str | None, *shape: type) -> tuple[Any, ...] | None:
    """The key a cursor names, each value of the type in ``shape``; 422 for anything else."""
    if after is None:
        return None
    try:
        values = json.loads(base64.urlsafe_b64decode(after + "=" * (-len(after) % 4)))
        if not isinstance(values, list) or len(values) != len(shape):
            raise ValueError("wrong shape")
        return tuple(_typed(value, kind) for value, kind in zip(values, shape, strict=True))
    except (ValueError, TypeError, binascii.Error):
        raise ApiError(422, _BAD_CURSOR, "invalid") from None


def _typed(value: object, kind: type) -> object:
    if kind is datetime and isinstance(value, str):
        return datetime.fromisoformat(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise ValueError(f"not a {kind.__name__}")


def cut(rows: Sequence[T], limit: int, key: Callable[[T], Key]) -> Page[T]:
    """A page of the first ``limit`` of ``rows`` (read with ``limit + 1``)."""
    shown = list(rows[:limit])
    return Page[Any](items=shown, next=encode(key(shown[-1])) if len(rows) > limit else None)


def after_in(
    rows: Sequence[T], key: Callable[[T], Key], after: tuple[Any, ...] | None, limit: int
) -> list[T]:
    """``limit + 1`` rows past ``after`` of a list already in memory, sorted by ``key``
    (the verified governance state: small, but pages keep every answer bounded)."""
    return [r for r in rows if after is None or key(r) > after][: limit + 1]
