"""Verifying the audit trail offline: the hash chain, every signature, every governance step.

Works on entries from the database or from an exported bundle alike, so an auditor who
trusts neither the database nor us needs only the bundle and the installation's trust
root key id. It reports the first broken link and what no longer matches.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from mlc.domain import StageTestReport, TestKind
from mlc.errors import RefusedError
from mlc.statements import Envelope, decision_of, is_rollback, rollback_of
from mlc.trust.entries import DECISION, DEPLOYMENT, GENESIS, GOVERNANCE, RUN, TEST_REPORT, Entry
from mlc.trust.evidence import check_evidence, check_observation, evidence_of, vouches_for
from mlc.trust.governance import Governance
from mlc.trust.keys import public_text

BUNDLE_FORMAT = "mlc-audit-bundle/v1"


@dataclass
class Verification:
    """What ``mlc audit verify`` found."""

    entries: int = 0
    signed: int = 0
    evidence: int = 0
    """Runtime-signed results (test reports, deploy results, observations) verified."""
    head: str = GENESIS
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the chain is whole and every signature verifies."""
        return not self.problems

    def summary(self) -> dict[str, Any]:
        """What ``mlc audit verify --json`` prints."""
        return {
            "ok": self.ok,
            "entries": self.entries,
            "signed": self.signed,
            "evidence": self.evidence,
            "head": self.head,
            "problems": self.problems,
        }


def verify_entries(
    entries: list[Entry], *, trust_root: str | None, author_role: str, anchor: tuple[int, str] | None = None
) -> Verification:
    """Recompute the chain and check every signed entry against the keys valid at its point.

    ``anchor`` (``seq``, ``hash``), e.g. the head of an earlier export, must still be in the
    chain: that catches entries removed from the end, which the chain alone cannot show.
    """
    result = Verification()
    state = Governance(pinned_root=trust_root, author_role=author_role)
    snapshots: dict[tuple[str, str], str] = {}  # (workflow id, run id) -> the sha256 it started on
    previous = GENESIS
    for expected_seq, entry in enumerate(entries, start=1):
        where = f"entry {entry.seq} ({_label(entry)})"
        if entry.seq != expected_seq:
            result.problems.append(f"entry {expected_seq} is missing: the next stored entry is {entry.seq}")
            break
        if entry.prev_hash != previous:
            result.problems.append(
                f"{where} does not link to entry {entry.seq - 1}: it names {entry.prev_hash[:16]}..., "
                f"but entry {entry.seq - 1} as stored hashes to {previous[:16]}...; "
                f"entry {entry.seq - 1} was changed"
            )
            break
        recomputed = entry.expected_hash()
        if recomputed != entry.hash:
            result.problems.append(
                f"{where} was changed after it was recorded: its content hashes to {recomputed[:16]}..., "
                f"the chain recorded {entry.hash[:16]}...{_what_changed(entry)}"
            )
            break
        problem = _check_signed(entry, state, snapshots)
        if problem:
            result.problems.append(f"{where}: {problem}")
            break
        result.signed += entry.envelope is not None
        result.evidence += _evidence_count(entry)
        result.entries += 1
        previous = entry.hash
        body = entry.data() if entry.kind == RUN else {}
        if body.get("event") == "started" and entry.workflow_id and entry.run_id:
            snapshots[(entry.workflow_id, entry.run_id)] = str(body.get("sha256"))
    result.head = previous
    if anchor is not None and result.ok:
        seq, expected = anchor
        found = next((e for e in entries if e.seq == seq), None)
        if found is None:
            result.problems.append(
                f"entry {seq} of the earlier export is gone: the trail now ends at {len(entries)}"
            )
        elif found.hash != expected:
            result.problems.append(
                f"entry {seq} no longer has the hash {expected[:16]}... the earlier export recorded"
            )
    return result


def _label(entry: Entry) -> str:
    subject = f", {entry.model}@{entry.version}" if entry.model else ""
    return f"{entry.kind}{subject}"


def _check_signed(entry: Entry, state: Governance, snapshots: dict[tuple[str, str], str]) -> str | None:
    """Verify a signed entry and that its stored body says what was signed."""
    try:
        envelope = entry.signed()
    except (ValidationError, ValueError) as exc:
        return f"its envelope is unreadable ({exc})"
    if entry.kind == GOVERNANCE:
        if envelope is None:
            return "a governance entry without a signature"
        try:
            predicate = state.apply(envelope)
        except (RefusedError, ValueError) as exc:
            return f"its governance statement does not verify: {exc}"
        body = entry.data()
        if body.get("action") != predicate.action or body.get("args") != predicate.args:
            return f"the stored action differs from the signed one ({predicate.action})"
        return None
    if entry.kind in (TEST_REPORT, DEPLOYMENT):
        return _check_evidence(entry, state, snapshots.get((entry.workflow_id or "", entry.run_id or "")))
    if envelope is None:
        return None
    if is_rollback(envelope):
        return _check_rollback(entry, envelope, state)
    try:
        signer = state.signer_of(envelope)
        _, claim = decision_of(envelope)
    except (RefusedError, ValueError) as exc:
        return f"its signature does not verify: {exc}"
    if entry.kind == DECISION:
        body = entry.data()
        signed = {
            "approver": signer.name,
            "stage": claim.stage,
            "decision": claim.decision,
            "comment": claim.comment,
        }
        for name, value in signed.items():
            if body.get(name) != value:
                return f"the stored {name} is {body.get(name)!r}, but the signed statement says {value!r}"
        if entry.nonce != claim.nonce:
            return "the stored nonce differs from the signed one"
    return None


def _check_evidence(entry: Entry, state: Governance, sha256: str | None) -> str | None:
    """Verify the runtime evidence a test report or deployment entry was recorded on.

    Every stored envelope must verify against the evidence keys valid at this point of
    the trail; every passing result of a report must be carried by one of them (a shadow
    verdict without numbers excepted: the inventory found nothing to compare with); a
    serving deployment's endpoint must be the one its runtime signed; test and deploy
    results must name the snapshot ``sha256`` the run started on. Entries from before
    signed evidence carry none and are not checked.
    """
    body = entry.data()
    if "evidence" not in body:
        return None
    run = {"workflow_id": entry.workflow_id or "", "run_id": entry.run_id or ""}
    try:
        if entry.kind == DEPLOYMENT:
            signed = Envelope.model_validate(body["evidence"])
            claim = check_evidence(
                signed,
                state,
                kind="deploy",
                **run,
                runtime=body.get("runtime"),
                deployment_id=body.get("id"),
                stage=body.get("stage"),
                snapshot_sha256=sha256,
            )
            endpoint = claim.results.get("endpoint") if isinstance(claim.results, dict) else None
            if endpoint and body.get("endpoint") != endpoint:
                stored = body.get("endpoint")
                return f"the stored endpoint is {stored!r}, but runtime {claim.runtime} signed {endpoint!r}"
            return None
        envelopes = [Envelope.model_validate(e) for e in body["evidence"]]
        stage = body.get("stage")
        claims = [
            check_observation(e, state, model=entry.model or "", stage=stage, **run)
            if evidence_of(e).kind == "traffic_observation"
            else check_evidence(e, state, kind=evidence_of(e).kind, stage=stage, **run)
            for e in envelopes
        ]
        for claim in claims:
            if claim.kind == "stage_tests" and sha256 is not None and claim.snapshot_sha256 != sha256:
                named = claim.snapshot_sha256[:12]
                return f"runtime {claim.runtime} signed tests of snapshot {named}..., not the run's"
        report = StageTestReport.model_validate(body.get("report"))
    except (RefusedError, ValidationError, ValueError) as exc:
        return f"its runtime evidence does not verify: {exc}"
    for result in report.results:
        if result.passed and not vouches_for(result, claims):
            if result.test is TestKind.SHADOW and not result.metrics:
                continue
            return f"the passing {result.test.value} result of {result.deployment_id} is signed by no runtime"
    return None


def _evidence_count(entry: Entry) -> int:
    """How many runtime-signed envelopes a (verified) entry carries."""
    if entry.kind not in (TEST_REPORT, DEPLOYMENT):
        return 0
    signed = entry.data().get("evidence")
    return len(signed) if isinstance(signed, list) else int(signed is not None)


def _check_rollback(entry: Entry, envelope: Envelope, state: Governance) -> str | None:
    """Verify a signed rollback decision and that its stored body says what was signed."""
    try:
        signer = state.signer_of(envelope)
        _, claim = rollback_of(envelope)
    except (RefusedError, ValueError) as exc:
        return f"its signature does not verify: {exc}"
    body = entry.data()
    signed = {"approver": signer.name, "stage": claim.stage, "decision": "rollback", "comment": claim.reason}
    for name, value in signed.items():
        if body.get(name) != value:
            return f"the stored {name} is {body.get(name)!r}, but the signed rollback says {value!r}"
    if claim.version is not None and body.get("version") != claim.version:
        return f"the stored version is {body.get('version')!r}, but the signed rollback says {claim.version}"
    if entry.nonce != claim.nonce:
        return "the stored nonce differs from the signed one"
    return None


def _what_changed(entry: Entry) -> str:
    """For a signed entry, name the stored field that no longer matches the signature."""
    try:
        envelope = entry.signed()
        if envelope is None or entry.kind != DECISION or is_rollback(envelope):
            return ""
        _, claim = decision_of(envelope)
        body = entry.data()
    except (ValidationError, ValueError):
        return "; its envelope was changed too"
    for name in ("stage", "decision", "comment"):
        if body.get(name) != getattr(claim, name):
            return f"; {name} is now {body.get(name)!r}, the signed statement says {getattr(claim, name)!r}"
    if body.get("approver") != claim.signer:
        return f"; approver is now {body.get('approver')!r}, the statement was signed by {claim.signer!r}"
    return ""


# --- export -------------------------------------------------------------------------------


def bundle_header(*, trust_root: str | None, author_role: str) -> dict[str, Any]:
    """The fields of an export that come before its entries."""
    return {
        "format": BUNDLE_FORMAT,
        "exported_at": datetime.now(UTC).isoformat(),
        "trust_root": trust_root,
        "author_role": author_role,
    }


def learn_keys(state: Governance, entry: Entry) -> None:
    """Apply ``entry``'s governance statement to ``state`` if it verifies: an export lists
    every key its governance entries registered (verifying replays them, so an auditor need
    not trust the list)."""
    envelope = entry.signed() if entry.kind == GOVERNANCE else None
    if envelope is not None:
        try:
            state.apply(envelope)
        except (RefusedError, ValueError):
            return


def bundle_keys(state: Governance, last: Entry | None) -> dict[str, Any]:
    """The fields of an export that come after its entries: its head, the people's public
    keys and the runtimes' evidence keys (those that signed test reports and deploy results)."""
    return {
        "head": {"seq": last.seq, "hash": last.hash} if last else None,
        "keys": {
            kid: {"principal": p.name, "public_key": public_text(key), "revoked": kid in p.revoked}
            for p in state.principals.values()
            for kid, key in p.keys.items()
        },
        "evidence_keys": {
            kid: {"runtime": k.runtime, "public_key": public_text(k.public), "revoked": k.revoked}
            for kid, k in state.evidence_keys.items()
        },
    }


def entries_of(data: dict[str, Any]) -> list[Entry]:
    """The entries of a bundle read back from JSON."""
    if data.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"not an audit bundle ({data.get('format')!r}); expected {BUNDLE_FORMAT}")
    return [Entry(**e) for e in data["entries"]]


CSV_COLUMNS = (
    "seq",
    "kind",
    "model",
    "version",
    "workflow_id",
    "run_id",
    "recorded_at",
    "signer_key",
    "body",
)


def to_csv(entries: list[Entry], *, header: bool = True) -> str:
    """One row per entry, for spreadsheets (verify with the JSON bundle, which keeps everything);
    ``header``: begin with the column names (an export streamed in batches writes them once)."""
    out = io.StringIO()
    writer = csv.writer(out)
    if header:
        writer.writerow([*CSV_COLUMNS, "prev_hash", "hash"])
    for e in entries:
        body = e.data()
        envelope = e.signed()
        writer.writerow(
            [
                e.seq,
                e.kind,
                e.model or "",
                e.version or "",
                e.workflow_id or "",
                e.run_id or "",
                body.get("recorded_at", ""),
                envelope.signatures[0].keyid if envelope and envelope.signatures else "",
                json.dumps(body, sort_keys=True),
                e.prev_hash,
                e.hash,
            ]
        )
    return out.getvalue()
