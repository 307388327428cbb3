"""The generic contract: an activity's name, input type, result type and call options."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Generic, TypeVar

from temporalio import activity, workflow
from temporalio.common import RetryPolicy

In = TypeVar("In")
Out = TypeVar("Out")
Owner = TypeVar("Owner")

DEFAULT_RETRY = RetryPolicy(maximum_interval=timedelta(seconds=30), maximum_attempts=10)
"""Transient failures retry for a while; permanent ones are non-retryable errors."""

_MARK = "__mlc_contract__"
"""Attribute :meth:`ActivityContract.implement` sets on an implementation."""


@dataclass(frozen=True)
class ActivityContract(Generic[In, Out]):
    """One activity: what workflows send, what they get back, and under which name.

    The name is part of the persisted contract (running histories hold it), so it never
    changes; the input and result are frozen pydantic models (``None`` for no result).
    """

    name: str
    input: type[In]
    result: type[Out]
    timeout: timedelta
    """``start_to_close_timeout`` of every call."""
    heartbeat: timedelta | None = None
    """``heartbeat_timeout`` for long activities that heartbeat (deploys, tests)."""
    retry: RetryPolicy = field(default_factory=lambda: DEFAULT_RETRY)

    def implement(self, fn: Callable[[Owner, In], Awaitable[Out]]) -> Callable[[Owner, In], Awaitable[Out]]:
        """Decorate an activity method: registers it under :attr:`name`, typed by the contract."""
        defined = activity.defn(name=self.name)(fn)
        setattr(defined, _MARK, self)
        return defined

    async def execute(self, arg: In, *, task_queue: str) -> Out:
        """Schedule the activity from workflow code on ``task_queue`` and wait for its result."""
        declared: type[Any] = self.result
        hint = None if declared is type(None) else declared
        result: Out = await workflow.execute_activity(
            self.name,
            arg,
            result_type=hint,
            task_queue=task_queue,
            start_to_close_timeout=self.timeout,
            heartbeat_timeout=self.heartbeat,
            retry_policy=self.retry,
        )
        return result

    async def execute_local(self, arg: In) -> Out:
        """Run the activity as a local activity, in the worker running the workflow.

        No task queue round trip and no extra workflow task: for short calls of workflows
        that run on the worker serving the activity (the trusted main worker).
        """
        declared: type[Any] = self.result
        hint = None if declared is type(None) else declared
        result: Out = await workflow.execute_local_activity(
            self.name,
            arg,
            result_type=hint,
            start_to_close_timeout=self.timeout,
            retry_policy=self.retry,
        )
        return result


def implementations(
    owner: object, contracts: Sequence[ActivityContract[Any, Any]]
) -> list[Callable[..., Any]]:
    """The bound methods of ``owner`` implementing ``contracts``, in their order.

    Raises:
        TypeError: a contract has no implementation on ``owner`` (a worker would otherwise
            start and leave those activities unserved).
    """
    found: dict[str, Callable[..., Any]] = {}
    for klass in reversed(type(owner).__mro__):
        for name, member in vars(klass).items():
            contract = getattr(member, _MARK, None)
            if isinstance(contract, ActivityContract):
                found[contract.name] = getattr(owner, name)
    missing = [c.name for c in contracts if c.name not in found]
    if missing:
        raise TypeError(f"{type(owner).__name__} implements no activity {', '.join(missing)}")
    return [found[c.name] for c in contracts]
