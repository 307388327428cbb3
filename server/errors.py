"""Errors as the API answers them: a status, a message for people, a code for programs."""

from __future__ import annotations

from pydantic import ValidationError

from mlc.errors import (
    ConflictError,
    InvalidKeyError,
    InvalidLifecycleError,
    InvalidPackageError,
    MLCError,
    NotFoundError,
    PermissionDeniedError,
    RefusedError,
)


class ApiError(Exception):
    """An answer other than success: ``{"error": message, "reason": code}`` with ``status``."""

    def __init__(
        self, status: int, error: str, reason: str | None = None, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.reason = reason
        self.headers = headers or {}
        """Sent with the answer (``Retry-After`` on 429)."""

    def body(self) -> dict[str, str | None]:
        return {"error": self.error, "reason": self.reason}


def unauthenticated(reason: str, message: str) -> ApiError:
    """401: the request did not prove who sent it (``reason`` is one of docs/api.md's codes)."""
    return ApiError(401, message, reason)


_STATUS: tuple[tuple[type[MLCError], int], ...] = (
    (NotFoundError, 404),
    (ConflictError, 409),
    (RefusedError, 403),
    (PermissionDeniedError, 403),
    (InvalidPackageError, 422),
    (InvalidLifecycleError, 422),
    (InvalidKeyError, 422),
)


def from_exception(exc: Exception) -> ApiError | None:
    """The API's answer for an error the core raised on purpose; None for a bug."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:10]
        )
        return ApiError(422, f"invalid request: {problems}", "invalid")
    if isinstance(exc, MLCError):
        for kind, status in _STATUS:
            if isinstance(exc, kind):
                return ApiError(status, str(exc), kind.__name__)
        return ApiError(503 if exc.retryable else 400, str(exc), type(exc).__name__)
    return None
