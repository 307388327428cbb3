"""``mlc demo`` through the API, as a team member works: the example model registered, its
lifecycle started, watched and (``--yes``) approved over signed HTTP requests to the stack's
``mlc server``, with no database DSN and no Temporal client in this process.

Statements are signed here with the user's key and forwarded by the server, as every CLI
command does under ``MLC_API_URL``. Routes used (docs/design/control-plane.md §2):
``GET /v1/me``; ``PUT /v1/artifacts/{sha256}`` and ``POST /v1/snapshots`` (answer
``{"snapshot", "new"}``); ``POST /v1/runs``; ``GET /v1/runs/{model}/{version}/status``
(answer ``{"status": ...}``, null while starting); ``GET .../decision-context?stage=``
(``status``, ``sha256``, ``workflow_id``, ``run_id``) and ``POST .../decisions``;
``GET /v1/deployments?model=`` (rows with ``stable_endpoint``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cli.api_client import ApiClient
from cli.context import console, emit
from cli.lifecycle_cmds import render_status
from mlc import endpoints
from mlc.artifacts import build_archive
from mlc.contracts.lifecycle import LifecycleStatus
from mlc.domain import Decision, LifecycleState, ModelRef
from mlc.errors import NotFoundError, RuntimeUnavailableError
from mlc.manifest import load_manifest
from mlc.trust.governance import SNAPSHOT_REGISTER
from mlc.trust.signer import Signer

POLL_SECONDS = 0.3
FIRST_STATUS_SECONDS = 60.0
"""How long a started run may have no recorded status yet (the worker picks it up)."""


async def register(api: ApiClient, me: Signer, package: Path) -> ModelRef:
    """Upload the package's archive by its digest, then the signed ``snapshot.register``."""
    manifest = load_manifest(package)
    archive = await asyncio.to_thread(build_archive, package)
    digest = hashlib.sha256(archive).digest()
    sha = digest.hex()
    headers = {
        "content-type": "application/gzip",
        "content-digest": f"sha-256=:{base64.b64encode(digest).decode()}:",
    }
    await api.send(api.request("PUT", f"/v1/artifacts/{sha}", content=archive, headers=headers))
    statement = {"model": manifest.name, "sha256": sha}
    envelope = me.governance(SNAPSHOT_REGISTER, statement, subject=manifest.name)
    snap = (await api.post("/v1/snapshots", {"envelope": envelope.to_json()}))["snapshot"]
    console.print(f"registered {snap['model']}@{snap['version']} (sha256 {sha[:12]})")
    return ModelRef(model=snap["model"], version=int(snap["version"]))


def _run_path(ref: ModelRef) -> str:
    return f"/v1/runs/{quote(ref.model, safe='')}/{ref.version}"


async def approve(api: ApiClient, me: Signer, ref: ModelRef, stage: str) -> None:
    """Sign an approval of ``stage`` on the evidence the server shows now, and send it."""
    base = _run_path(ref)
    context = await api.get(f"{base}/decision-context", stage=stage)
    envelope = me.decision(
        LifecycleStatus.model_validate(context["status"]),
        stage=stage,
        decision=Decision.APPROVED,
        sha256=context["sha256"],
        workflow_id=context["workflow_id"],
        run_id=context["run_id"],
        comment="approved by mlc demo --yes",
    )
    await api.post(f"{base}/decisions", {"envelope": envelope.to_json()})
    console.print(f"approved {stage} as {me.name} (signed, verified)")


async def status(api: ApiClient, ref: ModelRef) -> LifecycleStatus | None:
    """The run's status; None while it is starting."""
    try:
        found = (await api.get(f"{_run_path(ref)}/status"))["status"]
    except NotFoundError:
        return None
    return LifecycleStatus.model_validate(found) if found else None


async def walk(api: ApiClient, me: Signer, package: Path, *, yes: bool, ui: str | None) -> int:
    """Register, start, follow (and approve) one run; 0 when it serves in its last stage."""
    ref = await register(api, me, package)
    if ui:
        console.print(f"watch it in the Web UI: {ui}")
    started = await api.post("/v1/runs", {"model": ref.model, "version": ref.version})
    console.print(f"started ModelLifecycle {started['workflow_id']}")
    announced: set[str] = set()
    since = time.monotonic()
    with console.status("lifecycle running") as spinner:
        while True:
            current = await status(api, ref)
            if current is None and time.monotonic() - since > FIRST_STATUS_SECONDS:
                raise RuntimeUnavailableError(
                    f"{ref}: no status {FIRST_STATUS_SECONDS:.0f} s after the start; is the worker running?"
                )
            if current is not None:
                spinner.update(f"{ref}: {current.state.value} in {current.stage}")
                if current.state in (LifecycleState.SUCCEEDED, LifecycleState.FAILED):
                    break
                gate = current.pending_gate
                if gate and gate.stage not in announced:
                    announced.add(gate.stage)
                    if yes:
                        await approve(api, me, ref, gate.stage)
                    else:
                        console.print(
                            f"{ref} waits at {gate.stage}; approve with:\n"
                            f"  mlc approve {ref} --stage {gate.stage} --comment 'looks good'"
                        )
            await asyncio.sleep(POLL_SECONDS)
    render_status(current)
    if current.state is LifecycleState.FAILED:
        return 1
    live = [d async for d in api.pages("/v1/deployments", model=ref.model)]
    emit(
        live,
        as_json=False,
        title="Deployments (mlc deployments)",
        columns=["model", "version", "stage", "runtime", "mode", "state", "endpoint"],
    )
    await _check_serving(ref, current.stages[-1], live)
    return 0


async def _check_serving(ref: ModelRef, last: str, live: list[dict[str, Any]]) -> None:
    """Consumers call the stable endpoint where the runtime has a gateway: ask it for health."""
    here = [d for d in live if d.get("stage") == last and d.get("version") == ref.version]
    stable = sorted({d["stable_endpoint"] for d in here if d.get("stable_endpoint")})
    for endpoint in stable or [d["endpoint"] for d in here if d.get("endpoint")]:
        async with endpoints.connect(endpoint, timeout=5.0) as (http, url):
            health = await http.get(f"{url}/health")
            health.raise_for_status()
            kind = "its stable endpoint " if stable else ""
            console.print(f"[green]{ref} serves in {last} at {kind}{endpoint}[/green]")
