"""Load: N lifecycles at once on one worker, every gate approved by concurrent clients,
against the same number of bare Temporal workflows approved the same way, interleaved.

What runs:

* one Temporal dev server (in memory) and one embedded PostgreSQL;
* the worker under measurement: a real ``mlc worker`` process (every built-in workflow
  and inventory activity: PostgreSQL, signed grants, the hash-chained trail), with
  ``MLC_WORKFLOW_CACHE`` = ``--cache`` (default: the product default, 100);
* the bare baselines' workers: ``python -m bench.bare_workflow``, one process per baseline, with
  the same ``max_cached_workflows``, serving ``BenchBareLifecycle`` (``bench/bare_workflow.py``);
* the runtimes' side is a stand-in worker in this process on the runtimes' own task
  queue: batch jobs and stage tests that return at once, signed with the runtime's
  evidence key as a real runtime worker signs them (the inventory records nothing
  unsigned). The load is the orchestration, not model code: each run is
  ``ModelLifecycle`` with the spec DEV (gate) -> SIT (gate) -> UAT, batch mode, no tests,
  so two signed approvals per run;
* N snapshots per round, registered beforehand, untimed, of ``--models`` distinct models
  (default: one model each; ``--models 1``: N versions of one model, all in flight at once);
* K approver clients (separate Temporal connections, each person with their own key).

Fairness rules:

* same work: the bare workflow runs the activities a real lifecycle run of this spec ran,
  read from its history (a warm-up run, not counted): as many scheduled activities and as
  many local activities, in the same order, in the same segments between the same number
  of update-driven gates (``bench.bare_workflow.segments_of``); the bench checks that a bare
  run's history has exactly those;
* and a second baseline for a skeptic: N more bare runs with the same steps, except that
  the local activities right after each gate run behind the next scheduled one
  (``bench.bare_workflow.update_only``), so their decision costs a Workflow Update alone;
  the ratio against them is printed too (the goal is judged against same-work bare runs);
* same conditions: every worker is a process of its own with the same workflow cache and
  N runs to serve (the bare and the update-only bare runs have one worker each);
  N lifecycles and N bare runs are parked at their gates at the same time, and each gate
  round is one shared queue of jobs alternating lifecycle, bare, bare update-only, ..., taken
  by the same K clients: both kinds of update run in the same time window under the same
  load;
* same measurement: a client waits (untimed) until the run waits at the gate, signs the
  decision (lifecycles only: ``mlc.lifecycle_client.sign_decision``, untimed, as a person
  signs before sending), stamps the time, sends the Workflow Update (``send_decision`` /
  ``approve``) and queries every ``POLL_SECONDS`` until the run shows its next stage
  (segment): that is one approve -> next stage sample;
* repeated: ``--rounds`` rounds, each with fresh runs on the same servers; the report gives
  each round's p50 ratio and their median and spread (min-max), and the pooled
  percentiles (2N samples per side per round);
* nothing lost: every run must succeed, every decision be in the trail exactly once, and
  every bare run finish with its activities; anything else fails the bench (exit status 1).

``--online``: the same, except that DEV deploys online to a real local runtime with its
nginx gateway (``bench-dev``: shared hosting, the default of a local runtime below PROD,
served by the measured ``mlc worker`` on its own queue, as the default local runtimes are,
and as ``tests/test_stable_endpoints.py::test_twenty_versions_promoted_at_once`` sets it
up); SIT and UAT stay batch on the stand-in runtime. Approving DEV promotes: the model's
stable endpoint moves to the new version (one traffic change, applied by nginx) and older
versions there are retired, then the run enters SIT. With ``--models 1`` all N versions'
changes hit one endpoint at once. Its fairness rules, on top of the ones above:

* same work: the warm-up is an ``--online`` run, so the bare runs have its activities
  (the deploy, the traffic change, the retirements as no-ops: the bare side is what
  Temporal alone costs, the lifecycle's extra is the real runtime's work and ours);
* every decision of a gate at once: K defaults to 3N clients, so each lifecycle, bare and
  update-only bare run has its own and all 3N decisions of a gate go out together
  (``--approvers`` lower makes some wait for a free client, on both sides alike);
* status queried every ``POLL_SECONDS`` (5 ms) by all 3N clients, as in batch mode: at
  N=20 a 50 ms interval (``--poll 0.05``) left the bare p50 where it was (1.4-1.7 s
  against 1.4 s), so the queries are not what makes a bare update slow here, and a longer
  interval would only add up to one interval to both sides (a ratio pulled toward 1);
* reported per round (median, spread): the time until all N wait at the DEV gate (start
  call of the first -> the last "waits for approval at DEV" row; every deployment started
  and healthy), DEV approve -> SIT p50/p99 against bare approve -> next segment of the same
  gate, and the time until all N passed DEV (first DEV decision sent -> the last run shown
  in SIT): the stage where, with ``--models 1``, they share the endpoint;
* nothing lost, besides the above: every run's DEV traffic change is in the trail exactly
  once, and each model's stable endpoint answers ``/health`` with the version its traffic
  table says is live; a run that fails (a route change that timed out) fails the bench;
* the runtime's model host, servers and both nginx tiers are stopped when the bench ends.

It also prints start-to-waiting (start call -> the run's "waits for approval at DEV"
notification row) and the worker's RSS with the N runs parked at gates. ``--park-only``
parks N runs and measures RSS only; ``--rss-caches`` then restarts the worker with each
cache size, queries every parked run (which loads it into the cache) and measures RSS
again: the memory of N parked runs when the cache is full.

    .venv/bin/python bench/bench_load.py                       # N=200, K=8, 3 rounds, N models
    .venv/bin/python bench/bench_load.py --models 1            # N versions of one model
    .venv/bin/python bench/bench_load.py --online --runs 20 --models 1  # 20 versions, one endpoint
    .venv/bin/python bench/bench_load.py --online --runs 20             # 20 models behind one gateway
    .venv/bin/python bench/bench_load.py --runs 10000 --park-only            # RSS with 10,000 parked
    .venv/bin/python bench/bench_load.py --runs 2000 --park-only --rss-caches 1000,250,100
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
from temporalio import activity
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from activities.boundary import calling_run  # noqa: E402
from activities.runtimes.base import CleanupRequest  # noqa: E402
from activities.runtimes.registry import driver_for, remove_gateway  # noqa: E402
from bench.bare_workflow import (  # noqa: E402
    BareLifecycle,
    BarePhase,
    GateTask,
    RunBareInput,
    RunBareResult,
    describe,
    gate_tasks,
    segments_of,
    update_only,
)
from cli import admin  # noqa: E402
from cli.registration import register_package  # noqa: E402
from cli.stack.dev_postgres import DevPostgres  # noqa: E402
from cli.stack.devstack import port_open, temporal_cli  # noqa: E402
from mlc import names, processes  # noqa: E402
from mlc.artifacts import ArtifactStore  # noqa: E402
from mlc.config import DEFAULT_WORKFLOW_CACHE, Settings  # noqa: E402
from mlc.contracts import runtime as rt  # noqa: E402
from mlc.contracts.lifecycle import LifecycleStatus, SignedDecision  # noqa: E402
from mlc.contracts.runtime import (  # noqa: E402
    BatchJobResult,
    RunStageTestsInput,
    RunStageTestsResult,
    RuntimeActionInput,
)
from mlc.domain import (  # noqa: E402
    ApprovalGate,
    Decision,
    GatewaySettings,
    LifecycleSpec,
    LifecycleState,
    Mode,
    ModelRef,
    Runtime,
    StageSpec,
)
from mlc.lifecycle_client import read_status, send_decision, sign_decision, start_lifecycle  # noqa: E402
from mlc.store import connect, runtimes, traffic, trail  # noqa: E402
from mlc.store.db import enable_worker_login  # noqa: E402
from mlc.traffic import pick_gateway_port  # noqa: E402
from mlc.trust import evidence, grants  # noqa: E402
from mlc.trust.keys import create_key, public_text  # noqa: E402
from mlc.trust.signer import Signer  # noqa: E402

MODEL = ROOT / "tests" / "fixtures" / "models" / "weak-model"
STAGES = ("DEV", "SIT", "UAT")
SPEC = LifecycleSpec(
    stages=(
        StageSpec(name="DEV", mode=Mode.BATCH, tests=(), gate=ApprovalGate()),
        StageSpec(name="SIT", mode=Mode.BATCH, tests=(), gate=ApprovalGate()),
        StageSpec(name="UAT", mode=Mode.BATCH, tests=()),
    )
)
ONLINE_SPEC = LifecycleSpec(
    stages=(
        StageSpec(name="DEV", mode=Mode.ONLINE, tests=(), gate=ApprovalGate()),
        *SPEC.stages[1:],
    )
)
"""``--online``: DEV deploys online to a local runtime with a gateway (its stable endpoint
moves on approval), SIT and UAT as in batch mode."""
MAIN_QUEUE = "bench-load"
RUNTIME_QUEUE = "bench-load-runtimes"
BARE_QUEUE = "bench-load-bare"
UPDATE_QUEUE = "bench-load-bare-update"
"""The update-only bare runs' queue, served by a third worker process (N runs each, like ours)."""
QUERY_TIMEOUTS: dict[str, int] = {}
"""Status queries the server gave up on (the worker too busy to answer in time), by what
was waited for; the poll asks again, so the sample includes that time."""
POLL_SECONDS = 0.005
"""Between queries while waiting for a gate or the next stage (the same for both workflows;
``--poll`` sets it)."""
STEP_TIMEOUT_SECONDS = 600.0
GOAL_PARKED = 10_000
GOAL_RSS_MB = 200.0
GOAL_RATIO = 1.5

T = TypeVar("T")


# --- the runtimes' stand-ins -----------------------------------------------------------


class StandinRuntime:
    """Batch jobs and stage tests that do nothing, signed as a runtime worker signs them:
    the grant is verified with the platform key, the result signed with the runtime's
    evidence key (created under the shared ``MLC_HOME`` when the runtime was registered)."""

    def __init__(self, settings: Settings) -> None:
        self.home = settings.home
        self.public = grants.platform_public_key(settings.platform_key_path)

    def _grant(self, envelope: Any, action: grants.RuntimeAction) -> grants.RuntimeGrant:
        return grants.check(envelope, self.public, action=action, run_id=calling_run().run_id)

    @activity.defn(name=rt.RUN_BATCH_JOB.name)
    async def batch_job(self, request: RuntimeActionInput) -> BatchJobResult:
        """A batch job that has nothing to score."""
        grant = self._grant(request.grant, "run_batch_job")
        result = BatchJobResult(output_path="/dev/null", records=0, seconds=0.0)
        facts = result.model_dump(mode="json", exclude={"evidence"})
        return result.model_copy(
            update={"evidence": evidence.sign_granted(self.home, grant, "deploy", facts)}
        )

    @activity.defn(name=rt.RUN_STAGE_TESTS.name)
    async def stage_tests(self, request: RunStageTestsInput) -> RunStageTestsResult:
        """No tests were asked for."""
        return RunStageTestsResult(results=())


# --- servers and setup -----------------------------------------------------------------


def free_port() -> int:
    """A loopback port nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Bench:
    """Everything the phases share."""

    work: Path
    settings: Settings
    pool: asyncpg.Pool
    worker_dsn: str
    approvers: list[Signer]
    refs: list[ModelRef]
    """Snapshots not yet used by a run, taken in order."""
    spec: LifecycleSpec = SPEC
    worker: subprocess.Popen[bytes] | None = None
    bare_workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def take(self, count: int) -> list[ModelRef]:
        """The next ``count`` unused snapshots."""
        taken, self.refs = self.refs[:count], self.refs[count:]
        if len(taken) < count:
            raise RuntimeError(f"only {len(taken)} snapshots left, {count} needed")
        return taken

    def worker_env(self, cache: int) -> dict[str, str]:
        """The measured worker's environment."""
        return {
            **os.environ,
            "MLC_HOME": str(self.settings.home),
            "MLC_DATABASE_URL": self.settings.database_url or "",
            "MLC_WORKER_DATABASE_URL": self.worker_dsn,
            "TEMPORAL_ADDRESS": self.settings.temporal_address,
            "MLC_TASK_QUEUE": MAIN_QUEUE,
            "MLC_TRUST_ROOT": self.settings.trust_root or "",
            "MLC_WORKFLOW_CACHE": str(cache),
            "PYTHONPATH": str(ROOT),
        }

    async def _spawn(
        self, client: Client, args: list[str], env: dict[str, str], queue: str, log_name: str
    ) -> subprocess.Popen[bytes]:
        """Start a worker process and wait until it polls ``queue``."""
        log_path = self.work / log_name
        with log_path.open("ab") as log:
            child = processes.spawn(args, log=log, env=env, cwd=ROOT)
        request = DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
        while not (await client.workflow_service.describe_task_queue(request)).pollers:
            if child.poll() is not None:
                raise RuntimeError(f"{args[2]} exited: {log_path.read_text()[-3000:]}")
            await asyncio.sleep(0.1)
        return child

    async def start_worker(self, client: Client, cache: int) -> None:
        """Start ``mlc worker`` and wait until it polls the main queue."""
        self.worker = await self._spawn(
            client, [sys.executable, "-m", "mlc", "worker"], self.worker_env(cache), MAIN_QUEUE, "worker.log"
        )

    async def start_bare_worker(self, client: Client, cache: int, queue: str) -> None:
        """Start a bare workflow worker process for ``queue`` with the same cache."""
        args = [sys.executable, "-m", "bench.bare_workflow", "--address", self.settings.temporal_address]
        args += ["--task-queue", queue, "--cache", str(cache)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.bare_workers.append(await self._spawn(client, args, env, queue, f"{queue}.log"))

    def stop_worker(self) -> None:
        """SIGTERM the measured worker and wait for it."""
        if self.worker is not None:
            processes.stop(self.worker.pid, signum=signal.SIGTERM, timeout=60, child=self.worker)
            self.worker = None

    def stop_bare_workers(self) -> None:
        """SIGTERM the bare workers and wait for them."""
        while self.bare_workers:
            child = self.bare_workers.pop()
            processes.stop(child.pid, signum=signal.SIGTERM, timeout=60, child=child)

    def rss_mb(self) -> float:
        """The worker process's resident set size (``VmRSS``), in MB."""
        assert self.worker is not None
        for line in Path(f"/proc/{self.worker.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")


async def setup(
    work: Path, address: str, dsn: str, snapshots: int, approvers: int, models: int, *, online: bool
) -> Bench:
    """Trust root, people, runtimes and the snapshots, of ``models`` models (untimed).
    ``online``: DEV is a local runtime with a gateway on the measured worker's own queue
    (as the default local runtimes are), shared hosting (the default below PROD)."""
    settings = replace(
        Settings.from_env(home=work / "home"),
        database_url=dsn,
        temporal_address=address,
        task_queue=MAIN_QUEUE,
    )
    pool = await connect(dsn, max_size=16)
    keys = work / "keys"
    root_key = create_key(keys / "admin.pem")
    settings = replace(settings, trust_root=await admin.init_admin(pool, settings, "bench-admin", root_key))
    root = Signer("bench-admin", root_key)
    registrar_key = create_key(keys / "registrar.pem")
    await admin.add_key(pool, settings, root, "bench-registrar", public_text(registrar_key.public_key()))
    people = []
    for index in range(approvers):
        key = create_key(keys / f"approver-{index}.pem")
        await admin.add_key(pool, settings, root, f"approver-{index}", public_text(key.public_key()))
        await admin.grant_role(pool, settings, root, f"approver-{index}", "approver")
        people.append(Signer(f"approver-{index}", key))
    for stage in STAGES:
        runtime = Runtime(
            name=f"bench-{stage.lower()}", stage=stage, modes=(Mode.BATCH,), task_queue=RUNTIME_QUEUE
        )
        if online and stage == STAGES[0]:
            gateway = GatewaySettings(port=pick_gateway_port())
            runtime = Runtime(
                name="bench-dev", stage=stage, modes=(Mode.ONLINE,), gateway=gateway, task_queue=MAIN_QUEUE
            )
        await admin.add_runtime(pool, settings, root, runtime)
    store, registrar = ArtifactStore(settings.artifact_dir), Signer("bench-registrar", registrar_key)
    refs: list[ModelRef] = []
    packages = work / "packages"
    manifest = (MODEL / "manifest.yaml").read_text()
    started = time.perf_counter()
    for index in range(snapshots):
        package = packages / f"p{index}"
        shutil.copytree(MODEL, package)
        name = f"load-{index % models}"
        (package / "manifest.yaml").write_text(manifest.replace("name: weak-model", f"name: {name}", 1))
        (package / "bench.txt").write_text(f"copy {index}\n")  # new content: a new snapshot
        snap, _ = await register_package(pool, store, package, signer=registrar, settings=settings)
        refs.append(ModelRef(model=snap.model, version=snap.version))
        shutil.rmtree(package)
    print(
        f"setup: {snapshots} snapshots of {min(models, snapshots)} model(s) registered "
        f"in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    spec = ONLINE_SPEC if online else SPEC
    return Bench(work, settings, pool, await enable_worker_login(pool, dsn), people, refs, spec)


# --- driving runs ----------------------------------------------------------------------


async def poll(
    query: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, what: str, side: str = "ModelLifecycle"
) -> T:
    """Query until ``done`` (bounded); a query the server timed out is asked again (counted)."""
    deadline = time.perf_counter() + STEP_TIMEOUT_SECONDS
    while True:
        try:
            last = await query()
        except RPCError as exc:
            if exc.status not in (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED):
                raise
            if time.perf_counter() > deadline:
                raise TimeoutError(f"gave up waiting for {what}: {exc}") from exc
            QUERY_TIMEOUTS[side] = QUERY_TIMEOUTS.get(side, 0) + 1
            continue
        if done(last):
            return last
        if time.perf_counter() > deadline:
            raise TimeoutError(f"gave up waiting for {what}; last answer: {last}")
        await asyncio.sleep(POLL_SECONDS)


async def approve_lifecycle(
    bench: Bench, client: Client, person: Signer, ref: ModelRef, stage: str, following: str
) -> float:
    """Wait for ``ref``'s gate at ``stage``, sign, send; seconds from the update until the
    run shows ``following``."""
    handle: WorkflowHandle[Any, Any] = client.get_workflow_handle(
        names.workflow_id_for(ref.model, ref.version)
    )

    async def status() -> LifecycleStatus | None:
        found = await read_status(handle)
        if found is not None and found.state is LifecycleState.FAILED:
            raise RuntimeError(f"{ref} failed in {found.stage}: {found.reason}")
        return found

    await poll(
        status,
        lambda s: s is not None and s.pending_gate is not None and s.pending_gate.stage == stage,
        what=f"{ref} at the {stage} gate",
    )
    gate, envelope = await sign_decision(
        client, bench.pool, person, ref, stage=stage, decision=Decision.APPROVED, comment="load"
    )
    sent = time.perf_counter()
    await send_decision(gate, ref, SignedDecision(envelope=envelope), approve=True)
    await poll(status, lambda s: s is not None and s.stage == following, what=f"{ref} in {following}")
    return time.perf_counter() - sent


async def approve_bare(client: Client, workflow_id: str, segment: int, side: str = "bare") -> float:
    """Wait for the bare run's gate after ``segment``, send the update; seconds until the
    run shows the next segment."""
    handle: WorkflowHandle[Any, Any] = client.get_workflow_handle(workflow_id)

    async def phase() -> BarePhase:
        return await handle.query(BareLifecycle.phase)

    await poll(
        phase,
        lambda p: p.segment == segment and p.waiting,
        what=f"bare {workflow_id} at gate {segment}",
        side=side,
    )
    sent = time.perf_counter()
    await handle.execute_update(BareLifecycle.approve, segment)
    await poll(
        phase,
        lambda p: p.segment == segment + 1,
        what=f"bare {workflow_id} in segment {segment + 1}",
        side=side,
    )
    return time.perf_counter() - sent


async def start_all(
    client: Client, refs: list[ModelRef], spec: LifecycleSpec
) -> tuple[list[WorkflowHandle[Any, Any]], list[float]]:
    """Start every lifecycle as fast as the client allows; return handles and start times."""
    limit = asyncio.Semaphore(64)
    starts: list[float] = [0.0] * len(refs)

    async def one(index: int) -> WorkflowHandle[Any, Any]:
        async with limit:
            starts[index] = time.time()
            return await start_lifecycle(client, refs[index], task_queue=MAIN_QUEUE, spec=spec)

    handles = await asyncio.gather(*(one(i) for i in range(len(refs))))
    return list(handles), starts


async def start_bare(
    client: Client, count: int, segments: tuple[str, ...], queue: str
) -> list[WorkflowHandle[Any, Any]]:
    """Start ``count`` bare runs of ``segments`` on ``queue``."""
    limit = asyncio.Semaphore(64)

    async def one() -> WorkflowHandle[Any, Any]:
        async with limit:
            return await client.start_workflow(
                BareLifecycle.run,
                RunBareInput(segments=segments),
                id=f"bare-{uuid.uuid4().hex}",
                task_queue=queue,
            )

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def wait_parked(
    bench: Bench, handles: list[WorkflowHandle[Any, Any]], starts: list[float]
) -> list[float]:
    """Wait until every run waits at DEV; return each run's start-to-waiting seconds."""
    ids = {h.id: i for i, h in enumerate(handles)}
    deadline = time.perf_counter() + STEP_TIMEOUT_SECONDS + len(handles)  # a run a second at worst
    while True:
        rows = await bench.pool.fetch(
            "SELECT workflow_id, min(created_at) AS at FROM notifications "
            "WHERE message LIKE '%waits for approval at DEV%' AND workflow_id = ANY($1::text[]) "
            "GROUP BY workflow_id",
            list(ids),
        )
        if len(rows) >= len(handles):
            break
        if time.perf_counter() > deadline:
            raise TimeoutError(f"only {len(rows)} of {len(handles)} runs reached the DEV gate")
        await asyncio.sleep(0.5)
    return [r["at"].timestamp() - starts[ids[r["workflow_id"]]] for r in rows]


async def warm_up(bench: Bench, client: Client) -> tuple[str, ...]:
    """One lifecycle through every gate, alone (not counted): its history sizes the bare runs."""
    ref = bench.take(1)[0]
    handle = await start_lifecycle(client, ref, task_queue=MAIN_QUEUE, spec=bench.spec)
    for stage, following in zip(STAGES, STAGES[1:], strict=False):
        await approve_lifecycle(bench, client, bench.approvers[0], ref, stage, following)
    await handle.result()
    segments = await segments_of(handle)
    for steps, queue in ((segments, BARE_QUEUE), (update_only(segments), UPDATE_QUEUE)):
        bare = (await start_bare(client, 1, steps, queue))[0]
        for segment in range(len(steps) - 1):
            await approve_bare(client, bare.id, segment)
        await bare.result()
        seen = await segments_of(bare)
        if seen != steps:
            raise RuntimeError(f"the bare run did other work than asked: {seen} != {steps}")
    return segments


@dataclass
class Round:
    """One round's samples (seconds)."""

    ours: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)
    update: list[float] = field(default_factory=list)
    """Bare runs whose decisions unblock no local activity (``update_only``)."""
    ours_tasks: list[GateTask] = field(default_factory=list)
    """Per decision, the workflow task that accepted it, from history."""
    bare_tasks: list[GateTask] = field(default_factory=list)
    update_tasks: list[GateTask] = field(default_factory=list)
    by_gate: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    """(side, gate) -> that gate's approve -> next stage samples (side ``ours``, ``bare``, ``update``)."""
    parked_in: float = 0.0
    """From the first start call until all N lifecycles waited at the DEV gate."""
    first_stage_passed: float = 0.0
    """From the first DEV decision sent until the last lifecycle showed SIT: all N passed
    the stage where (with ``--online``) their versions share the stable endpoint."""

    def add(self, side: str, gate: int, seconds: float) -> None:
        """One approve -> next stage sample."""
        getattr(self, side).append(seconds)
        self.by_gate.setdefault((side, gate), []).append(seconds)

    @property
    def ratio(self) -> float:
        """p50 approve -> next stage, lifecycle over bare."""
        return statistics.median(self.ours) / statistics.median(self.bare)

    @property
    def update_ratio(self) -> float:
        """p50 approve -> next stage, lifecycle over a bare update alone."""
        return statistics.median(self.ours) / statistics.median(self.update)


async def gate_round(
    bench: Bench,
    clients: list[Client],
    refs: list[ModelRef],
    bare: list[WorkflowHandle[Any, Any]],
    update: list[WorkflowHandle[Any, Any]],
    gate: int,
    sample: Round,
) -> None:
    """Approve gate ``gate`` of every lifecycle and every bare run: one queue alternating
    lifecycle, bare, bare update-only, lifecycle, ..., taken by the K clients."""
    stage, following = STAGES[gate], STAGES[gate + 1]
    jobs: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for index in range(max(len(refs), len(bare), len(update))):
        if index < len(refs):
            jobs.put_nowait(("ours", index))
        if index < len(bare):
            jobs.put_nowait(("bare", index))
        if index < len(update):
            jobs.put_nowait(("update", index))

    sent: list[float] = []
    passed: list[float] = []

    async def approver(client: Client, person: Signer) -> None:
        while not jobs.empty():
            kind, index = jobs.get_nowait()
            if kind == "ours":
                seconds = await approve_lifecycle(bench, client, person, refs[index], stage, following)
                passed.append(time.perf_counter())
                sent.append(passed[-1] - seconds)
                sample.add(kind, gate, seconds)
            elif kind == "bare":
                sample.add(kind, gate, await approve_bare(client, bare[index].id, gate))
            else:
                sample.add(kind, gate, await approve_bare(client, update[index].id, gate, "update only"))

    await asyncio.gather(*(approver(c, p) for c, p in zip(clients, bench.approvers, strict=True)))
    if gate == 0 and passed:
        sample.first_stage_passed = max(passed) - min(sent)


async def check_nothing_lost(
    bench: Bench,
    handles: list[WorkflowHandle[Any, Any]],
    bare: list[WorkflowHandle[Any, Any]],
    segments: tuple[str, ...],
) -> int:
    """Every run succeeded and holds exactly two decisions in the trail, every bare run
    finished its activities; raises otherwise. Returns the decisions counted."""
    results = await asyncio.gather(*(h.result() for h in handles), return_exceptions=True)
    failed = [f"{h.id}: {r}" for h, r in zip(handles, results, strict=True) if isinstance(r, BaseException)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(handles)} lifecycles failed: {failed[:3]}")
    ids = [h.id for h in handles]
    ended = await bench.pool.fetchval(
        "SELECT count(*) FROM lifecycle_runs WHERE state = $1 AND ended_at IS NOT NULL "
        "AND workflow_id = ANY($2::text[])",
        LifecycleState.SUCCEEDED.value,
        ids,
    )
    if ended != len(handles):
        raise RuntimeError(f"{ended} of {len(handles)} runs recorded as succeeded")
    decisions = [
        e for e in await trail.read_entries(bench.pool, kinds=(trail.DECISION,)) if e.workflow_id in set(ids)
    ]
    per_run: dict[str | None, int] = {}
    for entry in decisions:
        per_run[entry.workflow_id] = per_run.get(entry.workflow_id, 0) + 1
    if not all(per_run.get(i) == len(STAGES) - 1 for i in ids) or len({e.nonce for e in decisions}) != len(
        decisions
    ):
        raise RuntimeError("a decision is missing or recorded twice")
    want = RunBareResult(
        scheduled=sum(s.count("a") for s in segments), local=sum(s.count("l") for s in segments)
    )
    done = await asyncio.gather(*(h.result() for h in bare), return_exceptions=True)
    wrong = [r for r in done if r != want]
    if wrong:
        raise RuntimeError(f"{len(wrong)} of {len(bare)} bare runs failed or did other work: {wrong[:3]}")
    return len(decisions)


async def check_traffic(bench: Bench, refs: list[ModelRef]) -> int:
    """``--online``: every run's DEV traffic change is in the trail exactly once, with its
    own run, and each model's stable endpoint answers with the version its table says is
    live; raises otherwise. Returns the changes counted."""
    ids = {names.workflow_id_for(r.model, r.version) for r in refs}
    per_run: dict[str | None, int] = {}
    for entry in await trail.read_entries(bench.pool, kinds=(trail.TRAFFIC,)):
        if entry.workflow_id in ids:
            per_run[entry.workflow_id] = per_run.get(entry.workflow_id, 0) + 1
    if any(per_run.get(i) != 1 for i in ids):
        raise RuntimeError(
            f"a traffic change is missing or recorded twice: {len(per_run)} of {len(ids)} runs"
        )
    async with httpx.AsyncClient() as http:
        for model in sorted({r.model for r in refs}):
            table = await traffic.read_one(bench.pool, "bench-dev", model)
            if table is None or len(table.routes) != 1:
                raise RuntimeError(f"{model}: no single live version at the DEV endpoint: {table}")
            answer = await http.get(f"{table.endpoint}/health", timeout=30)
            version = answer.json().get("version") if answer.status_code == 200 else None
            if version is None or int(version) != table.routes[0].version:
                raise RuntimeError(f"{model}: the endpoint answered {answer.status_code} {answer.text[:200]}")
    return sum(per_run.values())


async def all_gate_tasks(handles: list[WorkflowHandle[Any, Any]]) -> list[GateTask]:
    """Every decision's workflow task in ``handles``' histories (``gate_tasks``)."""
    limit = asyncio.Semaphore(16)

    async def one(handle: WorkflowHandle[Any, Any]) -> list[GateTask]:
        async with limit:
            return await gate_tasks(handle)

    return [span for spans in await asyncio.gather(*(one(h) for h in handles)) for span in spans]


async def rss_with_cache(
    bench: Bench, client: Client, handles: list[WorkflowHandle[Any, Any]], cache: int
) -> float:
    """Restart the worker with ``cache``, load every parked run into it (a query replays a
    run into the cache), let it settle and return the worker's RSS in MB."""
    bench.stop_worker()
    await bench.start_worker(client, cache)
    limit = asyncio.Semaphore(32)

    async def touch(handle: WorkflowHandle[Any, Any]) -> None:
        async with limit:
            await read_status(client.get_workflow_handle(handle.id))

    await asyncio.gather(*(touch(h) for h in handles))
    await asyncio.sleep(3)
    return bench.rss_mb()


# --- report ----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def row(label: str, values: list[float], *, unit: float = 1000.0) -> str:
    """p50, p99 and max of ``values`` (seconds) in ms."""
    return (
        f"  {label:<38} p50 {unit * percentile(values, 50):>8.1f}   p99 {unit * percentile(values, 99):>8.1f}"
        f"   max {unit * max(values):>8.1f}   (n={len(values)})"
    )


def load_average() -> str:
    """The 1-minute load average now."""
    return f"{os.getloadavg()[0]:.2f}"


# --- main ------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    """Start the servers, run the phases, print the report."""
    work = Path(tempfile.mkdtemp(prefix="mlc-bench-load-"))
    port = free_port()
    temporal_args = [
        temporal_cli(),
        "server",
        "start-dev",
        "--headless",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    temporal_args += ["--log-level", "error"]
    for name, kind in names.SEARCH_ATTRIBUTES.items():
        temporal_args += ["--search-attribute", f"{name}={kind}"]
    with (work / "temporal.log").open("ab") as log:
        temporal = processes.spawn(temporal_args, log=log)
    postgres = DevPostgres(work / "pg", work / "pg.log")
    bench: Bench | None = None
    global POLL_SECONDS
    POLL_SECONDS = args.poll or POLL_SECONDS
    models = args.models or args.runs
    args.approvers = args.approvers or (3 * args.runs if args.online else 8)
    rounds = 1 if args.park_only else args.rounds
    try:
        while not port_open("127.0.0.1", port):
            await asyncio.sleep(0.1)
        dsn = postgres.start()
        address = f"127.0.0.1:{port}"
        bench = await setup(
            work, address, dsn, args.runs * rounds + 1, args.approvers, models, online=args.online
        )
        clients = [
            await Client.connect(
                address, data_converter=pydantic_data_converter, identity=f"bench-client-{i}"
            )
            for i in range(args.approvers)
        ]
        starter = await Client.connect(
            address, data_converter=pydantic_data_converter, identity="bench-starter"
        )
        await bench.start_worker(starter, args.cache)
        await bench.start_bare_worker(starter, args.cache, BARE_QUEUE)
        await bench.start_bare_worker(starter, args.cache, UPDATE_QUEUE)
        standin = StandinRuntime(bench.settings)
        async with Worker(
            starter, task_queue=RUNTIME_QUEUE, activities=[standin.batch_job, standin.stage_tests]
        ):
            segments = await warm_up(bench, starter)
            print(f"a lifecycle run (and each bare run): {describe(segments)}", flush=True)
            samples: list[Round] = []
            to_gate: list[float] = []
            rss_parked, parked_in, decisions, changes = 0.0, 0.0, 0, 0
            for index in range(rounds):
                refs = bench.take(args.runs)
                began = time.perf_counter()
                handles, starts = await start_all(starter, refs, bench.spec)
                parked = await wait_parked(bench, handles, starts)
                sample = Round(parked_in=time.perf_counter() - began)
                if index == 0:
                    to_gate, parked_in = parked, time.perf_counter() - began
                    await asyncio.sleep(2)
                    rss_parked = bench.rss_mb()
                    print(
                        f"{args.runs} runs parked at DEV in {parked_in:.1f} s; "
                        f"worker RSS {rss_parked:.0f} MB",
                        flush=True,
                    )
                if args.park_only:
                    caches: dict[int, float] = {}
                    for cache in args.rss_caches:
                        caches[cache] = await rss_with_cache(bench, starter, handles, cache)
                        print(
                            f"  cache {cache}: RSS {caches[cache]:.0f} MB with {args.runs} parked runs",
                            flush=True,
                        )
                    report_park(args, to_gate, rss_parked, caches, parked_in)
                    return
                bare = await start_bare(starter, args.runs, segments, BARE_QUEUE)
                update = await start_bare(starter, args.runs, update_only(segments), UPDATE_QUEUE)
                for gate in range(len(STAGES) - 1):
                    await gate_round(bench, clients, refs, bare, update, gate, sample)
                decisions += await check_nothing_lost(bench, handles, bare + update, segments)
                if args.online:
                    changes += await check_traffic(bench, refs)
                sample.ours_tasks = await all_gate_tasks(handles)
                sample.bare_tasks = await all_gate_tasks(bare)
                sample.update_tasks = await all_gate_tasks(update)
                samples.append(sample)
                print(
                    f"round {index + 1}/{rounds}: p50 {1000 * statistics.median(sample.ours):.1f} ms vs bare "
                    f"{1000 * statistics.median(sample.bare):.1f} ms ({sample.ratio:.2f}x), bare update "
                    f"only {1000 * statistics.median(sample.update):.1f} ms ({sample.update_ratio:.2f}x), "
                    f"load {load_average()}",
                    flush=True,
                )
                if args.online:
                    print(
                        f"  all {args.runs} at the DEV gate after {sample.parked_in:.1f} s; DEV approve->SIT "
                        f"p50 {1000 * statistics.median(sample.by_gate['ours', 0]):.1f} ms vs bare "
                        f"{1000 * statistics.median(sample.by_gate['bare', 0]):.1f} ms; all {args.runs} "
                        f"past DEV {sample.first_stage_passed:.1f} s after the first DEV decision",
                        flush=True,
                    )
            report(args, models, segments, to_gate, samples, rss_parked, parked_in, decisions)
            if args.online:
                report_online(args, samples, changes)
    finally:
        if bench is not None:
            bench.stop_worker()
            bench.stop_bare_workers()
            await remove_runtimes(bench)
            await bench.pool.close()
        processes.stop(temporal.pid, child=temporal)
        postgres.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


async def remove_runtimes(bench: Bench) -> None:
    """Stop what the measured worker's runtimes still run: model hosts and servers, and
    the gateway's nginx (which outlives a runtime's cleanup)."""
    for runtime in await runtimes.read_runtimes(bench.pool):
        if runtime.task_queue == MAIN_QUEUE:
            await driver_for(runtime, bench.settings).cleanup(CleanupRequest(runtime=runtime))
            await remove_gateway(bench.settings, runtime)


def report_park(
    args: argparse.Namespace,
    to_gate: list[float],
    rss_parked: float,
    caches: dict[int, float],
    parked_in: float,
) -> None:
    """Print the parking numbers."""
    print()
    print(f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; N={args.runs}, MLC_WORKFLOW_CACHE={args.cache}")
    print(row("start -> waiting at DEV (ms)", to_gate))
    print(f"  all {args.runs} parked after {parked_in:.1f} s ({args.runs / parked_in:.1f} runs/s)")
    print(f"  worker RSS with {args.runs} runs parked at DEV: {rss_parked:.0f} MB")
    for cache, rss in caches.items():
        print(f"  worker RSS, cache {cache}, every parked run queried into the cache: {rss:.0f} MB")
    print(f"  goal: {GOAL_PARKED} parked runs under {GOAL_RSS_MB:.0f} MB of worker RSS")


def report(
    args: argparse.Namespace,
    models: int,
    segments: tuple[str, ...],
    to_gate: list[float],
    samples: list[Round],
    rss_parked: float,
    parked_in: float,
    decisions: int,
) -> None:
    """Print the table, with the goals next to the measurements."""
    print()
    print(
        f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; N={args.runs} lifecycles (DEV gate, SIT gate, UAT) of "
        f"{models} model(s) and N bare runs per round, {len(samples)} rounds, K={args.approvers} approver "
        f"clients; every worker in its own process, workflow cache {args.cache}; {os.cpu_count()} cores, "
        f"load {load_average()}"
    )
    print(f"  each run: {describe(segments)}")
    print(row("start -> waiting at DEV (ms)", to_gate))
    print(f"  all {args.runs} parked after {parked_in:.1f} s ({args.runs / parked_in:.1f} runs/s)")
    ours = [x for s in samples for x in s.ours]
    bare = [x for s in samples for x in s.bare]
    print(row("approve -> next stage, ModelLifecycle", ours))
    print(row("approve -> next segment, bare", bare))
    print(row("approve -> next segment, bare update only", [x for s in samples for x in s.update]))
    sides = (("ModelLifecycle", "ours_tasks"), ("bare", "bare_tasks"), ("bare update only", "update_tasks"))
    for label, side in sides:
        tasks: list[GateTask] = [x for s in samples for x in getattr(s, side)]
        print(f"  {label}, the workflow task that accepts a decision (from history):")
        print(row("  dispatch (scheduled -> started)", [t.dispatch for t in tasks]))
        print(row("  on the worker (started -> completed)", [t.worker for t in tasks]))
    ratios = [s.ratio for s in samples]
    median = statistics.median(ratios)
    verdict = "met" if median <= GOAL_RATIO else "NOT met"
    print(
        f"  p50 ratio per round: {', '.join(f'{r:.2f}x' for r in ratios)}; median {median:.2f}x, "
        f"spread {min(ratios):.2f}-{max(ratios):.2f}x (goal <= {GOAL_RATIO}x: {verdict})"
    )
    alone = [s.update_ratio for s in samples]
    print(
        f"  against a bare update alone (no local activity after the gate), per round: "
        f"{', '.join(f'{r:.2f}x' for r in alone)}; median {statistics.median(alone):.2f}x, "
        f"spread {min(alone):.2f}-{max(alone):.2f}x"
    )
    print(f"  worker RSS with {args.runs} runs parked at DEV: {rss_parked:.0f} MB")
    print(f"  status queries the server timed out (asked again, time included): {QUERY_TIMEOUTS or 'none'}")
    print(
        f"  nothing lost: {args.runs * len(samples)} runs succeeded, {decisions} decisions in the trail, "
        f"each once; {2 * args.runs * len(samples)} bare runs finished their activities"
    )


def spread(label: str, values: list[float], unit: str = " s", scale: float = 1.0, digits: int = 1) -> str:
    """Median and min-max of per-round values."""
    shown = [f"{scale * v:.{digits}f}" for v in values]
    middle = f"{scale * statistics.median(values):.{digits}f}"
    return (
        f"  {label}: {', '.join(shown)}{unit}; median {middle}{unit}, "
        f"spread {min(shown, key=float)}-{max(shown, key=float)}{unit}"
    )


def report_online(args: argparse.Namespace, samples: list[Round], changes: int) -> None:
    """``--online``: the shared stage's numbers, per round and pooled."""
    print(
        "  --online: DEV online on a local runtime (shared hosting) behind its nginx gateway; status "
        f"queried every {1000 * POLL_SECONDS:.0f} ms (a sample is late by up to that, both sides); per round:"
    )
    print(
        spread(
            f"all {args.runs} at the DEV gate (first start -> last waiting)", [s.parked_in for s in samples]
        )
    )
    print(
        spread(
            f"all {args.runs} past DEV (first DEV decision sent -> last run in SIT)",
            [s.first_stage_passed for s in samples],
        )
    )
    for side, label in (("ours", "ModelLifecycle"), ("bare", "bare"), ("update", "bare update only")):
        for gate, stage in enumerate(STAGES[:-1]):
            pooled = [x for s in samples for x in s.by_gate.get((side, gate), [])]
            print(row(f"{stage} approve -> next, {label}", pooled))
    p50s = [
        statistics.median(s.by_gate["ours", 0]) / statistics.median(s.by_gate["bare", 0]) for s in samples
    ]
    print(spread("DEV gate p50 ratio ModelLifecycle / bare", p50s, unit="x", digits=2))
    p99s = [percentile(s.by_gate["ours", 0], 99) for s in samples]
    print(spread("DEV gate p99, ModelLifecycle", p99s, unit=" ms", scale=1000))
    p99b = [percentile(s.by_gate["bare", 0], 99) for s in samples]
    print(spread("DEV gate p99, bare", p99b, unit=" ms", scale=1000))
    print(f"  traffic changes in the trail, one per run, each endpoint serving its table: {changes}")


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="lifecycles at once (N), and as many bare runs")
    parser.add_argument(
        "--approvers",
        type=int,
        default=0,
        help="concurrent approver clients (K; default 8, with --online 3N: every decision of a gate at once)",
    )
    parser.add_argument(
        "--poll",
        type=float,
        default=0.0,
        help="seconds between status queries, both sides (default 0.005)",
    )
    parser.add_argument(
        "--online",
        action="store_true",
        help="DEV deploys online to a real local runtime with its nginx gateway (stable endpoints)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of N + N runs (median and spread)")
    parser.add_argument(
        "--models",
        type=int,
        default=0,
        help="distinct models the N snapshots belong to (default: N, one each)",
    )
    parser.add_argument(
        "--cache",
        type=int,
        default=DEFAULT_WORKFLOW_CACHE,
        help="every worker's workflow cache (MLC_WORKFLOW_CACHE, max_cached_workflows)",
    )
    parser.add_argument(
        "--rss-caches",
        type=lambda text: [int(x) for x in text.split(",") if x],
        default=[],
        help="with --park-only: restart the worker with each cache size and measure RSS with the runs cached",
    )
    parser.add_argument("--park-only", action="store_true", help="only park N runs and measure RSS")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
