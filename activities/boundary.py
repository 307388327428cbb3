"""Map the project's exceptions onto Temporal failures at the activity boundary."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from temporalio.exceptions import ApplicationError

from mlc.errors import MLCError

P = ParamSpec("P")
R = TypeVar("R")


def mlc_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn an ``MLCError`` into an ``ApplicationError`` typed by its class.

    Errors retrying cannot fix (bad input, missing snapshot, no runtime) become
    non-retryable, so a lifecycle fails at once with the message instead of looping.
    """

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except MLCError as exc:
            raise ApplicationError(
                str(exc), type=type(exc).__name__, non_retryable=not exc.retryable
            ) from exc

    return wrapper
