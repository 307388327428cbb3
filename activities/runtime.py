"""Runtime activities: deploy, run batch jobs and undeploy through a runtime's driver.

They run on the runtime's task queue, so a worker next to a remote Docker engine can
serve them; they never touch PostgreSQL, which keeps such a worker free of database
credentials. They act only on a grant signed by the platform key (see
:mod:`mlc.trust.grants`): the runtime, snapshot and deployment id come from the grant,
which the trusted inventory worker issued after checking the policy, never from the
workflow's payload.
"""

from __future__ import annotations

from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from temporalio import activity

from activities.boundary import calling_run, mlc_errors
from activities.runtimes.base import (
    BatchJobRequest,
    BatchJobResult,
    OnlineDeployRequest,
    OnlineDeployResult,
    StreamingDeployRequest,
    StreamingDeployResult,
    UndeployRequest,
)
from activities.runtimes.registry import driver_for
from mlc.config import Settings
from mlc.contracts import runtime as rt
from mlc.contracts import traffic
from mlc.contracts.runtime import RuntimeActionInput
from mlc.domain import TrafficRoute, check_routes
from mlc.errors import RefusedError
from mlc.statements import Envelope
from mlc.trust import evidence, grants


def _heartbeat(note: str) -> None:
    activity.heartbeat(note)


_Signable = TypeVar("_Signable", OnlineDeployResult, BatchJobResult, StreamingDeployResult)


def _deploy(grant: grants.RuntimeGrant) -> OnlineDeployRequest:
    """The granted deployment as the drivers take it (online, batch and streaming alike)."""
    if grant.snapshot is None:
        raise RefusedError("the grant names no snapshot")
    return OnlineDeployRequest(
        deployment_id=grant.deployment_id,
        snapshot=grant.snapshot,
        runtime=grant.runtime,
        stage=grant.stage,
    )


class RuntimeActivities:
    """Driver-backed activities; the driver is chosen by the granted runtime's kind."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._public: Ed25519PublicKey | None = None

    def _granted(self, request: RuntimeActionInput, action: grants.RuntimeAction) -> grants.RuntimeGrant:
        if self._public is None:
            self._public = grants.platform_public_key(self.settings.platform_key_path)
        return grants.check(request.grant, self._public, action=action, run_id=calling_run().run_id)

    def _signed(self, grant: grants.RuntimeGrant, result: _Signable) -> _Signable:
        """``result`` with its evidence: signed by the granted runtime's evidence key."""
        facts = result.model_dump(mode="json", exclude={"evidence"})
        signed = evidence.sign_granted(self.settings.home, grant, "deploy", facts)
        return result.model_copy(update={"evidence": signed})

    @rt.DEPLOY_ONLINE.implement
    @mlc_errors
    async def deploy_online(self, request: RuntimeActionInput) -> OnlineDeployResult:
        """Bring up (or find) the granted deployment's endpoint and return when it is healthy."""
        grant = self._granted(request, "deploy_online")
        result = await driver_for(grant.runtime, self.settings).deploy_online(_deploy(grant), _heartbeat)
        return self._signed(grant, result)

    @rt.RUN_BATCH_JOB.implement
    @mlc_errors
    async def run_batch_job(self, request: RuntimeActionInput) -> BatchJobResult:
        """Run the granted ephemeral scoring job to completion; the runtime is cleared afterwards."""
        grant = self._granted(request, "run_batch_job")
        job = BatchJobRequest(**_deploy(grant).model_dump())
        return self._signed(grant, await driver_for(job.runtime, self.settings).run_batch(job, _heartbeat))

    @rt.DEPLOY_STREAMING.implement
    @mlc_errors
    async def deploy_streaming(self, request: RuntimeActionInput) -> StreamingDeployResult:
        """Start (or keep) the granted deployment's consumers and return once each is ready.

        Whether it starts in standby (test topics only, while an older version owns the
        input topic) is the grant's, decided by the inventory.
        """
        grant = self._granted(request, "deploy_streaming")
        deploy = StreamingDeployRequest(**_deploy(grant).model_dump(), standby=grant.standby)
        result = await driver_for(deploy.runtime, self.settings).deploy_streaming(deploy, _heartbeat)
        return self._signed(grant, result)

    @rt.UNDEPLOY.implement
    @mlc_errors
    async def undeploy(self, request: RuntimeActionInput) -> None:
        """Stop and remove the granted deployment (succeeds when it is already gone)."""
        grant = self._granted(request, "undeploy")
        await driver_for(grant.runtime, self.settings).undeploy(
            UndeployRequest(deployment_id=grant.deployment_id, runtime=grant.runtime)
        )

    def _traffic_grant(
        self, envelope: Envelope, action: grants.RuntimeAction
    ) -> tuple[grants.RuntimeGrant, str, tuple[TrafficRoute, ...]]:
        """The verified grant with its model and routes (checked again: the grant is the
        only source of what the gateway is told)."""
        grant = self._granted(RuntimeActionInput(grant=envelope), action)
        if not grant.model:
            raise RefusedError(f"the {action} grant names no model")
        try:
            routes = check_routes(grant.routes)
        except ValueError as exc:
            raise RefusedError(f"the {action} grant's routes of model {grant.model}: {exc}") from None
        return grant, grant.model, routes

    @traffic.ROUTE_TRAFFIC.implement
    @mlc_errors
    async def route_traffic(self, request: RuntimeActionInput) -> traffic.RouteTrafficResult:
        """Make the granted routes answer the model's stable endpoint on the runtime's gateway.

        Returns once the gateway serves them (graceful reload: requests in flight finish on
        the old routes). Idempotent: the same routes again change nothing.
        """
        grant, model, routes = self._traffic_grant(request.grant, "route_traffic")
        return await driver_for(grant.runtime, self.settings).route(
            grant.runtime, model, routes, _heartbeat, repair=grant.repair, as_of=grant.as_of
        )

    @traffic.OBSERVE_TRAFFIC.implement
    @mlc_errors
    async def observe_traffic(self, request: traffic.ObserveTrafficInput) -> traffic.TrafficObservation:
        """What the gateway saw for the granted routes between ``since`` and ``until``:
        requests, server errors and latency per deployment, and a shadow's comparison."""
        grant, model, routes = self._traffic_grant(request.grant, "observe_traffic")
        if request.until < request.since:
            raise RefusedError(f"the window ends ({request.until}) before it starts ({request.since})")
        seen = await driver_for(grant.runtime, self.settings).observe(
            grant.runtime, model, routes, request.since, request.until
        )
        facts = seen.model_dump(mode="json", exclude={"evidence"})
        signed = evidence.sign_granted(self.settings.home, grant, "traffic_observation", facts)
        return seen.model_copy(update={"evidence": signed})
