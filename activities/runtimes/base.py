"""The interface every runtime kind implements, and its request/result payloads.

The requests a runtime activity hands its driver (:class:`OnlineDeployRequest`...) and the
activity results (:class:`OnlineDeployResult`, :class:`BatchJobResult`) belong to the
runtime activity contracts (:mod:`mlc.contracts.runtime`) and are re-exported here.
"""

from __future__ import annotations

import abc
import asyncio
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import httpx

from mlc import endpoints
from mlc.config import Settings
from mlc.contracts.runtime import BatchJobRequest as BatchJobRequest
from mlc.contracts.runtime import BatchJobResult as BatchJobResult
from mlc.contracts.runtime import OnlineDeployRequest as OnlineDeployRequest
from mlc.contracts.runtime import OnlineDeployResult as OnlineDeployResult
from mlc.contracts.runtime import StreamingDeployRequest as StreamingDeployRequest
from mlc.contracts.runtime import StreamingDeployResult as StreamingDeployResult
from mlc.contracts.runtime import UndeployRequest as UndeployRequest
from mlc.contracts.traffic import RouteTrafficResult, TrafficObservation
from mlc.domain import Frozen, Runtime, TrafficRoute
from mlc.errors import DeploymentFailedError, NotFoundError, RefusedError

Heartbeat = Callable[[str], None]
"""Called with a short progress note while long work runs (activities forward it)."""

BATCH_OUTPUT = "output.jsonl"
"""A batch job's output inside its deployment folder (every driver writes it there)."""

DEPLOYMENT_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,199}$")
"""What the inventory's deployment ids look like (``cc-fraud-v1-dev-local-dev-1a2b3c4d``)."""


PROBE_TRIES = 3
"""How often a probe asks ``/health`` (0.5 s apart) before it judges a server unhealthy."""


async def ask_health(endpoint: str) -> str | None:
    """None when ``endpoint/health`` answers 200 within :data:`PROBE_TRIES` tries, else
    what it gave last (``HTTP 503``, ``ConnectError``...) for the probe's message."""
    answer = "no answer"
    for _ in range(PROBE_TRIES):
        try:
            response = await endpoints.get(endpoint, "/health", timeout=2.0)
            if response.status_code == 200:
                return None
            answer = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            answer = type(exc).__name__
        await asyncio.sleep(0.5)
    return answer


def check_deployment_id(value: str) -> str:
    """Return ``value`` if it can be a deployment id, else raise :class:`RefusedError`.

    Ids name folders and containers, so one with ``/``, ``..`` or odd characters is
    refused before it reaches a path or an engine.
    """
    if not DEPLOYMENT_ID.fullmatch(value) or ".." in value:
        raise RefusedError(
            f"deployment id {value[:80]!r} is not valid: ids are lower-case letters, digits, '.', '_' "
            "and '-' without '..' (e.g. cc-fraud-v1-dev-local-dev-1a2b3c4d); use the ids "
            "`mlc deployments` lists"
        )
    return value


class CleanupRequest(Frozen):
    """Remove whatever a runtime still runs for deployments not in ``keep``."""

    runtime: Runtime
    keep: tuple[str, ...] = ()


class CleanupResult(Frozen):
    """Deployment ids whose leftovers were removed."""

    removed: tuple[str, ...] = ()


class ProbeRequest(Frozen):
    """Check one online deployment's health on its runtime (the reconciler's question)."""

    deployment_id: str
    runtime: Runtime


class ProbeResult(Frozen):
    """What the driver found: healthy, or why not, with the server's last log lines."""

    healthy: bool
    detail: str = ""
    log_tail: str = ""
    endpoint: str | None = None


class RuntimeDriver(abc.ABC):
    """How one runtime kind deploys, runs batch jobs, undeploys and cleans up.

    Every method is idempotent by deployment id: Temporal retries activities, and a
    worker can crash between starting something and reporting it.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def workdir(self, runtime: Runtime, deployment_id: str) -> Path:
        """A per-deployment folder on this host (package, logs, batch input/output).

        Raises:
            RefusedError: the id is not a valid deployment id, or the folder would not be
                inside ``runtime_dir/<runtime>`` (checked after resolving symlinks).
        """
        root = (self.settings.runtime_dir / runtime.name).resolve()
        path = (root / check_deployment_id(deployment_id)).resolve()
        if path.parent != root:
            raise RefusedError(f"deployment {deployment_id}: its folder {path} is outside {root}")
        return path

    async def locate(self, runtime: Runtime, deployment_id: str) -> str:
        """Where the live online deployment answers (its endpoint URL), found by this driver.

        Tests ask the driver rather than trusting an endpoint from a workflow's payload.

        Raises:
            NotFoundError: the deployment does not run on this runtime.
        """
        raise NotFoundError(f"runtime {runtime.name} ({runtime.kind.value}) cannot locate deployments")

    def batch_output(self, runtime: Runtime, deployment_id: str) -> Path:
        """The output file of the deployment's batch job on this host."""
        return self.workdir(runtime, deployment_id) / BATCH_OUTPUT

    @abc.abstractmethod
    async def deploy_online(self, request: OnlineDeployRequest, heartbeat: Heartbeat) -> OnlineDeployResult:
        """Start (or find) the endpoint and return once ``/health`` answers."""

    @abc.abstractmethod
    async def run_batch(self, request: BatchJobRequest, heartbeat: Heartbeat) -> BatchJobResult:
        """Run the job to completion and clear the runtime of it."""

    async def deploy_streaming(
        self, request: StreamingDeployRequest, heartbeat: Heartbeat
    ) -> StreamingDeployResult:
        """Start (or keep) the deployment's consumers and return once each is ready."""
        raise DeploymentFailedError(
            f"runtime {request.runtime.name} ({request.runtime.kind.value}) cannot run streaming "
            "deployments; use a local or docker runtime"
        )

    @abc.abstractmethod
    async def undeploy(self, request: UndeployRequest) -> None:
        """Stop and remove the deployment; succeed when nothing is left."""

    @abc.abstractmethod
    async def cleanup(self, request: CleanupRequest) -> CleanupResult:
        """Remove leftovers of deployments that are not in ``request.keep``."""

    @abc.abstractmethod
    async def probe(self, request: ProbeRequest) -> ProbeResult:
        """Is the online deployment running and answering ``/health``? Never raises for a
        dead or missing deployment (that is the answer); raises only when the runtime
        itself cannot be asked (e.g. its engine is unreachable), so nothing is judged."""

    async def restart(self, request: OnlineDeployRequest, heartbeat: Heartbeat) -> OnlineDeployResult:
        """Bring the same deployment of the same snapshot back up (the reconciler's remedy).

        The default removes what is left and deploys afresh; drivers that can keep the
        endpoint (same port, same container) override it.
        """
        await self.undeploy(UndeployRequest(deployment_id=request.deployment_id, runtime=request.runtime))
        return await self.deploy_online(request, heartbeat)

    @abc.abstractmethod
    async def route(
        self,
        runtime: Runtime,
        model: str,
        routes: Sequence[TrafficRoute],
        heartbeat: Heartbeat,
        *,
        repair: bool = False,
        as_of: datetime | None = None,
    ) -> RouteTrafficResult:
        """Make ``routes`` answer ``model``'s stable endpoint on the runtime's gateway.

        Returns once the gateway serves them; each deployment is found with
        :meth:`locate`. See :mod:`activities.runtimes.gateway` (local and docker kinds).

        Raises:
            RefusedError: the runtime has no gateway settings, or the routes are not valid.
            NotFoundError: a routed deployment does not run on this runtime.
            DeploymentFailedError: the proxy refused the configuration or did not reload.
        """

    @abc.abstractmethod
    async def observe(
        self,
        runtime: Runtime,
        model: str,
        routes: Sequence[TrafficRoute],
        since: datetime,
        until: datetime,
    ) -> TrafficObservation:
        """What the runtime's gateway saw for ``routes`` of ``model`` between ``since`` and
        ``until``: requests, errors and latency per deployment, and a shadow's comparison."""
