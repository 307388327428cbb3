"""Uploading lifecycle code through the API (`mlc lifecycle upload`): the source and the
uploader's signed ``lifecycle.upload`` statement over its sha256; checked, dry-run in the
sandbox and stored by :mod:`server.operations.lifecycles`."""

from __future__ import annotations

from pydantic import BaseModel, Field

from mlc.domain import LifecycleDefinition
from mlc.statements import Envelope
from server.api import JSON_BODY_LIMIT, Call, endpoint
from server.operations import lifecycles
from server.principal import Role
from server.signed import check_signer


class LifecycleUpload(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    """The workflow type to run it as."""
    filename: str = Field(default="lifecycle.py", min_length=1, max_length=200)
    """Shown in problem messages (``file:line: reason``)."""
    source: str
    envelope: Envelope


class UploadedLifecycle(BaseModel):
    definition: LifecycleDefinition
    new: bool


@endpoint(
    "POST",
    "/v1/lifecycles",
    role=Role.MEMBER,
    body=LifecycleUpload,
    response=UploadedLifecycle,
    limit=2 * lifecycles.MAX_SOURCE_BYTES + JSON_BODY_LIMIT,
    summary="Upload signed lifecycle code: checked, dry-run in the sandbox, stored (`mlc lifecycle upload`; "
    "the uploader needs the author role by governance)",
)
async def upload_lifecycle(call: Call) -> UploadedLifecycle:
    body: LifecycleUpload = call.body
    await check_signer(call, body.envelope)
    definition, new = await lifecycles.upload(
        call.ctx.pool,
        call.ctx.settings,
        body.envelope,
        name=body.name,
        source=body.source,
        filename=body.filename,
    )
    return UploadedLifecycle(definition=definition, new=new)
