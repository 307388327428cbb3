"""``mlc demo`` through the API, as a team member works: the example model registered, its
lifecycle started, watched and (``--yes``) approved over signed HTTP requests to the stack's
``mlc server``, with no database DSN and no Temporal client in this process.

Statements are signed here with the user's key and forwarded by the server, through the same
calls as ``mlc model register`` and ``mlc approve`` under ``MLC_API_URL`` (:mod:`cli.remote`).
Routes used: ``GET /v1/me``; ``PUT /v1/artifacts/{sha256}``, ``POST /v1/snapshots``;
``POST /v1/runs``; ``GET /v1/runs/{model}/{version}/status``; ``GET .../decision-context``,
``POST .../decisions``; ``GET /v1/deployments?model=`` (rows with ``stable_endpoint``).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cli import remote
from cli.api_client import ApiClient
from cli.context import console, emit
from cli.lifecycle_cmds import render_status
from mlc import endpoints
from mlc.contracts.lifecycle import LifecycleStatus
from mlc.domain import Decision, LifecycleState, ModelRef
from mlc.errors import NotFoundError, RuntimeUnavailableError

POLL_SECONDS = 0.3
FIRST_STATUS_SECONDS = 60.0
"""How long a started run may have no recorded status yet (the worker picks it up)."""


async def approve(api: ApiClient, ref: ModelRef, stage: str) -> None:
    """Sign an approval of ``stage`` on the evidence the server shows now, and send it."""
    envelope = await remote.sign_decision(
        api, ref, stage=stage, decision=Decision.APPROVED, comment="approved by mlc demo --yes", evidence=None
    )
    await remote.send_decision(api, ref, envelope)
    console.print(f"approved {stage} as {(await remote.me(api)).name} (signed, verified)")


async def status(api: ApiClient, ref: ModelRef) -> LifecycleStatus | None:
    """The run's status; None while it is starting."""
    try:
        found = (await api.get(f"/v1/runs/{quote(ref.model, safe='')}/{ref.version}/status"))["status"]
    except NotFoundError:
        return None
    return LifecycleStatus.model_validate(found) if found else None


async def walk(api: ApiClient, package: Path, *, yes: bool, ui: str | None) -> int:
    """Register, start, follow (and approve) one run; 0 when it serves in its last stage."""
    snap, _ = await remote.register(api, package)
    ref = ModelRef(model=snap.model, version=snap.version)
    console.print(f"registered {ref} (sha256 {snap.sha256[:12]})")
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
                        await approve(api, ref, gate.stage)
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
