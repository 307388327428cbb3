"""Signed statements: in-toto Statements in DSSE envelopes, signed with Ed25519.

DSSE (the envelope of in-toto attestations and Sigstore) signs ``PAE(type, body)``, so a
signature can never be replayed as a signature over another payload type. Auditors can
check our trail with standard in-toto tooling instead of trusting ours.

Only pydantic and the standard library are imported here (keys are passed in as
callables and verified elsewhere), so workflow code can decode an envelope inside
Temporal's sandbox to refuse obvious misfits before any activity runs. The format sits
below the activity contracts, whose payloads carry envelopes; signing and verifying them
is :mod:`mlc.trust`'s job.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
DECISION_TYPE = "urn:mlc:predicate:decision:v1"
"""predicateType of an approval/rejection at a gate."""
GOVERNANCE_TYPE = "urn:mlc:predicate:governance:v1"
"""predicateType of a change to principals, keys, roles, policies, runtimes, uploads, snapshots."""
GRANT_TYPE = "urn:mlc:predicate:runtime-grant:v1"
"""predicateType of the platform's permission for one runtime action (deploy, batch, undeploy)."""
ROLLBACK_TYPE = "urn:mlc:predicate:rollback:v1"
"""predicateType of a person's decision to put a previous version back behind a stage's endpoints."""


def canonical(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no spaces, UTF-8 (what digests and chains hash)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(value: Any) -> str:
    """sha256 hex of ``value``'s canonical JSON."""
    return hashlib.sha256(canonical(value)).hexdigest()


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class Signature(_Strict):
    """One DSSE signature: which key, and the base64 signature."""

    keyid: str
    sig: str


class Envelope(_Strict):
    """A DSSE envelope exactly as the DSSE spec names its fields."""

    payload: str
    """base64 of the statement's JSON bytes."""
    payload_type: str = Field(alias="payloadType")
    signatures: tuple[Signature, ...]

    def to_json(self) -> dict[str, Any]:
        """The spec's JSON form (``payloadType``), for files, signals and exports."""
        return self.model_dump(mode="json", by_alias=True)

    def body(self) -> bytes:
        """The signed payload bytes (refuses bad base64 with a readable error)."""
        try:
            return base64.b64decode(self.payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"the envelope's payload is not base64: {exc}") from None

    def signed_bytes(self) -> bytes:
        """PAE of this envelope: the bytes each signature must verify against."""
        return pae(self.payload_type, self.body())

    def statement(self) -> Statement:
        """Decode the statement (no signature check: callers verify separately)."""
        if self.payload_type != PAYLOAD_TYPE:
            raise ValueError(f"payloadType must be {PAYLOAD_TYPE}, not {self.payload_type!r}")
        try:
            return Statement.model_validate_json(self.body())
        except ValidationError as exc:
            raise ValueError(f"the envelope does not hold a valid statement: {exc}") from None


class Subject(_Strict):
    """What a statement is about: a name and its sha256."""

    name: str
    digest: dict[str, str]


class Statement(_Strict):
    """An in-toto Statement v1."""

    type_: str = Field(default=STATEMENT_TYPE, alias="_type")
    subject: tuple[Subject, ...]
    predicate_type: str = Field(alias="predicateType")
    predicate: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The spec's JSON form."""
        return self.model_dump(mode="json", by_alias=True)


class DecisionPredicate(_Strict):
    """A person's decision at a gate, bound to one run, one snapshot and the evidence shown."""

    model: str
    version: int
    stage: str
    decision: str = Field(pattern="^(approved|rejected)$")
    workflow_id: str
    run_id: str
    evidence_sha256: str
    """``digest()`` of the stage's test report as the approver saw it (``digest(None)`` if none)."""
    comment: str = ""
    signer: str
    """The principal the signer says they are; must own the signing key."""
    issued_at: datetime
    expires_at: datetime
    nonce: str = Field(min_length=16, max_length=64)


class RollbackPredicate(_Strict):
    """A person's decision to roll a model back in one stage, with the reason.

    ``version`` None means "the version that answered the stage's stable endpoints before
    the current one", which the trusted ``verify_rollback`` activity resolves from the
    audit trail; a named version must have answered that stage before.
    """

    model: str
    stage: str
    version: int | None = Field(default=None, ge=1)
    reason: str = Field(min_length=1, max_length=500)
    signer: str
    """The principal the signer says they are; must own the signing key."""
    issued_at: datetime
    expires_at: datetime
    nonce: str = Field(min_length=16, max_length=64)

    @field_validator("reason")
    @classmethod
    def _said(cls, reason: str) -> str:
        if not reason.strip():
            raise ValueError("a rollback needs a reason (it is kept in the audit trail)")
        return reason


class GovernancePredicate(_Strict):
    """A change to who may do what: see :mod:`mlc.trust.governance` for the actions."""

    action: str
    args: dict[str, Any]
    signer: str
    issued_at: datetime
    nonce: str = Field(min_length=16, max_length=64)


def make_statement(*, subject: str, sha256: str, predicate_type: str, predicate: BaseModel) -> Statement:
    """A statement about one subject."""
    return Statement.model_validate(
        {
            "_type": STATEMENT_TYPE,
            "subject": [{"name": subject, "digest": {"sha256": sha256}}],
            "predicateType": predicate_type,
            "predicate": predicate.model_dump(mode="json"),
        }
    )


def seal(statement: Statement, *, keyid: str, sign: Any) -> Envelope:
    """Wrap ``statement`` in an envelope signed by ``sign(bytes) -> bytes`` under ``keyid``."""
    body = canonical(statement.to_json())
    signature = sign(pae(PAYLOAD_TYPE, body))
    return Envelope.model_validate(
        {
            "payload": base64.b64encode(body).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"keyid": keyid, "sig": base64.b64encode(signature).decode()}],
        }
    )


def decision_of(envelope: Envelope) -> tuple[Statement, DecisionPredicate]:
    """Decode a decision envelope (structure only) or raise ValueError saying what is wrong."""
    statement = envelope.statement()
    if statement.predicate_type != DECISION_TYPE:
        raise ValueError(f"not a decision statement (predicateType {statement.predicate_type})")
    try:
        return statement, DecisionPredicate.model_validate(statement.predicate)
    except ValidationError as exc:
        raise ValueError(f"the decision statement is malformed: {exc}") from None


def rollback_of(envelope: Envelope) -> tuple[Statement, RollbackPredicate]:
    """Decode a rollback envelope (structure only) or raise ValueError saying what is wrong."""
    statement = envelope.statement()
    if statement.predicate_type != ROLLBACK_TYPE:
        raise ValueError(f"not a rollback statement (predicateType {statement.predicate_type})")
    try:
        return statement, RollbackPredicate.model_validate(statement.predicate)
    except ValidationError as exc:
        raise ValueError(f"the rollback statement is malformed: {exc}") from None


def is_rollback(envelope: Envelope) -> bool:
    """True when ``envelope`` holds a rollback statement (of whatever validity)."""
    try:
        return envelope.statement().predicate_type == ROLLBACK_TYPE
    except ValueError:
        return False
