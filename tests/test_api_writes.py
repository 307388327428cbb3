"""Every write command through `mlc server` only (``MLC_API_URL`` + a key, no DSN, no Temporal).

Real HTTP, Temporal, PostgreSQL, worker and model servers: a snapshot registered through the
API is promoted through every stage by approvals signed on the client and sent through the
API, then rolled back; governance commands change the verified state; what the caller may
not do (read-only principals, someone else's statement, bytes that are not what was
signed) is refused; decisions sent this way verify in `mlc audit verify`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import pytest
from temporalio.client import WorkflowFailureError

from cli import admin
from cli.api_client import ApiClient
from mlc.artifacts import ArtifactStore, build_archive, sha256_of
from mlc.contracts.lifecycle import LifecycleResult, SignedDecision
from mlc.domain import ApprovalGate, Decision, LifecycleSpec, ModelRef, StageSpec, TestKind
from mlc.errors import InvalidPackageError, PermissionDeniedError, RefusedError, RuntimeUnavailableError
from mlc.lifecycle_client import send_decision, sign_decision
from mlc.store import runs, runtimes, trail
from mlc.trust.governance import SNAPSHOT_REGISTER
from mlc.trust.keys import key_id, load_private_key, public_text
from server.routes.lifecycle_runs import API_START
from tests.conftest import (
    ADMIN,
    APPROVER,
    AUTHOR,
    FIXTURES,
    REGISTRAR,
    Stack,
    gateway_settings,
    require_sandbox,
)
from tests.lifecycle_helpers import wait_for_gate

STAGES = ("DEV", "SIT", "UAT", "PROD")
READER = "reader"
REASON = "v2 answers slower than v1"


def every_stage(grace: timedelta) -> LifecycleSpec:
    """Smoke tests in every stage, a gate before each promotion, nothing after PROD."""
    return LifecycleSpec(
        stages=tuple(
            StageSpec(
                name=stage,
                tests=(TestKind.SMOKE,),
                gate=ApprovalGate() if stage != "PROD" else None,
                grace=grace,
            )
            for stage in STAGES
        )
    )


def client_of(stack: Stack, user: str) -> ApiClient:
    assert stack.api_url
    return ApiClient(stack.api_url, load_private_key(stack.key_file(user)))


class Outputs:
    """Everything the API's clients printed, to show the DSN never reached them."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.seen: list[str] = []

    async def mlc(self, *args: str, user: str = APPROVER) -> subprocess.CompletedProcess[str]:
        done = await self.stack.mlc(*args, user=user, api=True)
        self.seen.append(done.stdout + done.stderr)
        return done

    def assert_no_dsn(self) -> None:
        """Not in what the clients printed, nor in the server's own log."""
        dsn = self.stack.settings.database_url or ""
        secret = urlparse(dsn).password or dsn
        log = (self.stack.keys.parent / "server.log").read_text()
        assert dsn and all(dsn not in text and secret not in text for text in [*self.seen, log])


async def test_register_promote_through_every_stage_and_roll_back(
    stack: Stack, api_server: str, example_package: Path, tmp_path: Path
) -> None:
    out = Outputs(stack)
    await stack.add_principal(READER, "read-only")
    # a registrant with a package: the archive goes up by digest, the statement after it
    second = tmp_path / "cc-fraud-2"
    shutil.copytree(example_package, second)
    (second / "NOTES.md").write_text("second version\n")
    for n, package in enumerate((example_package, second), start=1):
        registered = await out.mlc("model", "register", str(package), "--json", user=REGISTRAR)
        assert registered.returncode == 0, registered.stderr
        assert json.loads(registered.stdout)[0]["version"] == n
    again = await out.mlc("model", "register", str(example_package), user=REGISTRAR)
    assert "cc-fraud@1 already registered (same content)" in again.stdout, again.stderr

    # the admin adds one runtime per stage; only PROD gets a gateway (the rollback's endpoint)
    for stage in STAGES:
        name = f"local-{stage.lower()}"
        where = ["--gateway-port", str(gateway_settings().port)] if stage == "PROD" else ["--no-gateway"]
        added = await out.mlc(
            "runtime", "add", name, "--stage", stage, "--task-queue", stack.task_queue, *where,
            "--evidence-key", admin.local_evidence_key(stack.settings, name), user=ADMIN,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr

    # v1 reaches PROD the direct way; v2 entirely through the API
    spec = every_stage(timedelta(hours=1))
    v1 = await stack.start((await stack.register(example_package)), spec=spec)
    for stage in STAGES[:-1]:
        await wait_for_gate(v1, stage)
        ref = ModelRef(model="cc-fraud", version=1)
        _, envelope = await sign_decision(
            stack.client, stack.pool, stack.signers[APPROVER], ref, stage=stage, decision=Decision.APPROVED
        )
        await send_decision(v1, ref, SignedDecision(envelope=envelope), approve=True)
    await v1.result()

    refused = await out.mlc("lifecycle", "start", "cc-fraud@2", user=READER)
    assert refused.returncode == 4 and "reader is read-only; this needs member" in refused.stderr
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    started = await out.mlc(
        "lifecycle", "start", "cc-fraud@2", "--spec", str(spec_file), "--json", user=REGISTRAR
    )
    assert started.returncode == 0, started.stderr
    workflow_id = json.loads(started.stdout)["workflow_id"]
    ref = ModelRef(model="cc-fraud", version=2)
    v2 = stack.client.get_workflow_handle(workflow_id, result_type=LifecycleResult)

    await wait_for_gate(v2, "DEV")
    no = await out.mlc("approve", "cc-fraud@2", "--stage", "DEV", user=READER)
    assert no.returncode == 4 and "reader is read-only; this needs member" in no.stderr
    _, roots = await sign_decision(
        stack.client, stack.pool, stack.signers[ADMIN], ref, stage="DEV", decision=Decision.APPROVED
    )
    path = "/v1/runs/cc-fraud/2/decisions"
    async with client_of(stack, READER) as api:
        with pytest.raises(PermissionDeniedError, match=r"needs member \(role\)"):
            await api.post(path, {"envelope": roots.to_json()})
    async with client_of(stack, APPROVER) as api:
        with pytest.raises(
            PermissionDeniedError, match="signed by root's key, but the request comes from alice"
        ):
            await api.post(path, {"envelope": roots.to_json()})
    unseen = await out.mlc("approve", "cc-fraud@2", "--stage", "DEV", "--evidence", "sha256:" + "0" * 64)
    assert unseen.returncode == 4 and "nothing was signed" in unseen.stderr, unseen.stderr
    for stage in STAGES[:-1]:
        await wait_for_gate(v2, stage)
        decided = await out.mlc("approve", "cc-fraud@2", "--stage", stage, "--comment", "fine")
        assert decided.returncode == 0, decided.stderr
        assert f"cc-fraud@2: {stage} approved by alice (signed, verified)" in decided.stdout
    assert (await v2.result()).stages == STAGES

    # the starter is the caller the server authenticated, in Temporal and in the trail
    describe = await v2.describe()
    run = await runs.read_run(stack.pool, v2.id, describe.run_id or "")
    assert run is not None and run["started_by"] == REGISTRAR
    events = [e.data() for e in await trail.read_entries(stack.pool, kinds=(trail.RUN,), workflow_id=v2.id)]
    assert [(e["actor"], e["lifecycle"]) for e in events if e["event"] == API_START] == [
        (REGISTRAR, "ModelLifecycle")
    ]
    decisions = await trail.read_entries(stack.pool, kinds=(trail.DECISION,), model="cc-fraud")
    assert [(d.version, d.data()["stage"], d.data()["approver"]) for d in decisions if d.version == 2] == [
        (2, stage, APPROVER) for stage in STAGES[:-1]
    ]

    # rollback: signed here, started as alice by the server, answered when done
    rolled = await out.mlc("rollback", "cc-fraud", "--stage", "PROD", "--reason", REASON, "--json")
    assert rolled.returncode == 0, rolled.stderr
    result = json.loads(rolled.stdout)
    assert (result["version"], result["replaced"], result["signer"]) == (1, 2, APPROVER)
    assert [r["warm"] for r in result["runtimes"]] == [True]
    back = await runs.read_run(stack.pool, result["workflow_id"], result["run_id"])
    assert back is not None and back["started_by"] == APPROVER

    # a rejection through the API ends its run as failed
    (third,) = await stack.register_versions(example_package, tmp_path / "third", 1)
    ref = ModelRef(model="cc-fraud", version=third.version)
    started = await out.mlc(
        "lifecycle", "start", str(ref), "--spec", str(spec_file), "--json", user=REGISTRAR
    )
    assert started.returncode == 0, started.stderr
    v3 = stack.client.get_workflow_handle(json.loads(started.stdout)["workflow_id"])
    await wait_for_gate(v3, "DEV")
    rejected = await out.mlc("reject", str(ref), "--stage", "DEV", "--comment", "not this one")
    assert f"{ref}: DEV rejected by alice (signed, verified)" in rejected.stdout, rejected.stderr
    with pytest.raises(WorkflowFailureError) as failure:
        await v3.result()
    assert "DEV gate rejected by alice: not this one" in str(failure.value.cause)

    # the decisions sent through the API verify: on the server's host, and on the client
    # against its own trust root (over the export)
    verified = await stack.mlc("audit", "verify")
    assert verified.returncode == 0 and "audit trail verified" in verified.stdout, verified.stdout
    assert stack.settings.trust_root
    remote = await out.mlc("audit", "verify", "--trust-root", stack.settings.trust_root, "--json")
    assert remote.returncode == 0 and json.loads(remote.stdout)["ok"] is True, remote.stdout + remote.stderr
    out.assert_no_dsn()


async def test_governance_commands_through_the_api(stack: Stack, api_server: str) -> None:
    out = Outputs(stack)
    carol = public_text(load_private_key(stack.key_file("carol")).public_key())
    added = await out.mlc("key", "add", "carol", carol, user=ADMIN)
    assert added.returncode == 0 and "registered key SHA256:" in added.stdout, added.stderr
    granted = await out.mlc(
        "user", "grant", "carol", "--role", "approver", "--role", "lifecycle-author", user=ADMIN
    )
    assert "carol now has roles: approver, lifecycle-author (signed by root)" in granted.stdout, (
        granted.stderr
    )
    taken = await out.mlc("user", "revoke", "carol", "--role", "lifecycle-author", user=ADMIN)
    assert "carol now has roles: approver (signed by root)" in taken.stdout, taken.stderr
    policy = await out.mlc("policy", "set", "UAT", "--approver", "carol", "--min-approvals", "1", user=ADMIN)
    assert policy.returncode == 0, policy.stderr

    # members may not administer; the refusal names the role
    member = await out.mlc("user", "grant", APPROVER, "--role", "admin")
    assert member.returncode == 4 and "alice is member; role.grant needs admin" in member.stderr

    # a runtime's evidence key comes from its worker's host, never from the server
    bare = await out.mlc("runtime", "add", "edge-dev", "--stage", "DEV", "--no-gateway", user=ADMIN)
    assert bare.returncode == 2 and "a compromised server could substitute its own key" in bare.stderr
    evidence = admin.local_evidence_key(stack.settings, "edge-dev")
    runtime = await out.mlc(
        "runtime", "add", "edge-dev", "--stage", "DEV", "--no-gateway", "--evidence-key", evidence, user=ADMIN
    )
    assert runtime.returncode == 0, runtime.stderr
    assert (await runtimes.read_runtime(stack.pool, "edge-dev")).stage == "DEV"
    rotated = load_private_key(stack.key_file("edge-rotated")).public_key()
    key_added = await out.mlc("runtime", "key", "add", "edge-dev", public_text(rotated), user=ADMIN)
    assert key_added.returncode == 0, key_added.stderr
    revoked = await out.mlc("runtime", "key", "revoke", "edge-dev", key_id(rotated), user=ADMIN)
    assert revoked.returncode == 0, revoked.stderr
    removed = await out.mlc("runtime", "remove", "edge-dev", user=ADMIN)
    assert removed.returncode == 0, removed.stderr
    assert [r.name for r in await runtimes.read_runtimes(stack.pool)] == []

    state = await admin.state(stack.pool, stack.settings)
    assert state.roles_of("carol") == {"approver"}
    assert state.policies["UAT"].approvers == ("carol",)
    assert state.evidence_keys[key_id(rotated)].revoked and "edge-dev" not in state.runtimes

    # anyone may revoke their own key (a member), after which it authenticates nothing
    own = await out.mlc(
        "key", "revoke", "carol", key_id(load_private_key(stack.key_file("carol")).public_key()), user="carol"
    )
    assert own.returncode == 0, own.stderr
    assert (
        key_id(load_private_key(stack.key_file("carol")).public_key())
        in (await admin.state(stack.pool, stack.settings)).principals["carol"].revoked
    )

    # host-only commands say so; local ones still work
    init = await out.mlc("admin", "init", "mallory", user="mallory")
    assert init.returncode == 4 and "over HTTP the first caller would own the installation" in init.stderr
    migrate = await out.mlc("db", "migrate", user=ADMIN)
    assert migrate.returncode == 4 and "runs only on the server's host" in migrate.stderr
    shown = await out.mlc("key", "show", "--json", user=APPROVER)
    assert json.loads(shown.stdout)["key_id"] == stack.signers[APPROVER].key_id
    out.assert_no_dsn()


def upload_headers(data: bytes) -> dict[str, str]:
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    return {"content-type": "application/gzip", "content-digest": f"sha-256=:{digest}:"}


async def test_an_upload_must_be_the_bytes_its_url_and_digest_name(
    stack: Stack, api_server: str, example_package: Path
) -> None:
    data = build_archive(example_package)
    sha = sha256_of(data)
    headers = upload_headers(data)
    store = ArtifactStore(stack.settings.artifact_dir)
    async with client_of(stack, REGISTRAR) as api:
        tampered = data[:-1] + bytes([data[-1] ^ 1])
        with pytest.raises(RefusedError, match="digest-mismatch"):
            await api.put(f"/v1/artifacts/{sha}", tampered, headers)
        assert not store.path_for(sha).exists()
        with pytest.raises(
            InvalidPackageError, match="the URL names archive 000000000000, but Content-Digest"
        ):
            await api.put(f"/v1/artifacts/{'0' * 64}", data, headers)
        receipt = await api.put(f"/v1/artifacts/{sha}", data, headers)
        assert receipt == {"sha256": sha, "bytes": len(data), "new": True}
        assert store.path_for(sha).read_bytes() == data
        assert list(store.incoming().iterdir()) == [], "no scratch file is left behind"

        # a registration naming another model than the archive holds is refused
        wrong = stack.signers[REGISTRAR].governance(
            SNAPSHOT_REGISTER, {"model": "not-cc-fraud", "sha256": sha}, subject="not-cc-fraud"
        )
        with pytest.raises(PermissionDeniedError, match="the archive holds cc-fraud"):
            await api.post("/v1/snapshots", {"envelope": wrong.to_json()})


async def test_one_upload_at_a_time_per_principal(
    stack: Stack, api_server: str, example_package: Path
) -> None:
    data = build_archive(example_package)
    sha, headers = sha256_of(data), upload_headers(data)
    store = ArtifactStore(stack.settings.artifact_dir)
    release = asyncio.Event()

    async def slowly() -> AsyncIterator[bytes]:
        yield data[:1024]
        await release.wait()
        yield data[1024:]

    async with client_of(stack, REGISTRAR) as api, client_of(stack, APPROVER) as other:
        first = asyncio.create_task(api.put(f"/v1/artifacts/{sha}", slowly(), headers))  # type: ignore[arg-type]
        while not list(store.incoming().glob("*.upload")):  # the server is receiving it
            assert not first.done(), first
            await asyncio.sleep(0.05)
        with pytest.raises(RuntimeUnavailableError, match="registrar has an upload under way already"):
            await api.put(f"/v1/artifacts/{sha}", data, headers)
        assert (await other.put(f"/v1/artifacts/{sha}", data, headers))["new"] is True, (
            "another principal may"
        )
        release.set()
        assert (await first)["sha256"] == sha
    assert store.path_for(sha).read_bytes() == data and list(store.incoming().iterdir()) == []


async def test_lifecycle_upload_through_the_api(stack: Stack, api_server: str) -> None:
    require_sandbox()
    source = FIXTURES / "lifecycles" / "good" / "pinned_v1.py"
    refused = await stack.mlc("lifecycle", "upload", str(source), "--name", "Pinned", user=APPROVER, api=True)
    assert refused.returncode == 4 and "alice may not upload lifecycle code" in refused.stderr
    uploaded = await stack.mlc("lifecycle", "upload", str(source), "--name", "Pinned", user=AUTHOR, api=True)
    assert uploaded.returncode == 0, uploaded.stderr
    assert "uploaded Pinned version 1" in " ".join(uploaded.stdout.split())
    again = await stack.mlc("lifecycle", "upload", str(source), "--name", "Pinned", user=AUTHOR, api=True)
    assert "already has this source" in " ".join(again.stdout.split()), again.stderr
