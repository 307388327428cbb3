"""Map the project's exceptions onto Temporal failures at the activity boundary."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from mlc.errors import MLCError, RefusedError

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


@dataclass(frozen=True)
class CallingRun:
    """The workflow run that scheduled the current activity, as Temporal says (not the payload)."""

    workflow_id: str
    run_id: str
    workflow_type: str
    activity_id: str
    """Unique within the run: local activities count apart from the others, so theirs
    carry an ``L`` (idempotency keys are built from it)."""


def calling_run() -> CallingRun:
    """Who is calling, from Temporal's activity info; refuses activities run outside a workflow."""
    info = activity.info()
    if not (info.workflow_id and info.workflow_run_id and info.workflow_type):
        raise RefusedError("this activity only runs on behalf of a workflow run")
    activity_id = f"L{info.activity_id}" if info.is_local else info.activity_id
    return CallingRun(info.workflow_id, info.workflow_run_id, info.workflow_type, activity_id)
