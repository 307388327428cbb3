"""Runtime activities: deploy, run batch jobs and undeploy through a runtime's driver.

They run on the runtime's task queue, so a worker next to a remote Docker engine can
serve them; they never touch PostgreSQL (the workflow records results through the
inventory activities), which keeps such a worker free of database credentials.
"""

from __future__ import annotations

from temporalio import activity

from activities.boundary import mlc_errors
from activities.runtimes.base import (
    BatchJobRequest,
    BatchJobResult,
    OnlineDeployRequest,
    OnlineDeployResult,
    UndeployRequest,
    driver_for,
)
from mlc import names
from mlc.config import Settings


def _heartbeat(note: str) -> None:
    activity.heartbeat(note)


class RuntimeActivities:
    """Driver-backed activities; the driver is chosen by each request's runtime kind."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @activity.defn(name=names.DEPLOY_ONLINE)
    @mlc_errors
    async def deploy_online(self, request: OnlineDeployRequest) -> OnlineDeployResult:
        """Bring up (or find) the deployment's endpoint and return when it is healthy."""
        driver = driver_for(request.runtime, self.settings)
        return await driver.deploy_online(request, _heartbeat)

    @activity.defn(name=names.RUN_BATCH_JOB)
    @mlc_errors
    async def run_batch_job(self, request: BatchJobRequest) -> BatchJobResult:
        """Run an ephemeral scoring job to completion; the runtime is cleared afterwards."""
        driver = driver_for(request.runtime, self.settings)
        return await driver.run_batch(request, _heartbeat)

    @activity.defn(name=names.UNDEPLOY)
    @mlc_errors
    async def undeploy(self, request: UndeployRequest) -> None:
        """Stop and remove a deployment (succeeds when it is already gone)."""
        await driver_for(request.runtime, self.settings).undeploy(request)
