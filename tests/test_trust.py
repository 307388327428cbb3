"""Trust, end to end on real Temporal and PostgreSQL: forged, replayed, expired and
self-approved decisions are refused with a message and leave nothing behind; protected
stages refuse without verified approvals whatever the spec or lifecycle code says; grants
need an admin; the trail is append-only for workers and `mlc audit verify` finds edits."""

from __future__ import annotations

import asyncio
import csv as csv_module
import io
import json
import os
import shutil
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from temporalio.client import WorkflowFailureError, WorkflowHandle, WorkflowUpdateFailedError

from cli import admin
from cli.registration import register_package
from cli.stack.devstack import temporal_cli
from mlc.artifacts import ArtifactStore
from mlc.contracts.lifecycle import SignedDecision
from mlc.domain import (
    ApprovalGate,
    Decision,
    DeploymentState,
    LifecycleSpec,
    ModelSnapshot,
    StageSpec,
    TestKind,
)
from mlc.errors import InvalidKeyError
from mlc.lifecycle_client import read_status
from mlc.statements import Envelope
from mlc.store import audit, deployments, trail
from mlc.trust import evidence
from mlc.trust.keys import key_id, public_text
from mlc.trust.policy import StagePolicy
from mlc.trust.signer import Signer
from tests.conftest import ADMIN, APPROVER, AUTHOR, FIXTURES, REGISTRAR, Stack
from tests.lifecycle_helpers import wait_for, wait_for_gate
from workers.sandbox import SandboxedWorker

DEV_GATE = LifecycleSpec(stages=(StageSpec(name="DEV", tests=(TestKind.SMOKE,), gate=ApprovalGate()),))


def one_line(text: str) -> str:
    return " ".join(text.split())


async def at_dev_gate(
    stack: Stack, snap: ModelSnapshot, spec: LifecycleSpec = DEV_GATE
) -> WorkflowHandle[Any, Any]:
    await stack.add_local_runtimes(("DEV",))
    handle = await stack.start(snap, spec=spec)
    await wait_for_gate(handle, "DEV")
    return handle


async def sign(
    stack: Stack, signer: Signer, handle: WorkflowHandle[Any, Any], snap: ModelSnapshot, **changes: Any
) -> Envelope:
    """A decision at DEV as ``signer`` would sign it, with some fields changed."""
    status = await read_status(handle)
    assert status is not None
    fields: dict[str, Any] = {
        "stage": "DEV",
        "decision": Decision.APPROVED,
        "sha256": snap.sha256,
        "workflow_id": handle.id,
        "run_id": (await handle.describe()).run_id,
        **changes,
    }
    return signer.decision(status, **fields)


async def refused(handle: WorkflowHandle[Any, Any], envelope: Envelope, update: str = "approve") -> str:
    with pytest.raises(WorkflowUpdateFailedError) as failure:
        await handle.execute_update(update, SignedDecision(envelope=envelope))
    cause = failure.value.cause
    return str(getattr(cause, "message", cause))


async def test_forged_and_misbound_decisions_are_refused_and_nothing_is_recorded(
    stack: Stack, example_package: Path
) -> None:
    snap = await stack.register(example_package)
    handle = await at_dev_gate(stack, snap)
    ref = f"{snap.model}@{snap.version}"
    bob = await stack.add_principal("bob", "approver")
    mallory = Signer("mallory", Ed25519PrivateKey.generate())

    cli = await stack.mlc("approve", ref, "--stage", "DEV", user="mallory")
    assert cli.returncode == 4 and "is not registered" in cli.stderr

    as_alice_without_key = await sign(stack, Signer(APPROVER, mallory.key), handle, snap)
    assert "unknown key" in await refused(handle, as_alice_without_key)
    as_alice_with_bobs_key = await sign(stack, Signer(APPROVER, bob.key), handle, snap)
    assert "belongs to bob, not alice" in await refused(handle, as_alice_with_bobs_key)

    alice = stack.signers[APPROVER]
    other_sha = await sign(stack, alice, handle, snap, sha256="f" * 64)
    assert "the statement is for" in await refused(handle, other_sha)
    other_run = await sign(stack, alice, handle, snap, run_id="00000000-0000-0000-0000-000000000000")
    assert "not this run" in await refused(handle, other_run)
    stale = await sign(stack, alice, handle, snap, issued_at=datetime.now(UTC) - timedelta(hours=1))
    assert "expired" in await refused(handle, stale)
    approve_as_reject = await sign(stack, alice, handle, snap, decision=Decision.REJECTED)
    assert "send it as that decision" in await refused(handle, approve_as_reject)
    no_role = await sign(stack, stack.signers[REGISTRAR], handle, snap)
    assert "registrar may not decide at DEV" in await refused(handle, no_role)

    await handle.signal("decide", {"envelope": as_alice_with_bobs_key.to_json()})
    status = await wait_for(handle, lambda s: bool(s.refused), what="the refused signal")
    assert "belongs to bob, not alice" in status.refused[0]

    assert await audit.read_decisions(stack.pool, snap.model, snap.version) == []
    assert status.decisions == () and status.pending_gate is not None

    approved = await stack.mlc("approve", ref, "--stage", "DEV", "--comment", "fine")
    assert approved.returncode == 0, approved.stderr
    await handle.result()
    decisions = await audit.read_decisions(stack.pool, snap.model, snap.version)
    assert [(d["approver"], d["decision"], d["key_id"]) for d in decisions] == [
        (APPROVER, "approved", alice.key_id)
    ]


async def test_replayed_statement_and_revoked_key_are_refused(stack: Stack, example_package: Path) -> None:
    root = stack.signers[ADMIN]
    await admin.set_policy(stack.pool, stack.settings, root, StagePolicy(stage="DEV", min_approvals=2))
    bob = await stack.add_principal("bob", "approver")
    await stack.add_principal("carol", "approver")
    snap = await stack.register(example_package)
    handle = await at_dev_gate(stack, snap)
    ref = f"{snap.model}@{snap.version}"

    first = await sign(stack, stack.signers[APPROVER], handle, snap)
    record = await handle.execute_update("approve", SignedDecision(envelope=first))
    assert record["approver"] == APPROVER if isinstance(record, dict) else record.approver == APPROVER
    gate = (
        await wait_for(handle, lambda s: s.pending_gate is not None and s.pending_gate.approved_by)
    ).pending_gate
    assert gate is not None and gate.approved_by == (APPROVER,) and gate.needed == 2

    assert "replayed statement" in await refused(handle, first)

    before_revocation = await sign(stack, bob, handle, snap)
    await admin.revoke_key(stack.pool, stack.settings, root, "bob", bob.key_id)
    assert "has been revoked" in await refused(handle, before_revocation)
    revoked_cli = await stack.mlc("approve", ref, "--stage", "DEV", user="bob")
    assert revoked_cli.returncode == 4 and "has been revoked" in revoked_cli.stderr

    done = await stack.mlc("approve", ref, "--stage", "DEV", user="carol")
    assert done.returncode == 0, done.stderr
    await handle.result()
    decisions = await audit.read_decisions(stack.pool, snap.model, snap.version)
    assert [d["approver"] for d in decisions] == [APPROVER, "carol"]


async def test_segregation_of_duties_and_specs_only_narrow(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    alice = stack.signers[APPROVER]
    snap, _ = await register_package(
        stack.pool,
        ArtifactStore(stack.settings.artifact_dir),
        example_package,
        signer=alice,
        settings=stack.settings,
    )
    await stack.add_principal("bob", "approver")
    loose = LifecycleSpec(
        stages=(
            StageSpec(
                name="DEV", tests=(TestKind.SMOKE,), gate=ApprovalGate(approvers=("role:approver", REGISTRAR))
            ),
        )
    )
    handle = await at_dev_gate(stack, snap, loose)
    ref = f"{snap.model}@{snap.version}"
    gate = (await read_status(handle)).pending_gate
    assert gate is not None and gate.approvers == ("bob",), "alice registered it; registrar lacks the role"

    own = await stack.mlc("approve", ref, "--stage", "DEV")
    assert own.returncode == 4
    assert "alice registered this snapshot and may not approve it" in one_line(own.stderr)
    loosen = await stack.mlc("approve", ref, "--stage", "DEV", user=REGISTRAR)
    assert loosen.returncode == 4 and "the stage policy allows role:approver" in one_line(loosen.stderr)
    ok = await stack.mlc("approve", ref, "--stage", "DEV", user="bob")
    assert ok.returncode == 0, ok.stderr
    await handle.result()

    copy = tmp_path / "v2"
    shutil.copytree(example_package, copy)
    (copy / "score.py").write_text((copy / "score.py").read_text() + "\n# v2\n")
    second = await stack.register(copy)
    narrow = LifecycleSpec(
        stages=(StageSpec(name="DEV", tests=(TestKind.SMOKE,), gate=ApprovalGate(approvers=("bob",))),)
    )
    spec_file = tmp_path / "narrow.json"
    spec_file.write_text(narrow.model_dump_json())
    second_ref = f"{second.model}@{second.version}"
    started = await stack.mlc(
        "lifecycle", "start", second_ref, "--spec", str(spec_file), "--json", user="bob"
    )
    assert started.returncode == 0, started.stderr
    handle = stack.client.get_workflow_handle(json.loads(started.stdout)["workflow_id"])
    await wait_for_gate(handle, "DEV")
    other = await stack.mlc("approve", second_ref, "--stage", "DEV")
    assert other.returncode == 4
    assert "alice is not among this run's approvers at DEV: bob" in one_line(other.stderr)
    starter = await stack.mlc("approve", second_ref, "--stage", "DEV", user="bob")
    assert starter.returncode == 4
    assert "bob started this lifecycle and may not approve it" in one_line(starter.stderr)
    await handle.terminate("test over")


async def test_a_spec_without_gates_cannot_reach_prod(stack: Stack, example_package: Path) -> None:
    snap = await stack.register(example_package)
    await stack.add_local_runtimes(("PROD",))
    handle = await stack.start(snap, spec=LifecycleSpec(stages=(StageSpec(name="PROD"),)))
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    message = str(failure.value.cause)
    assert "PROD is protected" in message and "signed approval(s) at UAT" in message, message
    assert await deployments.read_deployments(stack.pool, model=snap.model, live_only=False) == []


async def test_uploaded_code_that_skips_approval_cannot_deploy_to_prod(
    stack: Stack, lifecycles: SandboxedWorker, example_package: Path
) -> None:
    """The code runs on the real sandboxed lifecycle worker; the main worker refuses PROD."""
    snap = await stack.register(example_package)
    await stack.add_local_runtimes(("DEV", "PROD"))
    uploaded = await stack.mlc(
        "lifecycle", "upload", str(FIXTURES / "lifecycles" / "hostile" / "skips_approval.py"), user=AUTHOR
    )
    assert uploaded.returncode == 0, uploaded.stderr
    handle = await stack.start(snap, workflow="SkipsApproval")
    info = await handle.describe()
    await wait_for(handle, lambda s: s.stage == "DEV" and any(d.stage == "DEV" for d in s.deployments))

    # Whoever can write rows forges approvals while the code sleeps: an unsigned one and one
    # signed by a key nobody registered. Neither may count.
    body = {"stage": "UAT", "decision": "approved", "approver": APPROVER, "comment": "forged"}
    await trail.append(
        stack.pool,
        trail.DECISION,
        body,
        model=snap.model,
        version=snap.version,
        workflow_id=handle.id,
        run_id=info.run_id,
    )
    status = await read_status(handle)
    assert status is not None
    forged = Signer(APPROVER, Ed25519PrivateKey.generate()).decision(
        status,
        stage="UAT",
        decision=Decision.APPROVED,
        sha256=snap.sha256,
        workflow_id=handle.id,
        run_id=info.run_id,
    )
    await trail.append(
        stack.pool,
        trail.DECISION,
        body,
        envelope=forged,
        model=snap.model,
        version=snap.version,
        workflow_id=handle.id,
        run_id=info.run_id,
        nonce="f" * 32,
    )

    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    message = str(failure.value.cause)
    assert "PROD is protected" in message and "verified: none" in message and "unknown key" in message, (
        message
    )
    prod = [
        d
        for d in await deployments.read_deployments(stack.pool, model=snap.model, live_only=False)
        if d.stage == "PROD"
    ]
    assert prod == []


async def test_grants_and_runtimes_need_an_admin(stack: Stack) -> None:
    governance_before = await trail.read_entries(stack.pool, kinds=(trail.GOVERNANCE,))
    grant = await stack.mlc("user", "grant", "eve", "--role", "approver")
    assert grant.returncode == 4
    assert "alice may not role.grant: it needs role admin" in one_line(grant.stderr)
    rogue = await stack.mlc("runtime", "add", "rogue", "--stage", "PROD")
    assert rogue.returncode == 4 and "needs role admin" in one_line(rogue.stderr)
    assert await trail.read_entries(stack.pool, kinds=(trail.GOVERNANCE,)) == governance_before
    assert (await stack.pool.fetchval("SELECT count(*) FROM runtimes")) == 0

    # A row signed by alice granting herself admin, written straight into the trail, counts for nothing.
    selfish = stack.signers[APPROVER].governance("role.grant", {"principal": APPROVER, "role": "admin"})
    await trail.append(
        stack.pool, trail.GOVERNANCE, {"action": "role.grant"}, envelope=selfish, nonce="e" * 32
    )
    state = await admin.state(stack.pool, stack.settings)
    assert "admin" not in state.roles_of(APPROVER)
    verified = await stack.mlc("audit", "verify")
    assert verified.returncode == 4 and "does not verify" in one_line(verified.stdout)

    granted = await stack.mlc("user", "grant", "eve", "--role", "approver", user=ADMIN)
    assert granted.returncode == 0, granted.stderr
    listing = json.loads((await stack.mlc("user", "list", "--json")).stdout)
    assert {"name": "eve", "roles": ["approver"], "keys": [], "revoked_keys": []} in listing


async def test_openssh_keys_and_signed_statements_for_automation(stack: Stack, example_package: Path) -> None:
    key = Ed25519PrivateKey.generate()
    stack.key_file("dora").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    added = await stack.mlc("key", "add", "dora", public_text(key.public_key(), "dora@laptop"), user=ADMIN)
    assert added.returncode == 0, added.stderr
    assert (await stack.mlc("user", "grant", "dora", "--role", "approver", user=ADMIN)).returncode == 0

    snap = await stack.register(example_package)
    handle = await at_dev_gate(stack, snap)
    printed = await stack.mlc(
        "approve", f"{snap.model}@{snap.version}", "--stage", "DEV", "--print-statement", user="dora"
    )
    assert printed.returncode == 0, printed.stderr
    assert await audit.read_decisions(stack.pool, snap.model, snap.version) == [], "printing sends nothing"

    proc = await asyncio.create_subprocess_exec(
        temporal_cli(),
        "workflow",
        "signal",
        "--address",
        stack.settings.temporal_address,
        "--workflow-id",
        handle.id,
        "--name",
        "decide",
        "--input",
        printed.stdout.strip(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    await handle.result()
    decisions = await audit.read_decisions(stack.pool, snap.model, snap.version)
    assert [d["approver"] for d in decisions] == ["dora"]


async def test_trail_is_append_only_and_verify_pinpoints_edits(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    snap = await stack.register(example_package)
    handle = await at_dev_gate(stack, snap)
    ref = f"{snap.model}@{snap.version}"
    assert (await stack.mlc("approve", ref, "--stage", "DEV", "--comment", "looks fine")).returncode == 0
    await handle.result()

    ok = await stack.mlc("audit", "verify", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"], ok.stdout
    bundle = tmp_path / "trail.json"
    assert (await stack.mlc("audit", "export", "--format", "json", "--output", str(bundle))).returncode == 0
    csv = await stack.mlc("audit", "export", "--format", "csv")
    rows = [r for r in csv_module.reader(io.StringIO(csv.stdout)) if r]
    assert len(rows) == 1 + len(await trail.read_entries(stack.pool)) and rows[0][:2] == ["seq", "kind"]

    assert stack.worker_pool is not None
    for sql in ("UPDATE audit_log SET body = body", "DELETE FROM audit_log", "TRUNCATE audit_log"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await stack.worker_pool.execute(sql)
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await stack.pool.execute("UPDATE audit_log SET body = body WHERE seq = 1")

    head = json.loads(bundle.read_text())["head"]
    async with stack.pool.acquire() as conn:  # a superuser drops the newest entry
        await conn.execute("SET session_replication_role = replica")
        await conn.execute("DELETE FROM audit_log WHERE seq = $1", head["seq"])
        await conn.execute("SET session_replication_role = DEFAULT")
    shorter = await stack.mlc("audit", "verify")
    assert shorter.returncode == 0, "a truncated chain is still a valid chain..."
    anchored = await stack.mlc("audit", "verify", "--anchor", f"{head['seq']}:{head['hash']}")
    assert anchored.returncode == 4, "...which the head of an earlier export exposes"
    assert f"entry {head['seq']} of the earlier export is gone" in one_line(anchored.stdout)

    decision = (await trail.read_entries(stack.pool, kinds=(trail.DECISION,)))[0]
    async with stack.pool.acquire() as conn:  # a superuser can switch triggers off: verify still catches it
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(
            "UPDATE audit_log SET body = replace(body, 'looks fine', 'forged') WHERE seq = $1", decision.seq
        )
        await conn.execute("SET session_replication_role = DEFAULT")
    broken = await stack.mlc("audit", "verify")
    assert broken.returncode == 4
    text = one_line(broken.stdout)
    assert f"entry {decision.seq} (decision, {ref}) was changed after it was recorded" in text, text
    assert "comment is now 'forged', the signed statement says 'looks fine'" in text, text

    offline_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLC_", "TEMPORAL_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mlc",
        "--home",
        str(tmp_path / "auditor"),
        "audit",
        "verify",
        "--bundle",
        str(bundle),
        "--trust-root",
        stack.settings.trust_root or "",
        env=offline_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "audit trail verified" in out.decode()
    assert DeploymentState.SERVING.value in bundle.read_text()


def test_an_evidence_key_file_someone_else_could_have_put_there_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    made = evidence.evidence_key(home, "local-dev")  # created: 0600, this process's
    assert key_id(evidence.evidence_key(home, "local-dev").public_key()) == key_id(made.public_key())
    path = evidence.evidence_key_path(home, "local-dev")
    other = tmp_path / "other.pem"
    shutil.copy(path, other)
    path.unlink()
    path.symlink_to(other)
    with pytest.raises(InvalidKeyError, match="is not a key file"):
        evidence.evidence_key(home, "local-dev")
    path.unlink()
    shutil.copy(other, path)
    path.chmod(0o644)
    with pytest.raises(InvalidKeyError, match="chmod 600"):
        evidence.evidence_key(home, "local-dev")
    path.chmod(0o600)
    os.chown(path, 65534, 65534)
    with pytest.raises(InvalidKeyError, match="owner uid 65534"):
        evidence.evidence_key(home, "local-dev")
