"""The one place a Temporal client is made, with the pydantic data converter."""

from __future__ import annotations

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode

from mlc.config import Settings
from mlc.errors import RuntimeUnavailableError
from mlc.names import SEARCH_ATTRIBUTES


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


async def ensure_search_attributes(client: Client) -> None:
    """Register the lifecycle search attributes on the namespace if they are missing.

    ``mlc dev`` registers them when it starts its own server; this covers servers that
    someone else runs (and the time-skipping test server).
    """
    try:
        existing = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace)
        )
        known = set(existing.custom_attributes)
    except RPCError as exc:
        if exc.status is not RPCStatusCode.UNIMPLEMENTED:  # the test server can only add
            raise
        known = set()
    missing = {name: _INDEXED[kind] for name, kind in SEARCH_ATTRIBUTES.items() if name not in known}
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=client.namespace, search_attributes=missing)
        )


_INDEXED = {
    "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    "Int": IndexedValueType.INDEXED_VALUE_TYPE_INT,
    "KeywordList": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST,
}
