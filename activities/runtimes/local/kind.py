"""The local runtime kind: model servers and batch jobs as processes on the worker's host."""

from __future__ import annotations

from activities.runtimes.base import RuntimeDriver
from activities.runtimes.registry import RuntimeKindSpec, register
from mlc.config import Settings
from mlc.domain import RuntimeKind


def _driver(settings: Settings) -> RuntimeDriver:
    """The kind's driver, imported when first needed: the CLI reads a kind's options
    without loading its engine libraries."""
    from activities.runtimes.local.driver import LocalDriver

    return LocalDriver(settings)


KIND = register(RuntimeKindSpec(kind=RuntimeKind.LOCAL, driver=_driver))
"""Local runtimes keep no settings of their own."""
