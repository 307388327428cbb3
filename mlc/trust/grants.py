"""Runtime grants: the platform's signed permission for one runtime action.

Runtime activities run on workers that may sit next to a remote engine with no database
access, and their payloads come from workflow code, which may be uploaded and hostile.
So they act only on a grant: a statement signed by the trusted inventory worker's
platform key after it checked the policy, naming the deployment, the runtime and the
snapshot (read from the verified inventory, never from the workflow), bound to one run
and valid for a short time. The runtime worker verifies it with the platform's public
key and takes every fact from the grant, not from the payload.
"""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from mlc.domain import Frozen, Mode, ModelSnapshot, Runtime, TrafficRoute
from mlc.errors import InvalidKeyError, RefusedError
from mlc.statements import GRANT_TYPE, Envelope, make_statement, seal
from mlc.trust.keys import ensure_key, key_id, parse_public_key, public_text, verify

GRANT_LIFETIME = timedelta(hours=1)
"""Long enough for a deploy with its retries; short enough that a leaked grant soon expires."""

TEST_GRANT_LIFETIME = timedelta(days=30)
"""Testing a deployment only reads it (its endpoint or output, located by the runtime's own
driver), and lifecycle code may test again after a gate that waits for days."""

RuntimeAction = Literal[
    "deploy_online",
    "run_batch_job",
    "deploy_streaming",
    "undeploy",
    "run_stage_tests",
    "probe",
    "restart",
    "route_traffic",
    "observe_traffic",
]
"""``probe`` and ``restart`` are the runtime reconciler's: check a serving deployment's
health, and bring the same deployment of the same snapshot back up. ``route_traffic`` sets
which deployments answer a model's stable endpoint (``routes``), ``observe_traffic`` reads
what the gateway saw for them."""


class RuntimeGrant(Frozen):
    """What the platform allows one run to do on one runtime."""

    action: RuntimeAction
    deployment_id: str
    runtime: Runtime
    stage: str
    mode: Mode
    snapshot: ModelSnapshot | None = None
    standby: bool = False
    """``deploy_streaming`` only: score just the test topics, because an older version of
    the model still owns the runtime's input topic (until this one is promoted)."""
    model: str | None = None
    """``route_traffic``/``observe_traffic``: the model whose stable endpoint is meant."""
    routes: tuple[TrafficRoute, ...] = ()
    """``route_traffic``/``observe_traffic``: the deployments behind it, checked by the inventory;
    ``run_stage_tests``: the champion a champion/challenger test scores against (weight 0)."""
    repair: bool = False
    """``route_traffic`` by the runtime's reconciler: bring back a gateway that is down or
    lost the model's files, and replace the routes it holds only when ``as_of`` is newer
    than theirs (a lifecycle may have moved traffic since the reconciler read the table)."""
    as_of: datetime | None = None
    """``route_traffic``: when these routes were decided (authorized; for a repair, when the
    inventory recorded them)."""
    workflow_id: str
    run_id: str
    expires_at: datetime


def platform_key(path: Path) -> Ed25519PrivateKey:
    """The inventory worker's platform key (created on first start, mode 0600)."""
    key = ensure_key(path)
    public = path.with_suffix(".pub")
    if not public.exists():
        public.write_text(public_text(key.public_key(), "mlc-platform") + "\n")
    return key


def platform_public_key(path: Path) -> Ed25519PublicKey:
    """The platform's public key for runtime workers: ``MLC_PLATFORM_PUBLIC_KEY`` or the .pub file."""
    text = os.environ.get("MLC_PLATFORM_PUBLIC_KEY")
    if not text:
        pub = path.with_suffix(".pub")
        try:
            text = pub.read_text()
        except FileNotFoundError:
            raise InvalidKeyError(
                f"no platform public key at {pub}: start the inventory worker first, or set "
                "MLC_PLATFORM_PUBLIC_KEY to the line in its platform.pub"
            ) from None
    return parse_public_key(text)


def issue(key: Ed25519PrivateKey, grant: RuntimeGrant) -> Envelope:
    """Sign ``grant`` with the platform key."""
    subject = grant.snapshot.sha256 if grant.snapshot else grant.deployment_id
    statement = make_statement(
        subject=grant.deployment_id,
        sha256=subject if grant.snapshot else "0" * 64,
        predicate_type=GRANT_TYPE,
        predicate=grant,
    )
    return seal(statement, keyid=key_id(key.public_key()), sign=key.sign)


def check(
    envelope: Envelope,
    public: Ed25519PublicKey,
    *,
    action: RuntimeAction,
    run_id: str,
    now: datetime | None = None,
) -> RuntimeGrant:
    """Verify a grant for ``action`` in run ``run_id``; raise RefusedError naming the failure."""
    keyid = key_id(public)
    signatures = [s for s in envelope.signatures if s.keyid == keyid]
    if not signatures:
        raise RefusedError("the runtime action is not signed by this platform's key")
    if not verify(public, base64.b64decode(signatures[0].sig), envelope.signed_bytes()):
        raise RefusedError("the runtime grant's signature does not verify")
    try:
        statement = envelope.statement()
        grant = RuntimeGrant.model_validate(statement.predicate)
    except (ValueError, ValidationError) as exc:
        raise RefusedError(f"malformed runtime grant: {exc}") from None
    if statement.predicate_type != GRANT_TYPE or grant.action != action:
        raise RefusedError(f"the grant allows {grant.action}, not {action}")
    if grant.run_id != run_id:
        raise RefusedError("the grant belongs to another lifecycle run")
    if (now or datetime.now(UTC)) > grant.expires_at:
        raise RefusedError(f"the grant expired at {grant.expires_at:%Y-%m-%d %H:%M:%S} UTC")
    return grant
