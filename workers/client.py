"""The one place a Temporal client is made, with the pydantic data converter."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from mlc.config import Settings
from mlc.errors import RuntimeUnavailableError


async def connect(settings: Settings) -> Client:
    """Connect to ``settings.temporal_address`` or raise a readable error."""
    try:
        return await Client.connect(
            settings.temporal_address,
            namespace=settings.temporal_namespace,
            data_converter=pydantic_data_converter,
        )
    except RuntimeError as exc:
        raise RuntimeUnavailableError(
            f"cannot reach Temporal at {settings.temporal_address}: {exc}; is `mlc dev` "
            "running, or is TEMPORAL_ADDRESS right?"
        ) from exc
