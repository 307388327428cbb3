"""Warm spares: model containers started ahead of need, each claimed by one deployment.

Why: a dedicated deploy that starts its container reaches healthy in ~1.2-1.4 s on this
kind of machine, ~1 s of it the container's interpreter importing the server and the
model's libraries (scikit-learn and scipy) under its CPU limit; no cold start gets under
that. A spare is a container of the snapshot's image started *after* a dedicated deploy of
it is healthy (off that deploy's critical path), with exactly the command, limits,
hardening, user, restart policy and network a deployment's container gets, serving on a
socket folder created fresh for it (a random name under the runtime's sockets folder,
owned by the containers' user, 0700). The next deploy of that snapshot on that runtime
claims it and finds its imports done and its package loaded.

Claiming a spare is unlinking its claim token, an empty file only the worker's user can
reach (see :func:`_claims`): of two deploys reaching for one spare exactly one unlink
succeeds (the other tries the next spare or starts cold). The claimant then renames the
container from its spare name (``mlcspare-<random>``, a name no deployment's ``mlc-<id>``
can be) to the deployment's container name; a deploy racing another of the same
deployment gets 409 there, drops the spare it claimed and uses the container holding the
name. Labels cannot change, so a claimed container keeps its spare labels
(``mlc.mode=spare``, no ``mlc.deployment-id``): its name ties it to its deployment
(:func:`~activities.runtimes.docker.containers.online_containers` finds it), and its
socket folder stays the one it was started with (its ``mlc.endpoint``).

A spare serves one deployment, ever: undeploy removes it like any deployment container
and nothing returns to the pool, so no model sees another's leftovers. Unclaimed spares
live only while their snapshot serves on the runtime (:func:`retire_unserved` at undeploy;
a refill checks under the runtime's lock that it still serves): a rejected or retired
version's code never keeps running where the inventory shows nothing. The pool is
bounded (one spare per runtime and shape, at most :data:`SPARES_PER_RUNTIME` per runtime,
the oldest removed first); a runtime's cleanup (``mlc runtime cleanup``) removes its
spares, and ``mlc dev`` removes them when it stops. A spare that could not be started costs
the next deploy a cold start, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors

from activities.runtimes.docker.containers import (
    SPARE_MODE,
    SPARE_PREFIX,
    container_name,
    drop_socket_folder,
    label_key,
    model_labels,
    remove,
    run_model_container,
    socket_folder,
    socket_options,
)
from activities.runtimes.docker.engine import connect, docker_settings
from activities.runtimes.docker.images import PACKAGE_DIR
from mlc.config import Settings
from mlc.domain import ModelSnapshot, Runtime

CLAIMS_DIR = "_spares"
"""Under ``runtime_dir``: the claim tokens of each runtime's spares (no runtime is named so)."""
SPARES_PER_RUNTIME = 2
"""At most this many unclaimed spares per runtime (each holds an interpreter with the
model's libraries imported: ~100-200 MB)."""

log = logging.getLogger(__name__)

_refills: set[asyncio.Task[None]] = set()
"""Spare starts under way in this process (held so the loop does not drop them)."""


def serve_command() -> list[str]:
    """What a dedicated model container runs, spare or not (plus its socket flag)."""
    return ["python3", "-m", "mlc.serving", "serve", "--package", PACKAGE_DIR]


def shape(runtime: Runtime, snapshot: ModelSnapshot, image_id: str, stage: str) -> str:
    """A digest of everything a deployment's container is started with but its socket
    folder: a spare is claimed only by a deploy that would start the very same container."""
    settings = docker_settings(runtime)
    parts = {
        "image": image_id,
        "command": serve_command(),
        "sha256": snapshot.sha256,
        "version": snapshot.version,
        "stage": stage,
        "docker": settings.model_dump(mode="json"),
        "model_network": str(runtime.model_network),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _spares(client: Any, runtime: Runtime) -> list[Any]:
    """The runtime's unclaimed spares, oldest first (claimed ones carry a deployment's name)."""
    found = client.containers.list(
        ignore_removed=True,
        all=True,
        filters={"label": [f"mlc.runtime={runtime.name}", f"mlc.mode={SPARE_MODE}"]},
    )
    spares = [c for c in found if c.name.startswith(SPARE_PREFIX)]
    return sorted(spares, key=lambda c: str(c.attrs.get("Created", "")))


def claim(client: Any, settings: Settings, runtime: Runtime, wanted: str, deployment_id: str) -> Any:
    """Claim a running spare of shape ``wanted`` for the deployment and return it, renamed to
    the deployment's container name (None: no spare to claim). When a concurrent deploy of
    the same deployment holds that name already, the container holding it.

    Raises:
        docker.errors.APIError: the engine refused otherwise.
    """
    name = container_name(deployment_id)
    for spare in _spares(client, runtime):
        key = label_key(spare)
        if spare.status != "running" or spare.labels.get("mlc.spare-shape") != wanted or not key:
            continue
        try:
            (_claims(settings, runtime) / key).unlink()  # one unlink succeeds: the claim
        except FileNotFoundError:
            continue  # claimed by another deploy, or not a spare of this home
        try:
            client.api.rename(spare.id, name)
        except docker.errors.NotFound:
            drop(client, settings, runtime, spare)  # removed meanwhile (a cleanup)
            continue
        except docker.errors.APIError as exc:
            drop(client, settings, runtime, spare)  # claimed, never served: it goes
            if exc.status_code != 409:
                raise
            return client.containers.get(name)  # a concurrent deploy of this deployment
        spare.reload()
        return spare
    return None


def start_later(
    settings: Settings, runtime: Runtime, snapshot: ModelSnapshot, image_id: str, stage: str
) -> None:
    """Start a spare of this shape in the background unless one is there (never raises)."""
    task = asyncio.get_running_loop().create_task(_refill(settings, runtime, snapshot, image_id, stage))
    _refills.add(task)
    task.add_done_callback(_refills.discard)


async def settled() -> None:
    """Wait until the spare starts this process began are done (tests and benches, so no
    engine call is left running when their loop closes)."""
    while _refills:
        await asyncio.gather(*list(_refills), return_exceptions=True)


async def _refill(
    settings: Settings, runtime: Runtime, snapshot: ModelSnapshot, image_id: str, stage: str
) -> None:
    try:
        async with connect(runtime, f"start a spare container of {snapshot.ref}") as client:
            await asyncio.to_thread(_ensure_spare, client, settings, runtime, snapshot, image_id, stage)
    except Exception:  # a missing spare costs the next deploy a cold start, nothing more
        log.warning("runtime %s: could not start a spare of %s", runtime.name, snapshot.ref, exc_info=True)


@contextlib.contextmanager
def _locked(settings: Settings, runtime: Runtime) -> Iterator[None]:
    """Hold the runtime's spare lock (across this host's workers): listing spares, clearing
    stale tokens and starting or retiring a spare happen as one step, so two refills cannot
    delete each other's fresh token and a retire cannot miss a spare being started. Held
    in a worker thread (``asyncio.to_thread``) that needs no other thread meanwhile."""
    path = settings.runtime_dir / CLAIMS_DIR / f"{runtime.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _serving(client: Any, runtime: Runtime) -> set[str]:
    """sha256 of every snapshot a running deployment container on ``runtime`` serves
    (claimed spares included: they carry their deployment's name)."""
    running = client.containers.list(ignore_removed=True, filters={"label": f"mlc.runtime={runtime.name}"})
    return {c.labels.get("mlc.sha256", "") for c in running if not c.name.startswith(SPARE_PREFIX)}


def retire_unserved(client: Any, settings: Settings, runtime: Runtime, sha256s: set[str]) -> None:
    """Remove the unclaimed spares of each snapshot in ``sha256s`` that no deployment on
    ``runtime`` serves any more: a spare exists to make a running snapshot's next container
    (a restart, a second deployment) warm; a rejected or retired version's model code must
    not keep running where nothing in the inventory shows it."""
    with _locked(settings, runtime):
        serving = _serving(client, runtime)
        for spare in _spares(client, runtime):
            if spare.labels.get("mlc.sha256") in sha256s - serving:
                retire(client, settings, runtime, spare)


def _ensure_spare(
    client: Any, settings: Settings, runtime: Runtime, snapshot: ModelSnapshot, image_id: str, stage: str
) -> None:
    """Start one spare of this shape when there is none and the snapshot still serves here
    (its deployment may have been undeployed while this refill waited); drop obsolete and
    surplus ones."""
    with _locked(settings, runtime):
        if snapshot.sha256 in _serving(client, runtime):
            _refill_locked(client, settings, runtime, snapshot, image_id, stage)


def _refill_locked(
    client: Any, settings: Settings, runtime: Runtime, snapshot: ModelSnapshot, image_id: str, stage: str
) -> None:
    wanted = shape(runtime, snapshot, image_id, stage)
    spares = []
    for spare in _spares(client, runtime):
        obsolete = spare.labels.get("mlc.sha256") == snapshot.sha256 and (
            spare.labels.get("mlc.spare-shape") != wanted  # another image of this snapshot
        )
        if obsolete or spare.status not in ("running", "created", "restarting"):
            retire(client, settings, runtime, spare)
        else:
            spares.append(spare)
    live = {label_key(spare) for spare in spares}
    for token in _claims(settings, runtime).iterdir():  # of spares removed behind our back
        if token.name not in live:
            token.unlink(missing_ok=True)
    if any(spare.labels.get("mlc.spare-shape") == wanted for spare in spares):
        return
    for surplus in spares[: max(0, len(spares) - SPARES_PER_RUNTIME + 1)]:  # oldest first
        retire(client, settings, runtime, surplus)
    key = f"_{secrets.token_hex(8)[:15]}"  # never a deployment's key (hex only), never guessable
    folder = socket_folder(settings, runtime, key)
    uds, options, socket_labels = socket_options(folder, runtime)
    labels = model_labels(deployment_id="", runtime=runtime, snapshot=snapshot, stage=stage, mode=SPARE_MODE)
    del labels["mlc.deployment-id"]  # a spare belongs to no deployment until its name says so
    labels |= socket_labels | {"mlc.spare-shape": wanted, "mlc.socket-key": key}
    token = _claims(settings, runtime) / key
    try:
        run_model_container(
            client,
            image_id,
            [*serve_command(), *uds],
            name=f"{SPARE_PREFIX}{secrets.token_hex(8)}",
            labels=labels,
            settings=docker_settings(runtime),
            snapshot=snapshot,
            **options,
        )
    except BaseException:
        drop_socket_folder(settings, runtime, key)
        raise
    token.touch(mode=0o600, exist_ok=False)  # claimable from now on


def drop(client: Any, settings: Settings, runtime: Runtime, container: Any) -> None:
    """Remove a spare (or a claimed one), its claim token and its socket folder."""
    remove(container)
    if key := label_key(container):
        (_claims(settings, runtime) / key).unlink(missing_ok=True)
        drop_socket_folder(settings, runtime, key)


def retire(client: Any, settings: Settings, runtime: Runtime, spare: Any) -> bool:
    """Remove an unclaimed spare this home started, claiming it first so no deploy gets it
    meanwhile; False when it was claimed already (or is another home's)."""
    key = label_key(spare)
    if key is None:
        return False
    try:
        (_claims(settings, runtime) / key).unlink()
    except FileNotFoundError:
        return False
    drop(client, settings, runtime, spare)
    return True


def _claims(settings: Settings, runtime: Runtime) -> Path:
    """``<runtime_dir>/_spares/<runtime>``: one empty file per unclaimed spare this home
    started, named by its socket key (root's, 0700: no model reaches it). Unlinking it is
    the claim: the engine has no compare-and-set (two renames of one container by its old
    name both succeed), the filesystem has."""
    folder = (settings.runtime_dir / CLAIMS_DIR / runtime.name).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder.parent, 0o700)
    return folder


async def drop_spares(settings: Settings, runtime: Runtime) -> int:
    """Remove the runtime's unclaimed spares this home started (``mlc dev`` stopping); how
    many."""
    await settled()
    async with connect(runtime, "remove spare containers") as client:
        spares = await asyncio.to_thread(_spares, client, runtime)
        retired = 0
        for spare in spares:
            with contextlib.suppress(docker.errors.APIError):
                retired += await asyncio.to_thread(retire, client, settings, runtime, spare)
    return retired
