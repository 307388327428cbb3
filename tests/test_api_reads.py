"""Every read command through ``mlc server`` over real HTTP prints what it prints directly.

One lifecycle run (DEV, gated, approved) fills the inventory, the trail and Temporal; each
read command then runs twice through the real CLI, once with the DSN and Temporal address
and once with only ``MLC_API_URL`` and a key, and the outputs must be equal. The same data
is read page by page (``limit=1``) and must come back whole; no answer, log line or client
environment may carry the owner's DSN or its password.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cli.api_client import ApiClient
from mlc.domain import ApprovalGate, LifecycleSpec, StageSpec, TestKind
from mlc.errors import InvalidPackageError, NotFoundError
from mlc.store import lifecycle_definitions
from mlc.trust.keys import load_private_key
from tests.conftest import ADMIN, APPROVER, Stack
from tests.lifecycle_helpers import tamper_with_registration, wait_for_gate

AUDITOR = "auditor"

READS = (
    ("model", "list", "--json"),
    ("model", "list", "cc-fraud", "--json"),
    ("runtime", "list", "--json"),
    ("runtime", "list", "--stage", "DEV", "--json"),
    ("runtime", "key", "list", "--json"),
    ("user", "list", "--json"),
    ("policy", "list", "--json"),
    ("deployments", "--json"),
    ("deployments", "--all", "--model", "cc-fraud", "--json"),
    ("deployments", "--endpoints", "--json"),
    ("deployments",),
    ("history", "cc-fraud", "--json"),
    ("history", "cc-fraud", "--stage", "PROD", "--json"),
    ("lifecycle", "list", "--json"),
    ("lifecycle", "show", "FourEyes", "--json"),
    ("lifecycle", "show", "FourEyes@1", "--json"),
    ("status", "--json"),
    ("status", "cc-fraud@1", "--json"),
    ("status", "cc-fraud@1"),
    ("audit", "show", "cc-fraud@1", "--json"),
    ("audit", "export", "--format", "csv"),
)
"""Read commands whose output must not depend on the way to the data."""

PAGED = (
    ("/v1/snapshots", {}),
    ("/v1/runtimes", {}),
    ("/v1/runtimes/keys", {}),
    ("/v1/users", {}),
    ("/v1/policies", {}),
    ("/v1/deployments", {"all": "true"}),
    ("/v1/endpoints", {}),
    ("/v1/history/cc-fraud", {}),
    ("/v1/lifecycles", {}),
    ("/v1/runs", {}),
    ("/v1/audit/entries", {}),
)


def client_of(stack: Stack, user: str) -> ApiClient:
    assert stack.api_url
    return ApiClient(stack.api_url, load_private_key(stack.key_file(user)))


def secrets_of(stack: Stack) -> tuple[str, ...]:
    """The owner DSN and its password: neither may leave the server."""
    dsn = stack.settings.database_url
    assert dsn
    password = urlsplit(dsn).password
    assert password, "the test inventory is expected to need a password"
    return dsn, password


async def two_ways(stack: Stack, argv: tuple[str, ...], user: str) -> tuple[str, str]:
    """``mlc ARGV`` directly and through the API; both must succeed."""
    direct, remote = await asyncio.gather(stack.mlc(*argv, user=user), stack.mlc(*argv, user=user, api=True))
    for way, done in (("direct", direct), ("api", remote)):
        assert done.returncode == 0, f"{way} {argv}: {done.stderr}"
    return direct.stdout, remote.stdout


async def run_to_the_end(stack: Stack, example_package: Path, tmp_path: Path) -> None:
    """cc-fraud@1 through a gated DEV with a gateway, approved by the CLI; v2 registered only."""
    await stack.add_local_runtimes(("DEV",), gateway=True)
    await stack.add_local_runtimes(("SIT",))
    v1, _ = await stack.register_versions(example_package, tmp_path, 2)
    gated = LifecycleSpec(stages=(StageSpec(name="DEV", tests=(TestKind.SMOKE,), gate=ApprovalGate()),))
    handle = await stack.start(v1, spec=gated)
    await wait_for_gate(handle, "DEV")
    approved = await stack.mlc("approve", f"{v1.model}@{v1.version}", "--stage", "DEV", "--comment", "ok")
    assert approved.returncode == 0, approved.stderr
    await handle.result()
    for n in (1, 2):
        source = f"async def run(mlc):\n    return {n}\n"
        await lifecycle_definitions.create_lifecycle_definition(
            stack.pool, "FourEyes", source, uploaded_by=ADMIN
        )
    await lifecycle_definitions.create_lifecycle_definition(
        stack.pool, "Canary", "async def run(mlc):\n    return 0\n", uploaded_by=ADMIN
    )


async def test_every_read_command_is_the_same_through_the_api(
    stack: Stack, api_server: str, example_package: Path, tmp_path: Path
) -> None:
    await run_to_the_end(stack, example_package, tmp_path)
    await stack.add_principal(AUDITOR, "read-only")
    gate = asyncio.Semaphore(3)  # two cores: a few CLIs at a time

    async def compare(argv: tuple[str, ...]) -> None:
        async with gate:
            direct, remote = await two_ways(stack, argv, AUDITOR)
        if "--json" in argv:
            assert json.loads(remote) == json.loads(direct), argv
        else:
            assert remote == direct, argv

    await asyncio.gather(*(compare(argv) for argv in READS))
    listed = json.loads((await stack.mlc("deployments", "--all", "--json", user=AUDITOR, api=True)).stdout)
    assert [(d["stage"], d["version"], d["state"], d["traffic"]) for d in listed] == [
        ("DEV", 1, "serving", "100%")
    ]
    status = json.loads((await stack.mlc("status", "cc-fraud@1", "--json", api=True)).stdout)
    assert status["state"] == "succeeded" and status["decisions"][0]["approver"] == APPROVER
    shown = json.loads((await stack.mlc("audit", "show", "cc-fraud@1", "--json", api=True)).stdout)
    assert [d["comment"] for d in shown["decisions"]] == ["ok"] and shown["tests"]

    direct, remote = await two_ways(stack, ("audit", "export"), AUDITOR)
    exported = [json.loads(text) for text in (direct, remote)]
    for bundle in exported:
        bundle.pop("exported_at")
    assert exported[0] == exported[1] and exported[0]["head"]["seq"] == len(exported[0]["entries"])
    root = stack.settings.trust_root
    assert root
    direct, remote = await two_ways(stack, ("audit", "verify", "--trust-root", root, "--json"), AUDITOR)
    assert json.loads(remote) == json.loads(direct) and json.loads(remote)["ok"]

    refused = await stack.mlc("runtime", "cleanup", "local-dev", user=ADMIN, api=True)
    assert refused.returncode != 0 and "run it there, without MLC_API_URL" in refused.stderr

    await no_secret_leaves_the_server(stack)


async def no_secret_leaves_the_server(stack: Stack) -> None:
    """Every page of every read route, their errors, the server's log and the API client's
    environment: none holds the DSN or its password. Pages of one row add up to the list."""
    said: list[str] = []
    async with client_of(stack, AUDITOR) as api:
        for path, params in PAGED:
            whole = await api.get(path, **params, limit=500)
            assert whole["next"] is None, path
            items, after, pages = [], None, 0
            while True:
                page = await api.get(path, **params, limit=1, after=after)
                said.append(json.dumps(page))
                items += page["items"]
                pages += 1
                if not (after := page["next"]):
                    break
            assert items == whole["items"] and items, path
            assert pages == len(items), path
        assert len(whole["items"]) > 10, "the trail is long enough to page"
        parts = {"tests": [], "decisions": []}  # type: dict[str, list[Any]]
        after = None
        while True:
            page = await api.get("/v1/audit/cc-fraud/1", limit=1, after=after)
            said.append(json.dumps(page))
            for part in parts:
                parts[part] += page[part]
            if not (after := page["next"]):
                break
        whole = await api.get("/v1/audit/cc-fraud/1", limit=500)
        assert parts == {"tests": whole["tests"], "decisions": whole["decisions"]} and parts["decisions"]
        said.append(json.dumps(await api.get("/v1/audit/verify")))
        said.append(json.dumps(await api.get("/v1/lifecycles/Canary")))
        said.append(json.dumps(await api.get("/v1/runs/cc-fraud/1/status")))
        said.append(b"".join([c async for c in api.stream("/v1/audit/export")]).decode())
        for path, params, error in (
            ("/v1/runs/ghost/1/status", {}, NotFoundError),
            ("/v1/lifecycles/Nope", {}, NotFoundError),
            ("/v1/runtimes", {"after": "not-a-cursor"}, InvalidPackageError),
            ("/v1/audit/entries", {"limit": 501}, InvalidPackageError),
            ("/v1/audit/export", {"format": "xml"}, InvalidPackageError),
        ):
            with pytest.raises(error) as failed:
                await api.get(path, **params)
            said.append(str(failed.value))
    log = (stack.keys.parent / "server.log").read_text()
    env = stack.api_env()
    assert "MLC_DATABASE_URL" not in env and "TEMPORAL_ADDRESS" not in env
    for secret in secrets_of(stack):
        for text in said:
            assert secret not in text
        assert secret not in log
        assert all(secret not in value for value in env.values())


async def test_audit_verify_through_the_api_catches_a_changed_row(
    stack: Stack, api_server: str, example_package: Path
) -> None:
    await stack.add_principal(AUDITOR, "read-only")
    snap = await stack.register(example_package)
    root = stack.settings.trust_root
    assert root
    verify = ("audit", "verify", "--trust-root", root, "--json")
    good = await stack.mlc(*verify, user=AUDITOR, api=True)
    assert good.returncode == 0 and json.loads(good.stdout)["ok"], good.stderr
    async with client_of(stack, AUDITOR) as api:
        checked = await api.get("/v1/audit/verify")
    assert checked["verified_by"] == "server" and checked["ok"] and checked["trust_root"] == root
    assert checked["entries"] == json.loads(good.stdout)["entries"]
    no_root = await stack.mlc("audit", "verify", user=AUDITOR, api=True)
    assert no_root.returncode == 4 and "--trust-root" in no_root.stderr, "the client brings its own root"

    seq = await tamper_with_registration(stack.pool, snap)  # a superuser can: verify still catches it
    broken = await stack.mlc(*verify, user=AUDITOR, api=True)
    assert broken.returncode == 4
    problems = json.loads(broken.stdout)["problems"]
    assert f"entry {seq}" in problems[0] and "was changed after it was recorded" in problems[0]
    async with client_of(stack, AUDITOR) as api:
        server_says = await api.get("/v1/audit/verify")
    assert not server_says["ok"] and server_says["problems"] == problems


def test_reads_need_only_the_read_only_role() -> None:
    from server.api import ENDPOINTS
    from server.principal import Role
    from server.routes import MODULES

    assert MODULES
    mine = {path for path, _ in PAGED} | {
        "/v1/history/{model}",
        "/v1/lifecycles/{name}",
        "/v1/runs/{model}/{version}/status",
        "/v1/audit/export",
        "/v1/audit/verify",
        "/v1/audit/{model}/{version}",
    }
    declared = {e.path: e for e in ENDPOINTS if e.method == "GET"}
    assert mine - {"/v1/history/cc-fraud"} <= set(declared)
    assert all(declared[p].role is Role.READ_ONLY for p in mine if p in declared)
