"""A principal with their private key: makes the signed statements the CLI sends.

Used by the CLI, ``mlc dev``'s bootstrap, the demo and tests alike, so every statement
the platform verifies was made by this one piece of code.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mlc.contracts.lifecycle import LifecycleStatus, evidence_digest
from mlc.domain import Decision
from mlc.statements import (
    DECISION_TYPE,
    ROLLBACK_TYPE,
    STATEMENT_TYPE,
    DecisionPredicate,
    Envelope,
    RollbackPredicate,
    Statement,
    make_statement,
    seal,
)
from mlc.trust.governance import sign_governance
from mlc.trust.keys import key_id

DECISION_LIFETIME = timedelta(minutes=15)
"""A signed decision must reach the platform within this time (limits replay of a leaked one)."""


@dataclass(frozen=True)
class Signer:
    """Who signs (the principal name they are registered under) and with which key."""

    name: str
    key: Ed25519PrivateKey

    @property
    def key_id(self) -> str:
        """The fingerprint of the public key."""
        return key_id(self.key.public_key())

    def governance(self, action: str, args: dict[str, Any], *, subject: str | None = None) -> Envelope:
        """A signed governance statement (grant, key, policy, runtime, upload, registration)."""
        return sign_governance(
            self.key,
            signer=self.name,
            action=action,
            args=args,
            nonce=secrets.token_hex(16),
            issued_at=datetime.now(UTC),
            subject=subject,
        )

    def decision(
        self,
        status: LifecycleStatus,
        *,
        stage: str,
        decision: Decision,
        sha256: str,
        workflow_id: str,
        run_id: str,
        comment: str = "",
        issued_at: datetime | None = None,
        lifetime: timedelta = DECISION_LIFETIME,
    ) -> Envelope:
        """Sign a decision at ``stage`` of the run ``status`` describes, on the evidence it shows."""
        issued = issued_at or datetime.now(UTC)
        predicate = DecisionPredicate(
            model=status.model,
            version=status.version,
            stage=stage,
            decision=decision.value,
            workflow_id=workflow_id,
            run_id=run_id,
            evidence_sha256=evidence_digest(status, stage),
            comment=comment,
            signer=self.name,
            issued_at=issued,
            expires_at=issued + lifetime,
            nonce=secrets.token_hex(16),
        )
        statement = make_statement(
            subject=f"{status.model}@{status.version}",
            sha256=sha256,
            predicate_type=DECISION_TYPE,
            predicate=predicate,
        )
        return seal(statement, keyid=self.key_id, sign=self.key.sign)

    def rollback(
        self,
        *,
        model: str,
        stage: str,
        reason: str,
        version: int | None = None,
        sha256: str | None = None,
        issued_at: datetime | None = None,
        lifetime: timedelta = DECISION_LIFETIME,
    ) -> Envelope:
        """Sign a rollback of ``model`` in ``stage`` to ``version`` (None: the previous one).

        ``sha256`` (the named version's snapshot) binds the statement to that content; the
        subject is ``MODEL@VERSION`` then, else ``MODEL`` with no digest.
        """
        issued = issued_at or datetime.now(UTC)
        predicate = RollbackPredicate(
            model=model,
            stage=stage,
            version=version,
            reason=reason,
            signer=self.name,
            issued_at=issued,
            expires_at=issued + lifetime,
            nonce=secrets.token_hex(16),
        )
        statement = Statement.model_validate(
            {
                "_type": STATEMENT_TYPE,
                "subject": [
                    {
                        "name": f"{model}@{version}" if version is not None else model,
                        "digest": {"sha256": sha256} if sha256 else {},
                    }
                ],
                "predicateType": ROLLBACK_TYPE,
                "predicate": predicate.model_dump(mode="json"),
            }
        )
        return seal(statement, keyid=self.key_id, sign=self.key.sign)
