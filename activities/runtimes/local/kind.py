"""The local runtime kind: model servers and batch jobs as processes on the worker's host."""

from __future__ import annotations

from typing import TYPE_CHECKING

from activities.runtimes.registry import RuntimeKindSpec, register
from mlc.config import Settings
from mlc.domain import Runtime, RuntimeKind

if TYPE_CHECKING:  # types only: the CLI reads a kind's options without loading Temporal
    from activities.runtimes.base import RuntimeDriver
    from activities.runtimes.gateway.tier import Gateway


def _driver(settings: Settings) -> RuntimeDriver:
    """The kind's driver, imported when first needed: the CLI reads a kind's options
    without loading its engine libraries."""
    from activities.runtimes.local.driver import LocalDriver

    return LocalDriver(settings)


def _gateway(settings: Settings, runtime: Runtime) -> Gateway:
    """The kind's gateway tier, imported when first needed (like its driver)."""
    from activities.runtimes.local.gateway import LocalGateway

    return LocalGateway(settings, runtime)


KIND = register(RuntimeKindSpec(kind=RuntimeKind.LOCAL, driver=_driver, gateway=_gateway))
"""Local runtimes keep no settings of their own."""
