"""Client side of ``mlc rollback``: sign the decision, start the ``Rollback`` workflow, wait.

Shared by the CLI and tests. The workflow (``workflows/rollback.py``) and the trusted
``verify_rollback`` activity decide; this module signs, and starts and waits through
:mod:`server.operations.rollbacks` (which ``mlc server`` runs for API clients).
"""

from __future__ import annotations

import asyncpg
from temporalio.client import Client

from mlc.contracts.rollback import RollbackResult
from mlc.statements import Envelope
from mlc.store import snapshots
from mlc.trust.signer import Signer
from server.operations import rollbacks


async def sign_rollback(
    pool: asyncpg.Pool, signer: Signer, *, model: str, stage: str, reason: str, version: int | None = None
) -> Envelope:
    """A rollback statement signed by ``signer`` (a named version bound to its sha256).

    Raises:
        NotFoundError: the named version is not a registered snapshot.
        ValueError: the reason is empty.
    """
    if not reason.strip():
        raise ValueError("a rollback needs a reason: pass --reason TEXT (it is kept in the audit trail)")
    sha256 = None
    if version is not None:
        sha256 = (await snapshots.read_snapshot(pool, model, version)).sha256
    return signer.rollback(model=model, stage=stage, reason=reason, version=version, sha256=sha256)


async def roll_back(client: Client, envelope: Envelope, *, task_queue: str) -> RollbackResult:
    """Start the ``Rollback`` workflow for a signed statement on the main queue and wait for it.

    Raises:
        MLCError: the rollback was refused or failed (typed: refusals are ``RefusedError``).
    """
    handle = await rollbacks.start(client, envelope, task_queue=task_queue)
    return await rollbacks.outcome(handle, rollbacks.described(envelope))
