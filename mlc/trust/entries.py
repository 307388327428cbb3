"""An audit trail entry: its kinds, its stored fields and the hash chaining it to the one before.

What an entry is and how its hash is computed decide whether the trail verifies
(:mod:`mlc.trust.audit`); storing and reading entries is :mod:`mlc.store.trail`'s job.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from mlc.statements import Envelope, canonical

GENESIS = "0" * 64
"""``prev_hash`` of the first entry."""

GOVERNANCE = "governance"
RUN = "run"
DECISION = "decision"
TEST_REPORT = "test_report"
DEPLOYMENT = "deployment"
TRAFFIC = "traffic"
"""Which deployments answer a stable endpoint, from when, who or what caused the change."""
RECONCILER = "reconciler"
"""A runtime's reconciler workflow id held by a run no trusted worker started, and replaced."""
KINDS = (GOVERNANCE, RUN, DECISION, TEST_REPORT, DEPLOYMENT, TRAFFIC, RECONCILER)


@dataclass(frozen=True)
class Entry:
    """One trail entry as stored."""

    seq: int
    kind: str
    body: str
    prev_hash: str
    hash: str
    model: str | None = None
    version: int | None = None
    workflow_id: str | None = None
    run_id: str | None = None
    envelope: str | None = None
    nonce: str | None = None

    def data(self) -> dict[str, Any]:
        """The body as a dict."""
        value: dict[str, Any] = json.loads(self.body)
        return value

    def signed(self) -> Envelope | None:
        """The signed envelope, if a person signed this entry."""
        return Envelope.model_validate_json(self.envelope) if self.envelope else None

    def expected_hash(self) -> str:
        """The hash this entry must have given its content and its predecessor."""
        return entry_hash(
            seq=self.seq,
            kind=self.kind,
            model=self.model,
            version=self.version,
            workflow_id=self.workflow_id,
            run_id=self.run_id,
            body=self.body,
            envelope=self.envelope,
            nonce=self.nonce,
            prev_hash=self.prev_hash,
        )

    def to_json(self) -> dict[str, Any]:
        """Every stored field (what an export carries)."""
        return {
            "seq": self.seq,
            "kind": self.kind,
            "model": self.model,
            "version": self.version,
            "workflow_id": self.workflow_id,
            "run_id": self.run_id,
            "body": self.body,
            "envelope": self.envelope,
            "nonce": self.nonce,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


def entry_hash(**fields: Any) -> str:
    """sha256 over the canonical JSON of an entry's fields (hash excluded)."""
    return hashlib.sha256(canonical(fields)).hexdigest()
