"""Governance replay without servers: who may change what, and what a forged statement gets."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mlc.domain import Runtime
from mlc.errors import InvalidKeyError, RefusedError
from mlc.statements import Envelope
from mlc.trust import governance as g
from mlc.trust.keys import create_key, key_id, load_private_key, parse_public_key, public_text
from mlc.trust.signer import Signer


def signer(name: str) -> Signer:
    return Signer(name, Ed25519PrivateKey.generate())


def founded() -> tuple[g.Governance, Signer]:
    root = signer("root")
    state = g.Governance(pinned_root=root.key_id)
    state.apply(root.governance(g.INIT, g.registration_args("root", root.key.public_key())))
    return state, root


def test_init_must_be_the_pinned_key_and_happens_once() -> None:
    root, intruder = signer("root"), signer("intruder")
    state = g.Governance(pinned_root=root.key_id)
    with pytest.raises(RefusedError, match="not the pinned trust root"):
        state.apply(intruder.governance(g.INIT, g.registration_args("intruder", intruder.key.public_key())))
    state.apply(root.governance(g.INIT, g.registration_args("root", root.key.public_key())))
    with pytest.raises(RefusedError, match="already has a trust root"):
        state.apply(root.governance(g.INIT, g.registration_args("root", root.key.public_key())))
    assert state.roles_of("root") == {"admin"} and "intruder" not in state.principals


def test_only_admins_grant_and_nobody_signs_for_someone_else() -> None:
    state, root = founded()
    alice = signer("alice")
    state.apply(root.governance(g.KEY_ADD, g.registration_args("alice", alice.key.public_key())))
    with pytest.raises(RefusedError, match="alice may not role.grant: it needs role admin"):
        state.apply(alice.governance(g.ROLE_GRANT, {"principal": "alice", "role": "admin"}))
    pretending = Signer("root", alice.key)  # alice's key, claiming to be root
    with pytest.raises(RefusedError, match="belongs to alice, not root"):
        state.apply(pretending.governance(g.ROLE_GRANT, {"principal": "alice", "role": "admin"}))
    assert state.roles_of("alice") == set()


def test_unknown_revoked_and_replayed_statements_are_refused() -> None:
    state, root = founded()
    bob = signer("bob")
    with pytest.raises(RefusedError, match="unknown key"):
        state.apply(bob.governance(g.ROLE_GRANT, {"principal": "bob", "role": "approver"}))
    grant = root.governance(g.KEY_ADD, g.registration_args("bob", bob.key.public_key()))
    state.apply(grant)
    with pytest.raises(RefusedError, match="replayed statement"):
        state.apply(grant)
    state.apply(root.governance(g.KEY_REVOKE, {"principal": "bob", "keyid": bob.key_id}))
    with pytest.raises(RefusedError, match="has been revoked"):
        state.apply(bob.governance(g.KEY_REVOKE, {"principal": "bob", "keyid": bob.key_id}))


def test_a_changed_payload_breaks_the_signature() -> None:
    state, root = founded()
    honest = root.governance(g.ROLE_GRANT, {"principal": "bob", "role": "approver"})
    body = honest.body().replace(b'"approver"', b'"admin"')
    tampered = Envelope.model_validate({**honest.to_json(), "payload": base64.b64encode(body).decode()})
    with pytest.raises(RefusedError, match="bad signature"):
        state.apply(tampered)
    assert state.roles_of("bob") == set()


def test_runtimes_policies_and_the_last_admin() -> None:
    state, root = founded()
    state.apply(
        root.governance(g.RUNTIME_ADD, {"runtime": Runtime(name="r1", stage="DEV").model_dump(mode="json")})
    )
    with pytest.raises(RefusedError, match="already exists"):
        state.apply(
            root.governance(
                g.RUNTIME_ADD, {"runtime": Runtime(name="r1", stage="SIT").model_dump(mode="json")}
            )
        )
    assert state.runtimes["r1"].stage == "DEV"
    assert state.policy("PROD").protected and state.policy("PROD").admitted_by == "UAT"
    with pytest.raises(RefusedError, match="last admin"):
        state.apply(root.governance(g.ROLE_REVOKE, {"principal": "root", "role": "admin"}))


def test_key_files_are_private_and_openssh_keys_work(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "key.pem"
    key = create_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(InvalidKeyError, match="already exists"):
        create_key(path)
    ssh = tmp_path / "id_ed25519"
    ssh.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    assert key_id(load_private_key(ssh).public_key()) == key_id(key.public_key())
    line = public_text(key.public_key(), "alice@laptop")
    assert line.startswith("ssh-ed25519 ") and key_id(parse_public_key(line)) == key_id(key.public_key())
    with pytest.raises(InvalidKeyError, match="not a public key"):
        parse_public_key("ssh-rsa AAAAB3NzaC1yc2E nope")
