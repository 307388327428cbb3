"""The docker runtime kind: its driver, its ``docker`` settings and the options that fill them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from activities.runtimes.registry import KindOption, RuntimeKindSpec, register
from mlc.config import Settings
from mlc.domain import DockerSettings, Runtime, RuntimeKind

if TYPE_CHECKING:  # types only: the CLI reads a kind's options without loading Temporal
    from activities.runtimes.base import RuntimeDriver
    from activities.runtimes.gateway.tier import Gateway


def _driver(settings: Settings) -> RuntimeDriver:
    """The kind's driver, imported when first needed: the CLI reads a kind's options
    without loading its engine libraries."""
    from activities.runtimes.docker.driver import DockerDriver

    return DockerDriver(settings)


def _gateway(settings: Settings, runtime: Runtime) -> Gateway:
    """The kind's gateway tier, imported when first needed (like its driver)."""
    from activities.runtimes.docker.gateway import DockerGateway

    return DockerGateway(settings, runtime)


def _publish_host(settings: DockerSettings | None) -> str:
    """The gateway binds where the engine publishes ports."""
    return (settings or DockerSettings()).publish_host


KIND = register(
    RuntimeKindSpec(
        kind=RuntimeKind.DOCKER,
        driver=_driver,
        gateway=_gateway,
        settings_field="docker",
        settings_model=DockerSettings,
        options=(
            KindOption("docker_host", "base_url", str | None, "Docker engine URL (unix://, tcp://, ssh://)."),
            KindOption("base_image", "base_image", str | None, "Base image for model images."),
            KindOption("network_mode", "network_mode", str | None, "host, or a Docker network name."),
            KindOption(
                "tls_verify", "tls_verify", bool, "Verify the engine's TLS certificate.", default=False
            ),
            KindOption("tls_ca_cert", "tls_ca_cert", str | None),
            KindOption("tls_client_cert", "tls_client_cert", str | None),
            KindOption("tls_client_key", "tls_client_key", str | None),
        ),
        gateway_host=_publish_host,
    )
)
"""Docker runtimes keep their engine and container settings in ``Runtime.docker``."""
