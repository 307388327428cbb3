"""Signed administration: the trust root, keys, roles, policies and runtimes.

Each function builds a governance statement with the caller's :class:`Signer` (the half
that stays with the person) and submits it with :mod:`server.operations.governance` (the
half ``mlc server`` runs too), which verifies it against the current verified state
(refusing with a message when the signer lacks the role) and records it in the trail.
The CLI's direct mode, ``mlc dev``'s bootstrap and the tests all go through here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mlc.config import TRUST_ROOT_FILE, Settings
from mlc.domain import DEFAULT_STAGES, GatewaySettings, Runtime
from mlc.errors import ConflictError, RefusedError
from mlc.statements import GovernancePredicate
from mlc.store import governance
from mlc.traffic import pick_gateway_port
from mlc.trust import evidence
from mlc.trust import governance as actions
from mlc.trust.governance import Governance
from mlc.trust.keys import key_id, parse_public_key, public_text
from mlc.trust.policy import StagePolicy
from mlc.trust.signer import Signer
from server.operations import governance as submission


async def state(pool: asyncpg.Pool, settings: Settings) -> Governance:
    """The verified governance state, as the workers will see it."""
    return await governance.load(pool, pinned_root=settings.trust_root, author_role=settings.author_role)


async def identify(pool: asyncpg.Pool, settings: Settings, key: Ed25519PrivateKey) -> Signer:
    """The principal that owns ``key``, or a message saying how to get the key registered."""
    kid = key_id(key.public_key())
    current = await state(pool, settings)
    if not current.initialized:
        raise RefusedError("this installation has no trust root yet: run `mlc admin init NAME` first")
    for principal in current.principals.values():
        if kid in principal.keys:
            if kid in principal.revoked:
                raise RefusedError(f"your key {kid} ({principal.name}) has been revoked")
            return Signer(principal.name, key)
    raise RefusedError(
        f"your key {kid} is not registered; send `mlc key show` to an admin, who runs "
        "`mlc key add NAME 'ssh-ed25519 ...'`"
    )


async def submit(
    pool: asyncpg.Pool,
    settings: Settings,
    signer: Signer,
    action: str,
    args: dict[str, Any],
    *,
    subject: str | None = None,
    keep_runtime_row: bool = False,
) -> GovernancePredicate:
    """Sign, verify and record one governance statement (and apply its effect)."""
    envelope = signer.governance(action, args, subject=subject)
    return await submission.submit(pool, settings, envelope, keep_runtime_row=keep_runtime_row)


async def init_admin(pool: asyncpg.Pool, settings: Settings, name: str, key: Ed25519PrivateKey) -> str:
    """Register the installation's first admin and pin its key as the trust root; return the key id.

    The pin goes to ``home/trust-root`` (when ``MLC_TRUST_ROOT`` is not set), where workers
    and the CLI of this home read it.
    """
    kid = key_id(key.public_key())
    if settings.trust_root and settings.trust_root != kid:
        raise RefusedError(f"MLC_TRUST_ROOT pins {settings.trust_root}, but your key is {kid}")
    signer = Signer(name, key)
    pinned = Settings(**{**settings.__dict__, "trust_root": kid})
    await submit(pool, pinned, signer, actions.INIT, actions.registration_args(name, key.public_key()))
    if not settings.trust_root:
        settings.home.mkdir(parents=True, exist_ok=True)
        (settings.home / TRUST_ROOT_FILE).write_text(kid + "\n")
    return kid


async def add_key(pool: asyncpg.Pool, settings: Settings, signer: Signer, name: str, public_key: str) -> str:
    """Register ``public_key`` (ssh-ed25519 or PEM) for principal ``name``; return its key id."""
    args, kid = key_args(name, public_key)
    await submit(pool, settings, signer, actions.KEY_ADD, args)
    return kid


def key_args(name: str, public_key: str) -> tuple[dict[str, Any], str]:
    """A ``key.add`` statement's arguments, and the key's id."""
    public = parse_public_key(public_key)
    return actions.registration_args(name, public), key_id(public)


async def revoke_key(pool: asyncpg.Pool, settings: Settings, signer: Signer, name: str, kid: str) -> None:
    """Revoke one of ``name``'s keys (admins, or the key's owner)."""
    await submit(pool, settings, signer, actions.KEY_REVOKE, {"principal": name, "keyid": kid})


RoleChange = Callable[[asyncpg.Pool, Settings, Signer, str, str], Awaitable[None]]
"""``grant_role`` or ``revoke_role``."""


async def grant_role(pool: asyncpg.Pool, settings: Settings, signer: Signer, name: str, role: str) -> None:
    """Grant ``role`` to ``name`` (admins only)."""
    await submit(pool, settings, signer, actions.ROLE_GRANT, {"principal": name, "role": role})


async def revoke_role(pool: asyncpg.Pool, settings: Settings, signer: Signer, name: str, role: str) -> None:
    """Take ``role`` from ``name`` (admins only; the last admin keeps admin)."""
    await submit(pool, settings, signer, actions.ROLE_REVOKE, {"principal": name, "role": role})


async def set_policy(pool: asyncpg.Pool, settings: Settings, signer: Signer, policy: StagePolicy) -> None:
    """Sign a stage policy (admins only); it applies from the next check on."""
    await submit(pool, settings, signer, actions.POLICY_SET, {"policy": policy.model_dump(mode="json")})


async def add_runtime(
    pool: asyncpg.Pool,
    settings: Settings,
    signer: Signer,
    runtime: Runtime,
    *,
    replace: bool = False,
    evidence_key: str | None = None,
) -> Runtime:
    """Register a runtime (admins only); ``replace`` signs its removal first.

    The same statement registers the runtime's evidence key (the key its worker signs
    results with): ``evidence_key`` (an ``ssh-ed25519`` line from the worker's
    ``mlc runtime key show``), else the key of a worker running with this ``MLC_HOME``
    (created when missing), which is how ``mlc dev`` and one-host installations work.
    A replaced runtime keeps the evidence keys it had.
    """
    current = await state(pool, settings)
    args = runtime_args(runtime)
    if not current.evidence_keys_of(runtime.name):
        args["evidence_key"] = evidence_key or local_evidence_key(settings, runtime.name)
    elif evidence_key:
        raise ConflictError(
            f"runtime {runtime.name} already has an evidence key; rotate it with `mlc runtime key add`"
        )
    if runtime.name in current.runtimes:
        if not replace:
            raise ConflictError(f"runtime {runtime.name} already exists; use --replace to overwrite it")
        await remove_runtime(pool, settings, signer, runtime.name, keep_row=True)
    await submit(pool, settings, signer, actions.RUNTIME_ADD, args)
    return runtime


def runtime_args(runtime: Runtime) -> dict[str, Any]:
    """A ``runtime.add`` statement's arguments (the evidence key is added by the caller)."""
    return {"runtime": runtime.model_dump(mode="json")}


def local_evidence_key(settings: Settings, runtime: str) -> str:
    """The public line of ``runtime``'s evidence key under this home (created when missing)."""
    return public_text(evidence.evidence_key(settings.home, runtime).public_key(), f"mlc-runtime-{runtime}")


async def add_runtime_key(
    pool: asyncpg.Pool, settings: Settings, signer: Signer, runtime: str, public_key: str
) -> str:
    """Register another evidence key of ``runtime`` (admins only: rotation); return its key id."""
    args, kid = runtime_key_args(runtime, public_key)
    await submit(pool, settings, signer, actions.RUNTIME_KEY_ADD, args)
    return kid


def runtime_key_args(runtime: str, public_key: str) -> tuple[dict[str, Any], str]:
    """A ``runtime.key.add`` statement's arguments, and the key's id."""
    public = parse_public_key(public_key)
    return {"runtime": runtime, "public_key": public_text(public, f"mlc-runtime-{runtime}")}, key_id(public)


async def revoke_runtime_key(
    pool: asyncpg.Pool, settings: Settings, signer: Signer, runtime: str, kid: str
) -> None:
    """Revoke one of ``runtime``'s evidence keys (admins only): results it signs no longer count."""
    await submit(pool, settings, signer, actions.RUNTIME_KEY_REVOKE, {"runtime": runtime, "keyid": kid})


async def remove_runtime(
    pool: asyncpg.Pool, settings: Settings, signer: Signer, name: str, *, keep_row: bool = False
) -> None:
    """Remove a runtime with no live deployments (admins only)."""
    await submit(pool, settings, signer, actions.RUNTIME_REMOVE, {"name": name}, keep_runtime_row=keep_row)


DEV_ROLES = ("approver", "lifecycle-author")
DEV_GATEWAY_PORT = 28780
"""``mlc dev``'s runtimes' gateways listen from here (DEV, SIT, UAT, PROD) when the ports are free."""


async def bootstrap_dev(
    pool: asyncpg.Pool,
    settings: Settings,
    name: str,
    key: Ed25519PrivateKey,
    *,
    task_queue: str,
    gateways: bool = True,
) -> Settings:
    """Make an embedded stack usable at once: ``name`` is admin, approver and author, one
    local runtime per stage (with a gateway unless ``gateways`` is False: no nginx on this
    host), and segregation of duties off (one person plays every role).

    Idempotent: on a home that already has a trust root nothing is re-initialised.
    Returns the settings with the trust root pinned.
    """
    current = await state(pool, settings)
    if not current.initialized:
        kid = await init_admin(pool, settings, name, key)
        settings = Settings(**{**settings.__dict__, "trust_root": kid})
        current = await state(pool, settings)
    signer = await identify(pool, settings, key)
    for role in DEV_ROLES:
        if role not in current.roles_of(signer.name):
            await grant_role(pool, settings, signer, signer.name, role)
    taken = {r.gateway.port for r in current.runtimes.values() if r.gateway}
    for index, stage in enumerate(DEFAULT_STAGES):
        name = f"local-{stage.lower()}"
        if name not in current.runtimes:
            # a stable endpoint per model: http://127.0.0.1:PORT/models/MODEL (PORT kept from now on)
            port = pick_gateway_port(taken=taken, preferred=DEV_GATEWAY_PORT + index)
            taken.add(port)
            gateway = GatewaySettings(port=port) if gateways else None
            runtime = Runtime(name=name, stage=stage, task_queue=task_queue, gateway=gateway)
            await add_runtime(pool, settings, signer, runtime)
        elif not current.evidence_keys_of(name):  # a home from before signed evidence
            await add_runtime_key(pool, settings, signer, name, local_evidence_key(settings, name))
        if stage not in current.policies:
            base = current.policy(stage)
            solo = base.model_copy(
                update={"forbid_registrant": False, "forbid_starter": False, "forbid_uploader": False}
            )
            await set_policy(pool, settings, signer, solo)
    return settings


def read_public_key(text_or_path: str) -> str:
    """A public key given inline or as a path to a ``.pub``/PEM file."""
    path = Path(text_or_path).expanduser()
    return path.read_text() if path.is_file() else text_or_path
