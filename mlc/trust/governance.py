"""Who may do what, derived only from verified, signed governance statements.

:class:`Governance` replays the trail's governance entries in order. Each must be signed
by an active key of a principal who, at that point, holds the role the action needs; the
first must be ``init`` by the installation's pinned trust root. An entry that fails any
check changes nothing, so whoever can write rows still cannot grant a role, add a key or
register a runtime: they would need an admin's private key.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from mlc.domain import Runtime
from mlc.errors import InvalidKeyError, RefusedError
from mlc.statements import (
    GOVERNANCE_TYPE,
    Envelope,
    GovernancePredicate,
    Statement,
    digest,
    make_statement,
    seal,
)
from mlc.trust.keys import key_id, parse_public_key, public_text, verify
from mlc.trust.policy import DEFAULT_POLICIES, StagePolicy

ADMIN = "admin"
INIT = "init"
KEY_ADD = "key.add"
KEY_REVOKE = "key.revoke"
ROLE_GRANT = "role.grant"
ROLE_REVOKE = "role.revoke"
POLICY_SET = "policy.set"
RUNTIME_ADD = "runtime.add"
RUNTIME_REMOVE = "runtime.remove"
LIFECYCLE_UPLOAD = "lifecycle.upload"
SNAPSHOT_REGISTER = "snapshot.register"
RUNTIME_KEY_ADD = "runtime.key.add"
"""Register an evidence key of a runtime (the key its worker signs results with)."""
RUNTIME_KEY_REVOKE = "runtime.key.revoke"
ADMIN_ACTIONS = {
    KEY_ADD,
    ROLE_GRANT,
    ROLE_REVOKE,
    POLICY_SET,
    RUNTIME_ADD,
    RUNTIME_REMOVE,
    RUNTIME_KEY_ADD,
    RUNTIME_KEY_REVOKE,
}


@dataclass
class Principal:
    """A person or automation: their keys (active and revoked) and roles."""

    name: str
    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    roles: set[str] = field(default_factory=set)

    def active_keys(self) -> dict[str, Ed25519PublicKey]:
        """Keys that may sign now."""
        return {k: v for k, v in self.keys.items() if k not in self.revoked}


@dataclass
class EvidenceKey:
    """A runtime's evidence key: results it signs count while it is not revoked."""

    runtime: str
    public: Ed25519PublicKey
    revoked: bool = False


@dataclass
class Governance:
    """The verified state: principals, keys, roles, policies, runtimes, uploads, registrants."""

    pinned_root: str | None
    """Key id of the installation's first admin; None accepts whatever ``init`` says (CLI hints only)."""
    author_role: str = "lifecycle-author"
    principals: dict[str, Principal] = field(default_factory=dict)
    policies: dict[str, StagePolicy] = field(default_factory=dict)
    runtimes: dict[str, Runtime] = field(default_factory=dict)
    uploads: dict[tuple[str, str], str] = field(default_factory=dict)
    """(lifecycle name, source sha256) -> uploader."""
    registrants: dict[str, str] = field(default_factory=dict)
    """snapshot sha256 -> who registered it."""
    evidence_keys: dict[str, EvidenceKey] = field(default_factory=dict)
    """key id -> the runtime whose worker signs results with it (see :mod:`mlc.trust.evidence`)."""
    nonces: set[str] = field(default_factory=set)
    initialized: bool = False

    # --- reading ------------------------------------------------------------------------

    def roles_of(self, name: str) -> set[str]:
        """Roles ``name`` holds now (empty when unknown)."""
        found = self.principals.get(name)
        return set(found.roles) if found else set()

    def policy(self, stage: str) -> StagePolicy:
        """The stage's signed policy, else the default, else an unprotected one-approver gate."""
        return self.policies.get(stage) or DEFAULT_POLICIES.get(stage) or StagePolicy(stage=stage)

    def signer_of(self, envelope: Envelope) -> Principal:
        """The principal whose active key signed ``envelope``, or RefusedError naming the failure."""
        if not envelope.signatures:
            raise RefusedError("the statement is not signed")
        message = envelope.signed_bytes()
        for signature in envelope.signatures:
            owner = self._owner(signature.keyid)
            if owner is None:
                raise RefusedError(f"unknown key {signature.keyid}: register it with `mlc key add`")
            if signature.keyid in owner.revoked:
                raise RefusedError(f"key {signature.keyid} of {owner.name} has been revoked")
            try:
                raw = base64.b64decode(signature.sig, validate=True)
            except (binascii.Error, ValueError):
                raise RefusedError("the signature is not base64") from None
            if verify(owner.keys[signature.keyid], raw, message):
                return owner
            raise RefusedError(f"bad signature: the statement was not signed by key {signature.keyid}")
        raise RefusedError("no valid signature")

    def _owner(self, keyid: str) -> Principal | None:
        return next((p for p in self.principals.values() if keyid in p.keys), None)

    # --- changing -----------------------------------------------------------------------

    def apply(self, envelope: Envelope) -> GovernancePredicate:
        """Verify a governance statement against the current state and apply it.

        Raises:
            RefusedError: bad signature, unknown/revoked key, missing role, replayed
                nonce, or arguments that do not fit the action; nothing changes then.
        """
        statement = _statement(envelope)
        try:
            predicate = GovernancePredicate.model_validate(statement.predicate)
        except ValidationError as exc:
            raise RefusedError(f"malformed governance statement: {exc}") from None
        if predicate.nonce in self.nonces:
            raise RefusedError(f"replayed statement (nonce {predicate.nonce} was used before)")
        if predicate.action == INIT:
            self._init(envelope, predicate)
        else:
            if not self.initialized:
                raise RefusedError("no trust root yet: run `mlc admin init` first")
            signer = self.signer_of(envelope)
            if signer.name != predicate.signer:
                raise RefusedError(f"the key that signed belongs to {signer.name}, not {predicate.signer}")
            self._authorize(signer, predicate)
            self._change(signer, predicate)
        self.nonces.add(predicate.nonce)
        return predicate

    def _init(self, envelope: Envelope, predicate: GovernancePredicate) -> None:
        if self.initialized:
            raise RefusedError("this installation already has a trust root (`mlc admin init` runs once)")
        name, public = _principal_key(predicate.args)
        kid = key_id(public)
        if self.pinned_root is not None and kid != self.pinned_root:
            raise RefusedError(f"the first admin key {kid} is not the pinned trust root {self.pinned_root}")
        sig_keys = [s.keyid for s in envelope.signatures]
        if sig_keys != [kid] or not verify(
            public, base64.b64decode(envelope.signatures[0].sig), envelope.signed_bytes()
        ):
            raise RefusedError("`init` must be signed by the key it registers")
        if predicate.signer != name:
            raise RefusedError(f"`init` registers {name} but says it was signed by {predicate.signer}")
        self.principals[name] = Principal(name=name, keys={kid: public}, roles={ADMIN})
        self.initialized = True

    def _authorize(self, signer: Principal, predicate: GovernancePredicate) -> None:
        action = predicate.action
        if action in ADMIN_ACTIONS:
            needed = ADMIN
        elif action == KEY_REVOKE:
            if predicate.args.get("principal") == signer.name:
                return  # anyone may revoke their own key
            needed = ADMIN
        elif action == LIFECYCLE_UPLOAD:
            needed = self.author_role
        elif action == SNAPSHOT_REGISTER:
            return  # any registered principal may register snapshots; who did is recorded
        else:
            raise RefusedError(f"unknown governance action {action!r}")
        if needed not in signer.roles:
            held = ", ".join(sorted(signer.roles)) or "none"
            raise RefusedError(f"{signer.name} may not {action}: it needs role {needed} (has {held})")

    def _change(self, signer: Principal, p: GovernancePredicate) -> None:
        args = p.args
        if p.action == KEY_ADD:
            name, public = _principal_key(args)
            kid = key_id(public)
            if self._owner(kid) is not None or kid in self.evidence_keys:
                raise RefusedError(f"key {kid} is already registered")
            self.principals.setdefault(name, Principal(name=name)).keys[kid] = public
        elif p.action == KEY_REVOKE:
            target = self._existing(args)
            kid = str(args.get("keyid", ""))
            if kid not in target.keys:
                raise RefusedError(f"{target.name} has no key {kid}")
            target.revoked.add(kid)
        elif p.action == ROLE_GRANT:
            self.principals.setdefault(_name(args), Principal(name=_name(args))).roles.add(_role(args))
        elif p.action == ROLE_REVOKE:
            target, role = self._existing(args), _role(args)
            if role not in target.roles:
                raise RefusedError(f"{target.name} does not hold role {role}")
            admins = [x for x in self.principals.values() if ADMIN in x.roles and x.active_keys()]
            if role == ADMIN and admins == [target]:
                raise RefusedError(f"{target.name} is the last admin; grant admin to someone else first")
            target.roles.discard(role)
        elif p.action == POLICY_SET:
            policy = _model(StagePolicy, args.get("policy"))
            self.policies[policy.stage] = policy
        elif p.action == RUNTIME_ADD:
            runtime = _model(Runtime, args.get("runtime"))
            if runtime.name in self.runtimes:
                raise RefusedError(f"runtime {runtime.name} already exists; remove it first")
            if args.get("evidence_key"):  # checked first: a refused entry changes nothing
                self._add_evidence_key(runtime.name, str(args["evidence_key"]))
            self.runtimes[runtime.name] = runtime
        elif p.action == RUNTIME_KEY_ADD:
            self._add_evidence_key(self._runtime(args), _name(args, "public_key"))
        elif p.action == RUNTIME_KEY_REVOKE:
            name, kid = self._runtime(args), _name(args, "keyid")
            found = self.evidence_keys.get(kid)
            if found is None or found.runtime != name:
                raise RefusedError(f"runtime {name} has no evidence key {kid}")
            found.revoked = True
        elif p.action == RUNTIME_REMOVE:
            if self.runtimes.pop(_name(args, "name"), None) is None:
                raise RefusedError(f"no runtime {args.get('name')!r}")
        elif p.action == LIFECYCLE_UPLOAD:
            self.uploads[(_name(args, "name"), _sha(args))] = signer.name
        elif p.action == SNAPSHOT_REGISTER:
            self.registrants.setdefault(_sha(args), signer.name)

    def _runtime(self, args: dict[str, Any]) -> str:
        name = _name(args, "runtime")
        if name not in self.runtimes:
            raise RefusedError(f"no runtime {name!r}; register it with `mlc runtime add` first")
        return name

    def _add_evidence_key(self, runtime: str, text: str) -> None:
        try:
            public = parse_public_key(text)
        except InvalidKeyError as exc:
            raise RefusedError(str(exc)) from None
        kid = key_id(public)
        if self._owner(kid) is not None or kid in self.evidence_keys:
            raise RefusedError(f"key {kid} is already registered")
        self.evidence_keys[kid] = EvidenceKey(runtime=runtime, public=public)

    def evidence_keys_of(self, runtime: str) -> dict[str, EvidenceKey]:
        """``runtime``'s evidence keys (active and revoked), by key id."""
        return {k: v for k, v in self.evidence_keys.items() if v.runtime == runtime}

    def _existing(self, args: dict[str, Any]) -> Principal:
        name = _name(args)
        if name not in self.principals:
            raise RefusedError(f"no principal {name!r}")
        return self.principals[name]


def _statement(envelope: Envelope) -> Statement:
    try:
        statement = envelope.statement()
    except ValueError as exc:
        raise RefusedError(str(exc)) from None
    if statement.predicate_type != GOVERNANCE_TYPE:
        raise RefusedError(f"not a governance statement ({statement.predicate_type})")
    return statement


def _name(args: dict[str, Any], key: str = "principal") -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise RefusedError(f"the statement needs a {key}")
    return value


def _role(args: dict[str, Any]) -> str:
    return _name(args, "role")


def _sha(args: dict[str, Any]) -> str:
    return _name(args, "sha256")


def _principal_key(args: dict[str, Any]) -> tuple[str, Ed25519PublicKey]:
    try:
        return _name(args), parse_public_key(_name(args, "public_key"))
    except InvalidKeyError as exc:
        raise RefusedError(str(exc)) from None


def _model(kind: type[Any], value: Any) -> Any:
    try:
        return kind.model_validate(value)
    except ValidationError as exc:
        raise RefusedError(f"invalid {kind.__name__}: {exc}") from None


def sign_governance(
    key: Ed25519PrivateKey,
    *,
    signer: str,
    action: str,
    args: dict[str, Any],
    nonce: str,
    issued_at: datetime,
    subject: str | None = None,
) -> Envelope:
    """A governance statement signed by ``signer``'s ``key``.

    Its subject is ``subject`` with ``args["sha256"]`` when the action is about content
    (a snapshot, lifecycle code), else the action with the digest of its arguments.
    """
    predicate = GovernancePredicate(action=action, args=args, signer=signer, issued_at=issued_at, nonce=nonce)
    statement = make_statement(
        subject=subject or action,
        sha256=str(args.get("sha256") or digest(args)),
        predicate_type=GOVERNANCE_TYPE,
        predicate=predicate,
    )
    return seal(statement, keyid=key_id(key.public_key()), sign=key.sign)


def registration_args(name: str, key: Ed25519PublicKey) -> dict[str, Any]:
    """``args`` of ``init`` and ``key.add``: the principal and its key as an ssh-ed25519 line."""
    return {"principal": name, "public_key": public_text(key)}
