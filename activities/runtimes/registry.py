"""Runtime kinds, found by their :class:`~mlc.domain.RuntimeKind` rather than an if/elif.

Each kind package declares one :class:`RuntimeKindSpec` in its ``kind`` module and
registers it: the driver that acts on its runtimes, the gateway it puts in front of
their online deployments, the settings model it keeps in the runtime's record and the
``mlc runtime add`` options that fill it. :data:`KIND_MODULES` lists the kind modules;
they are imported on first lookup, so the CLI and the workers name no kind. Adding a
kind (Spark, SageMaker) means a new package with a ``kind`` module, its name here and its
member in ``RuntimeKind``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from mlc.config import Settings
from mlc.domain import Runtime, RuntimeKind
from mlc.errors import RefusedError

if TYPE_CHECKING:  # the gateway's package imports this registry; base loads Temporal
    from activities.runtimes.base import RuntimeDriver
    from activities.runtimes.gateway.tier import Gateway

KIND_MODULES: tuple[str, ...] = ("activities.runtimes.local.kind", "activities.runtimes.docker.kind")
"""The modules that register a runtime kind (each calls :func:`register` on import)."""

DEFAULT_GATEWAY_HOST = "127.0.0.1"
"""Where a runtime's gateway binds unless its kind or the runtime says otherwise."""


@dataclass(frozen=True)
class KindOption:
    """One ``mlc runtime add`` option of a kind: ``--<name>`` fills ``target`` of its settings."""

    name: str
    """The command's parameter (``docker_host`` is ``--docker-host``)."""
    target: str
    """The field of the kind's settings model it sets."""
    type: Any
    """The parameter's type (``str | None``, ``bool``)."""
    help: str | None = None
    """The option's line in ``--help``."""
    default: Any = None
    """None: the settings model's own default applies."""


@dataclass(frozen=True)
class RuntimeKindSpec:
    """What a runtime kind declares: its driver, settings, CLI options and checks."""

    kind: RuntimeKind
    driver: Callable[[Settings], RuntimeDriver]
    """Makes the kind's driver (its class)."""
    settings_field: str | None = None
    """The :class:`~mlc.domain.Runtime` field holding the kind's settings (``docker``), if any."""
    settings_model: type[BaseModel] | None = None
    options: tuple[KindOption, ...] = ()
    gateway: Callable[[Settings, Runtime], Gateway] | None = None
    """Makes the gateway in front of a runtime's online deployments (None: the kind has none)."""
    gateway_host: Callable[[Any], str] = field(default=lambda _settings: DEFAULT_GATEWAY_HOST)
    """Where a runtime of this kind binds its gateway by default, given its settings."""

    def settings_from(self, given: Mapping[str, Any]) -> BaseModel | None:
        """The kind's settings from ``mlc runtime add``'s options (unset ones keep the
        model's defaults); None for a kind that keeps none."""
        if self.settings_model is None:
            return None
        values = {o.target: given.get(o.name, o.default) for o in self.options}
        return self.settings_model.model_validate({k: v for k, v in values.items() if v is not None})

    def runtime_fields(self, settings: BaseModel | None) -> dict[str, Any]:
        """The :class:`~mlc.domain.Runtime` fields that hold ``settings``."""
        return {} if self.settings_field is None else {self.settings_field: settings}


_KINDS: dict[RuntimeKind, RuntimeKindSpec] = {}


def register(spec: RuntimeKindSpec) -> RuntimeKindSpec:
    """Make ``spec`` the kind of runtimes whose ``kind`` is ``spec.kind``; return it."""
    _KINDS[spec.kind] = spec
    return spec


def kinds() -> Mapping[RuntimeKind, RuntimeKindSpec]:
    """Every registered kind (importing :data:`KIND_MODULES` on first use)."""
    if len(_KINDS) < len(KIND_MODULES):
        for module in KIND_MODULES:
            importlib.import_module(module)
    return _KINDS


def kind_spec(kind: RuntimeKind) -> RuntimeKindSpec:
    """The registered spec of ``kind``.

    Raises:
        ValueError: no kind module registers it.
    """
    spec = kinds().get(kind)
    if spec is None:
        raise ValueError(f"no runtime kind {kind.value!r} is registered (see {__name__}.KIND_MODULES)")
    return spec


def driver_for(runtime: Runtime, settings: Settings) -> RuntimeDriver:
    """Return the driver for ``runtime.kind``."""
    spec = kinds().get(runtime.kind)
    if spec is None:
        raise ValueError(f"runtime {runtime.name}: unknown kind {runtime.kind!r}")
    return spec.driver(settings)


def gateway_for(settings: Settings, runtime: Runtime) -> Gateway:
    """The gateway of ``runtime``, as its kind runs it (a local process, containers...).

    Raises:
        RefusedError: the runtime's kind runs no gateway.
    """
    tier = kind_spec(runtime.kind).gateway
    if tier is None:
        raise RefusedError(f"runtime {runtime.name} ({runtime.kind.value}) has no gateway driver")
    return tier(settings, runtime)


async def remove_gateway(settings: Settings, runtime: Runtime) -> None:
    """Stop the runtime's gateway (process or container); its files stay for inspection."""
    if runtime.gateway is not None:
        await gateway_for(settings, runtime).stop()
