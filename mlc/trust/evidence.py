"""Runtime evidence: results a runtime worker signs with its runtime's evidence key.

Test reports, deploy results and traffic observations come back to workflows from
runtime task queues, which anyone holding a Temporal client could poll and answer. So
the runtime worker signs each result with the evidence key of the runtime that produced
it (an in-toto statement in a DSSE envelope, like people's decisions), bound to the run,
the snapshot, the runtime, the stage, the deployment, the kind of result and a digest
of the results. The trusted inventory verifies it against the keys an admin registered
for that runtime (``mlc runtime key add``; rotated and revoked like people's keys) before
anything is recorded, and ``mlc audit verify`` checks it again offline.

The private key lives with the runtime worker: ``MLC_HOME/keys/evidence/RUNTIME.pem``
(0600 in a 0700 folder, owned by the worker's user), created on first use. ``mlc dev``
and ``mlc runtime add`` on the worker's own home register it; a remote worker prints its
public key with ``mlc runtime key show RUNTIME`` for the admin to register.
"""

from __future__ import annotations

import base64
import binascii
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ValidationError

from mlc.contracts.traffic import TrafficObservation
from mlc.domain import Frozen, TestKind, TestResult, check_name
from mlc.errors import RefusedError
from mlc.statements import Envelope, digest, make_statement, seal
from mlc.trust.governance import Governance
from mlc.trust.grants import RuntimeGrant
from mlc.trust.keys import ensure_key, key_id, verify

EVIDENCE_TYPE = "urn:mlc:predicate:runtime-evidence:v1"
"""predicateType of a result signed by the runtime worker that produced it."""

EvidenceKind = Literal["stage_tests", "deploy", "traffic_observation", "probe", "restart"]
"""What was signed: a deployment's stage test results (smoke, metrics, champion/challenger),
a deploy's result (endpoint, batch output), a gateway's traffic observation (the numbers
shadow and canary verdicts are judged on), and the reconciler's health probe and restart."""

NO_SNAPSHOT = "0" * 64
"""``snapshot_sha256`` of evidence about no one snapshot (a traffic observation)."""


class EvidencePredicate(Frozen):
    """What a runtime worker vouches for, and for which run."""

    kind: EvidenceKind
    runtime: str
    stage: str
    deployment_id: str
    workflow_id: str
    run_id: str
    snapshot_sha256: str
    results_sha256: str
    """``digest(results)``: what an auditor recomputes from the stored results."""
    results: Any
    """The results themselves, as JSON (a list of test results, a deploy result...)."""
    issued_at: datetime


def evidence_key_path(home: Path, runtime: str) -> Path:
    """Where the worker keeps ``runtime``'s evidence key (``MLC_EVIDENCE_KEY_DIR`` overrides)."""
    base = os.environ.get("MLC_EVIDENCE_KEY_DIR")
    folder = Path(base) if base else home / "keys" / "evidence"
    return folder / f"{check_name(runtime, 'runtime name')}.pem"


def evidence_key(home: Path, runtime: str) -> Ed25519PrivateKey:
    """The runtime's evidence key, created (0600, folder 0700) on first use."""
    path = evidence_key_path(home, runtime)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return ensure_key(path)


def results_json(results: Any) -> Any:
    """Results as the JSON that is signed and digested (pydantic models dumped)."""
    if isinstance(results, BaseModel):
        return results.model_dump(mode="json")
    if isinstance(results, list | tuple):
        return [results_json(r) for r in results]
    return results


def sign_evidence(
    key: Ed25519PrivateKey,
    *,
    kind: EvidenceKind,
    runtime: str,
    stage: str,
    deployment_id: str,
    workflow_id: str,
    run_id: str,
    snapshot_sha256: str | None,
    results: Any,
) -> Envelope:
    """A DSSE envelope of ``results`` signed with the runtime's evidence ``key``."""
    body = results_json(results)
    predicate = EvidencePredicate(
        kind=kind,
        runtime=runtime,
        stage=stage,
        deployment_id=deployment_id,
        workflow_id=workflow_id,
        run_id=run_id,
        snapshot_sha256=snapshot_sha256 or NO_SNAPSHOT,
        results_sha256=digest(body),
        results=body,
        issued_at=datetime.now(UTC),
    )
    statement = make_statement(
        subject=deployment_id,
        sha256=predicate.snapshot_sha256,
        predicate_type=EVIDENCE_TYPE,
        predicate=predicate,
    )
    return seal(statement, keyid=key_id(key.public_key()), sign=key.sign)


def evidence_of(envelope: Envelope) -> EvidencePredicate:
    """Decode an evidence envelope (structure only) or raise RefusedError saying what is wrong."""
    try:
        statement = envelope.statement()
        if statement.predicate_type != EVIDENCE_TYPE:
            raise ValueError(f"not runtime evidence (predicateType {statement.predicate_type})")
        predicate = EvidencePredicate.model_validate(statement.predicate)
    except (ValueError, ValidationError) as exc:
        raise RefusedError(f"malformed runtime evidence: {exc}") from None
    subject = statement.subject[0] if statement.subject else None
    if subject is None or subject.name != predicate.deployment_id:
        raise RefusedError("the evidence statement's subject is not its deployment")
    if subject.digest.get("sha256") != predicate.snapshot_sha256:
        raise RefusedError("the evidence statement's subject digest is not its snapshot's sha256")
    if digest(predicate.results) != predicate.results_sha256:
        raise RefusedError("the evidence's results do not match their signed digest")
    return predicate


def check_evidence(
    envelope: Envelope | None,
    state: Governance,
    *,
    kind: EvidenceKind,
    workflow_id: str,
    run_id: str,
    runtime: str | None = None,
    deployment_id: str | None = None,
    stage: str | None = None,
    snapshot_sha256: str | None = None,
) -> EvidencePredicate:
    """Verify runtime evidence for one run against the verified governance ``state``.

    The one check every consumer of runtime results uses (inventory, reconciler, audit):
    signed by an active evidence key registered for the runtime the statement names,
    of the expected kind, for this run, and (when given) this runtime, deployment, stage
    and snapshot.

    Raises:
        RefusedError: naming the first check that failed.
    """
    if envelope is None:
        where = f" from runtime {runtime}" if runtime else ""
        raise RefusedError(f"the {kind} result{where} is not signed by a runtime's evidence key")
    if not envelope.signatures:
        raise RefusedError(f"the {kind} result is not signed")
    signature = envelope.signatures[0]
    registered = state.evidence_keys.get(signature.keyid)
    if registered is None:
        raise RefusedError(
            f"the {kind} result is signed by {signature.keyid}, which is no registered evidence key "
            "of any runtime (an admin registers one with `mlc runtime key add`)"
        )
    owner, public = registered.runtime, registered.public
    if registered.revoked:
        raise RefusedError(f"evidence key {signature.keyid} of runtime {owner} has been revoked")
    try:
        raw = base64.b64decode(signature.sig, validate=True)
    except (binascii.Error, ValueError):
        raise RefusedError("the evidence signature is not base64") from None
    if not verify(public, raw, envelope.signed_bytes()):
        raise RefusedError(f"bad evidence signature: the statement was not signed by key {signature.keyid}")
    claim = evidence_of(envelope)
    expected: dict[str, str | None] = {
        "kind": kind,
        "runtime": owner,
        "workflow_id": workflow_id,
        "run_id": run_id,
        "deployment_id": deployment_id,
        "stage": stage,
        "snapshot_sha256": snapshot_sha256,
    }
    for name, value in expected.items():
        if value is not None and getattr(claim, name) != value:
            raise RefusedError(
                f"the evidence names {name} {getattr(claim, name)!r}, expected {value!r} "
                f"(signed by runtime {owner}'s key)"
            )
    if runtime is not None and owner != runtime:
        raise RefusedError(f"the result of runtime {runtime} is signed by runtime {owner}'s key")
    return claim


def check_observation(
    envelope: Envelope | None,
    state: Governance,
    *,
    model: str,
    workflow_id: str,
    run_id: str,
    stage: str | None,
) -> EvidencePredicate:
    """Verify a ``traffic_observation`` (:func:`check_evidence`) and that its signer is the
    runtime whose gateway saw the traffic: a registered runtime of ``stage`` (the
    claim's stage when None) whose stable endpoint for ``model`` is the observation's.
    Another runtime's key (of this stage or another) cannot vouch for a gateway it does
    not run.

    Raises:
        RefusedError: naming the first check that failed.
    """
    claim = check_evidence(
        envelope, state, kind="traffic_observation", workflow_id=workflow_id, run_id=run_id, stage=stage
    )
    runtime = state.runtimes.get(claim.runtime)
    seen = claim.results.get("endpoint") if isinstance(claim.results, dict) else None
    if runtime is None or runtime.stage != claim.stage:
        raise RefusedError(
            f"the traffic observation is signed by runtime {claim.runtime}, which is no runtime of "
            f"stage {claim.stage}"
        )
    if runtime.gateway is None or seen != runtime.gateway.endpoint(model):
        raise RefusedError(
            f"the observation of {seen} is signed by runtime {claim.runtime}, whose gateway does "
            f"not serve that endpoint"
        )
    return claim


def sign_granted(home: Path, grant: RuntimeGrant, kind: EvidenceKind, results: Any) -> Envelope:
    """Sign ``results`` of the action ``grant`` allowed, with its runtime's key under ``home``.

    Every fact bound (run, runtime, stage, deployment, snapshot) comes from the verified
    grant, never from the workflow's payload. The key is read for each result (a fraction
    of a millisecond), so a rotated key file counts at once, with no worker restart.
    """
    name = grant.runtime.name
    return sign_evidence(
        evidence_key(home, name),
        kind=kind,
        runtime=name,
        stage=grant.stage,
        deployment_id=grant.deployment_id,
        workflow_id=grant.workflow_id,
        run_id=grant.run_id,
        snapshot_sha256=grant.snapshot.sha256 if grant.snapshot else None,
        results=results,
    )


def vouches_for(result: TestResult, claims: list[EvidencePredicate]) -> bool:
    """True when a verified claim carries ``result`` as it stands.

    A ``stage_tests`` claim carries its deployment's results verbatim. A shadow verdict is
    judged in the lifecycle with its own thresholds, on numbers the gateway runtime signed
    in a ``traffic_observation``: its metrics must be that observation's.
    """
    shown = result.model_dump(mode="json")
    for claim in claims:
        if claim.kind == "stage_tests":
            if claim.deployment_id == result.deployment_id and shown in claim.results:
                return True
        elif claim.kind == "traffic_observation" and result.test is TestKind.SHADOW:
            seen = TrafficObservation.model_validate(claim.results)
            ids = {r.deployment_id for r in seen.routes} | ({seen.shadow.shadow_id} if seen.shadow else set())
            metrics = seen.shadow.metrics() if seen.shadow else {}
            if result.deployment_id in ids and result.metrics == metrics:
                return True
    return False
