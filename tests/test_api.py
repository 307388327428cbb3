"""The control plane's API over real HTTP: signed requests, pages, the schema it publishes."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from cli.api_client import ApiClient
from mlc.errors import RefusedError
from mlc.trust.keys import load_private_key
from server.api import ENDPOINTS
from server.routes import MODULES
from tests.conftest import ADMIN, APPROVER, Stack


def client_of(stack: Stack, user: str) -> ApiClient:
    assert stack.api_url
    return ApiClient(stack.api_url, load_private_key(stack.key_file(user)))


async def test_a_signed_request_names_its_principal(stack: Stack, api_server: str) -> None:
    async with client_of(stack, APPROVER) as api:
        me = await api.get("/v1/me")
    assert me["name"] == APPROVER and me["method"] == "signature" and me["role"] == "member"
    assert me["governance_roles"] == ["approver"]
    async with client_of(stack, ADMIN) as api:
        assert (await api.get("/v1/me"))["role"] == "admin"


async def test_unsigned_and_unknown_callers_are_refused(stack: Stack, api_server: str) -> None:
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"{api_server}/v1/me")
    assert answer.status_code == 401 and answer.json()["reason"] == "no-credentials"
    async with client_of(stack, "stranger") as api:
        with pytest.raises(RefusedError, match="unknown-key"):
            await api.get("/v1/me")


async def test_snapshots_come_a_page_at_a_time(
    stack: Stack, api_server: str, example_package: Path, tmp_path: Path
) -> None:
    await stack.register_versions(example_package, tmp_path, 3)
    async with client_of(stack, APPROVER) as api:
        first = await api.get("/v1/snapshots", limit=2)
        assert len(first["items"]) == 2 and first["next"]
        second = await api.get("/v1/snapshots", limit=2, after=first["next"])
        everything = [item async for item in api.pages("/v1/snapshots")]
    assert [s["version"] for s in first["items"] + second["items"]] == [s["version"] for s in everything]
    assert second["next"] is None and len(everything) == 3


async def test_the_schema_lists_every_endpoint_with_its_role(stack: Stack, api_server: str) -> None:
    async with httpx.AsyncClient() as http:
        document = (await http.get(f"{api_server}/v1/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    assert "member" not in document["paths"]["/v1/snapshots"]["get"]["description"]
    assert "read-only" in document["paths"]["/v1/snapshots"]["get"]["description"]
    started = document["paths"]["/v1/rollbacks"]["post"]["responses"]
    assert "202" in started and "200" not in started, "the schema says what the route answers"
    assert MODULES  # importing them declared every endpoint in this process too
    served = {(e.path, e.method.lower()) for e in ENDPOINTS}
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert served == documented
