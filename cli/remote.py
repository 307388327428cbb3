"""The CLI's writes through ``mlc server`` (``MLC_API_URL``): sign here, send there.

Every statement is signed on this machine with the user's key, exactly as in the direct
mode; the server forwards it to the same verification, so it can refuse or delay what
was signed but not change it.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cli.api_client import ApiClient
from cli.lifecycle_uploads import read_lifecycle, sign_upload
from cli.registration import sign_registration
from mlc.artifacts import build_archive
from mlc.config import Settings
from mlc.contracts.rollback import RollbackResult
from mlc.domain import ApprovalRecord, Decision, LifecycleDefinition, ModelRef, ModelSnapshot
from mlc.errors import NotFoundError
from mlc.lifecycle_client import DecisionContext, sign_in_context
from mlc.manifest import load_manifest
from mlc.statements import Envelope
from mlc.trust.signer import Signer


async def me(api: ApiClient) -> Signer:
    """The caller as the server knows them (by this key), ready to sign."""
    return Signer(str((await api.get("/v1/me"))["name"]), api.key)


async def govern(
    api: ApiClient, action: str, args: dict[str, Any], *, subject: str | None = None
) -> dict[str, Any]:
    """Sign one governance statement and have the server verify and record it."""
    envelope = (await me(api)).governance(action, args, subject=subject)
    answer: dict[str, Any] = await api.post("/v1/governance", {"envelope": envelope.to_json()})
    return answer


async def statement(cfg: Settings, action: str, args: dict[str, Any]) -> None:
    """Sign one governance statement with the user's key and have it verified and recorded:
    by ``mlc server`` when ``MLC_API_URL`` is set, else directly in the inventory."""
    from cli import admin
    from cli.context import api, inventory, signer

    remote = api(cfg)
    if remote is not None:
        async with remote:
            await govern(remote, action, args)
        return
    async with inventory(cfg) as pool:
        await admin.submit(pool, cfg, await signer(cfg, pool), action, args)


async def register(api: ApiClient, package_dir: Path) -> tuple[ModelSnapshot, bool]:
    """Archive the package here, upload it by its digest, then send the signed registration."""
    manifest = load_manifest(package_dir)
    data = build_archive(package_dir)
    digest = hashlib.sha256(data).digest()
    sha256 = digest.hex()
    headers = {
        "content-type": "application/gzip",
        "content-digest": f"sha-256=:{base64.b64encode(digest).decode()}:",
    }
    await api.put(f"/v1/artifacts/{sha256}", data, headers)
    envelope = sign_registration(await me(api), manifest.name, sha256)
    answer = await api.post("/v1/snapshots", {"envelope": envelope.to_json()})
    return ModelSnapshot.model_validate(answer["snapshot"]), bool(answer["new"])


def _run_path(ref: ModelRef) -> str:
    return f"/v1/runs/{quote(ref.model, safe='')}/{ref.version}"


async def sign_decision(
    api: ApiClient, ref: ModelRef, *, stage: str, decision: Decision, comment: str, evidence: str | None
) -> Envelope:
    """A decision signed here on the evidence the server says the gate shows (refused
    unless it is ``evidence``, the digest the person was shown, when given)."""
    context = DecisionContext.model_validate(await api.get(f"{_run_path(ref)}/decision-context", stage=stage))
    return sign_in_context(
        await me(api), context, stage=stage, decision=decision, comment=comment, evidence=evidence
    )


async def send_decision(api: ApiClient, ref: ModelRef, envelope: Envelope) -> ApprovalRecord:
    answer = await api.post(f"{_run_path(ref)}/decisions", {"envelope": envelope.to_json()})
    return ApprovalRecord.model_validate(answer)


async def upload_lifecycle(api: ApiClient, path: Path, name: str | None) -> tuple[LifecycleDefinition, bool]:
    lifecycle, source = read_lifecycle(path, name)
    envelope = sign_upload(await me(api), lifecycle, source)
    answer = await api.post(
        "/v1/lifecycles",
        {"name": lifecycle, "filename": path.name, "source": source, "envelope": envelope.to_json()},
    )
    return LifecycleDefinition.model_validate(answer["definition"]), bool(answer["new"])


async def roll_back(
    api: ApiClient, *, model: str, stage: str, reason: str, version: int | None
) -> RollbackResult:
    """Sign the rollback here (a named version bound to its sha256), start it, wait for it."""
    sha256 = None
    if version is not None:
        found = [s async for s in api.pages("/v1/snapshots", model=model) if s["version"] == version]
        if not found:
            raise NotFoundError(f"snapshot {model}@{version} does not exist")
        sha256 = str(found[0]["sha256"])
    envelope = (await me(api)).rollback(
        model=model, stage=stage, reason=reason, version=version, sha256=sha256
    )
    started = await api.post("/v1/rollbacks", {"envelope": envelope.to_json()})
    while True:  # the server waits up to its limit per call; a cold rollback takes longer
        state = await api.get(f"/v1/rollbacks/{quote(started['id'], safe='')}")
        if state["state"] == "done":
            return RollbackResult.model_validate(state["result"])
