"""The interface every runtime kind implements, and its request/result payloads."""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from mlc.config import Settings
from mlc.domain import Frozen, ModelSnapshot, Runtime, RuntimeKind

Heartbeat = Callable[[str], None]
"""Called with a short progress note while long work runs (activities forward it)."""


class OnlineDeployRequest(Frozen):
    """Bring up a persistent scoring endpoint for a snapshot on a runtime."""

    deployment_id: str
    snapshot: ModelSnapshot
    runtime: Runtime
    stage: str


class OnlineDeployResult(Frozen):
    """Where the endpoint listens, plus driver facts worth recording (pid, container id)."""

    endpoint: str
    details: dict[str, Any] = Field(default_factory=dict)


class BatchJobRequest(Frozen):
    """Score a JSON-lines dataset with an ephemeral job, leaving nothing running."""

    deployment_id: str
    snapshot: ModelSnapshot
    runtime: Runtime
    stage: str
    input_path: str | None = None
    """JSON-lines input on the runtime's host; None scores the package's test dataset."""


class BatchJobResult(Frozen):
    """What the job did: where the output is, how many records, how long."""

    output_path: str
    records: int
    seconds: float
    details: dict[str, Any] = Field(default_factory=dict)


class UndeployRequest(Frozen):
    """Remove a deployment from its runtime (a no-op when it is already gone)."""

    deployment_id: str
    runtime: Runtime


class CleanupRequest(Frozen):
    """Remove whatever a runtime still runs for deployments not in ``keep``."""

    runtime: Runtime
    keep: tuple[str, ...] = ()


class CleanupResult(Frozen):
    """Deployment ids whose leftovers were removed."""

    removed: tuple[str, ...] = ()


class RuntimeDriver(abc.ABC):
    """How one runtime kind deploys, runs batch jobs, undeploys and cleans up.

    Every method is idempotent by deployment id: Temporal retries activities, and a
    worker can crash between starting something and reporting it.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def workdir(self, runtime: Runtime, deployment_id: str) -> Path:
        """A per-deployment folder on this host (package, logs, batch input/output)."""
        return self.settings.runtime_dir / runtime.name / deployment_id

    @abc.abstractmethod
    async def deploy_online(self, request: OnlineDeployRequest, heartbeat: Heartbeat) -> OnlineDeployResult:
        """Start (or find) the endpoint and return once ``/health`` answers."""

    @abc.abstractmethod
    async def run_batch(self, request: BatchJobRequest, heartbeat: Heartbeat) -> BatchJobResult:
        """Run the job to completion and clear the runtime of it."""

    @abc.abstractmethod
    async def undeploy(self, request: UndeployRequest) -> None:
        """Stop and remove the deployment; succeed when nothing is left."""

    @abc.abstractmethod
    async def cleanup(self, request: CleanupRequest) -> CleanupResult:
        """Remove leftovers of deployments that are not in ``request.keep``."""


def driver_for(runtime: Runtime, settings: Settings) -> RuntimeDriver:
    """Return the driver for ``runtime.kind``."""
    if runtime.kind is RuntimeKind.LOCAL:
        from activities.runtimes.local import LocalDriver

        return LocalDriver(settings)
    if runtime.kind is RuntimeKind.DOCKER:
        from activities.runtimes.docker import DockerDriver

        return DockerDriver(settings)
    raise ValueError(f"runtime {runtime.name}: unknown kind {runtime.kind!r}")
