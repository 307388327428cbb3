"""Load: N lifecycles at once on one worker, every gate approved by concurrent clients.

What runs:

* one Temporal dev server (in memory) and one embedded PostgreSQL;
* the worker under measurement: a real ``mlc worker`` process (every built-in workflow
  and inventory activity: PostgreSQL, signed grants, the hash-chained trail), with
  ``MLC_WORKFLOW_CACHE`` as given;
* the runtimes' side is a stand-in worker in this process on the runtimes' own task
  queue: batch jobs and stage tests that return at once. The load is the orchestration,
  not model code: each run is ``ModelLifecycle`` with the spec DEV (gate) -> SIT (gate)
  -> UAT, batch mode, no tests, so two signed approvals per run;
* N snapshots (one active run per snapshot), registered beforehand, untimed;
* K approver clients (separate Temporal connections, each person with their own key)
  sign each decision (``mlc.lifecycle_client.sign_decision``) and send it as a Workflow Update
  (``send_decision``), then query until the run shows its next stage;
* the bare baseline in the same run: N ``BenchBareLifecycle`` workflows
  (``bench/bare_workflow.py``) on a worker in this process, their gates approved by the
  same K clients the same way (update, then query until the next segment shows).

It prints start-to-waiting (start call -> the run's "waits for approval at DEV"
notification row), approve-to-next-stage p50/p99 for both, the worker's RSS with the N
runs parked at gates, and checks that nothing was lost: every run succeeded and every
decision is in the trail exactly once. ``--rss-caches`` then restarts the worker with
each cache size, queries every parked run (which loads it into the cache) and measures
RSS again: the memory of N parked runs when the cache is full.

    .venv/bin/python bench/bench_load.py                       # N=200, K=8
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
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from temporalio import activity
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bare_workflow import BareLifecycle, BarePhase, RunBareInput, noop  # noqa: E402
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
    BatchJobResult,  # noqa: E402
    RunStageTestsInput,
    RunStageTestsResult,
    RuntimeActionInput,  # noqa: E402
)
from mlc.domain import (  # noqa: E402
    ApprovalGate,
    Decision,
    LifecycleSpec,
    LifecycleState,
    Mode,
    ModelRef,
    Runtime,
    StageSpec,
)
from mlc.lifecycle_client import read_status, send_decision, sign_decision, start_lifecycle  # noqa: E402
from mlc.store import connect, trail  # noqa: E402
from mlc.store.db import enable_worker_login  # noqa: E402
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
MAIN_QUEUE = "bench-load"
RUNTIME_QUEUE = "bench-load-runtimes"
BARE_QUEUE = "bench-load-bare"
POLL_SECONDS = 0.005
"""Between status queries while waiting for the next stage (the same for both workflows)."""
STEP_TIMEOUT_SECONDS = 600.0
GOAL_PARKED = 10_000
GOAL_RSS_MB = 200.0
GOAL_RATIO = 1.5

T = TypeVar("T")


# --- the runtimes' stand-ins -----------------------------------------------------------


@activity.defn(name=rt.RUN_BATCH_JOB.name)
async def standin_batch_job(request: RuntimeActionInput) -> BatchJobResult:
    """A batch job that has nothing to score."""
    return BatchJobResult(output_path="/dev/null", records=0, seconds=0.0)


@activity.defn(name=rt.RUN_STAGE_TESTS.name)
async def standin_stage_tests(request: RunStageTestsInput) -> RunStageTestsResult:
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
    worker: subprocess.Popen[bytes] | None = None

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

    async def start_worker(self, client: Client, cache: int) -> None:
        """Start ``mlc worker`` and wait until it polls the main queue."""
        log = (self.work / "worker.log").open("ab")
        self.worker = processes.spawn(
            [sys.executable, "-m", "mlc", "worker"], log=log, env=self.worker_env(cache), cwd=ROOT
        )
        log.close()
        request = DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=MAIN_QUEUE),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
        while not (await client.workflow_service.describe_task_queue(request)).pollers:
            assert self.worker.poll() is None, (self.work / "worker.log").read_text()[-3000:]
            await asyncio.sleep(0.1)

    def stop_worker(self) -> None:
        """SIGTERM the worker and wait for it."""
        if self.worker is not None:
            processes.stop(self.worker.pid, signum=signal.SIGTERM, timeout=60, child=self.worker)
            self.worker = None

    def rss_mb(self) -> float:
        """The worker process's resident set size (``VmRSS``), in MB."""
        assert self.worker is not None
        for line in Path(f"/proc/{self.worker.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")


async def setup(work: Path, address: str, dsn: str, runs: int, approvers: int) -> Bench:
    """Trust root, people, runtimes and N snapshots (untimed)."""
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
        await admin.add_runtime(pool, settings, root, runtime)
    store, registrar = ArtifactStore(settings.artifact_dir), Signer("bench-registrar", registrar_key)
    refs: list[ModelRef] = []
    packages = work / "packages"
    started = time.perf_counter()
    for index in range(runs):
        package = packages / f"p{index}"
        shutil.copytree(MODEL, package)
        (package / "bench.txt").write_text(f"copy {index}\n")  # new content: a new snapshot
        snap, _ = await register_package(pool, store, package, signer=registrar, settings=settings)
        refs.append(ModelRef(model=snap.model, version=snap.version))
        shutil.rmtree(package)
    print(f"setup: {runs} snapshots registered in {time.perf_counter() - started:.1f} s", flush=True)
    return Bench(work, settings, pool, await enable_worker_login(pool, dsn), people, refs)


# --- phases ----------------------------------------------------------------------------


async def poll(query: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, what: str) -> T:
    """Query until ``done`` (bounded)."""
    deadline = time.perf_counter() + STEP_TIMEOUT_SECONDS
    while True:
        last = await query()
        if done(last):
            return last
        if time.perf_counter() > deadline:
            raise TimeoutError(f"gave up waiting for {what}; last answer: {last}")
        await asyncio.sleep(POLL_SECONDS)


async def start_all(bench: Bench, client: Client) -> tuple[list[WorkflowHandle[Any, Any]], list[float]]:
    """Start every lifecycle as fast as the client allows; return handles and start times."""
    limit = asyncio.Semaphore(64)
    starts: list[float] = [0.0] * len(bench.refs)

    async def one(index: int) -> WorkflowHandle[Any, Any]:
        async with limit:
            starts[index] = time.time()
            return await start_lifecycle(client, bench.refs[index], task_queue=MAIN_QUEUE, spec=SPEC)

    handles = await asyncio.gather(*(one(i) for i in range(len(bench.refs))))
    return list(handles), starts


async def wait_parked(
    bench: Bench, handles: list[WorkflowHandle[Any, Any]], starts: list[float]
) -> list[float]:
    """Wait until every run waits at DEV; return each run's start-to-waiting seconds."""
    ids = {h.id: i for i, h in enumerate(handles)}
    deadline = time.perf_counter() + STEP_TIMEOUT_SECONDS + len(handles)  # a run a second at worst
    while True:
        rows = await bench.pool.fetch(
            "SELECT workflow_id, min(created_at) AS at FROM notifications "
            "WHERE message LIKE '%waits for approval at DEV%' GROUP BY workflow_id"
        )
        if len(rows) >= len(handles):
            break
        if time.perf_counter() > deadline:
            raise TimeoutError(f"only {len(rows)} of {len(handles)} runs reached the DEV gate")
        await asyncio.sleep(0.5)
    return [r["at"].timestamp() - starts[ids[r["workflow_id"]]] for r in rows]


async def approve_all(
    bench: Bench,
    clients: list[Client],
    handles: list[WorkflowHandle[Any, Any]],
    stage: str,
    following: str,
) -> list[float]:
    """Each approver client takes runs from a shared queue: sign, update, query until the
    run shows ``following``. Returns the update-to-next-stage seconds."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(handles)):
        queue.put_nowait(index)
    latencies: list[float] = []

    async def approver(client: Client, person: Signer) -> None:
        while not queue.empty():
            index = queue.get_nowait()
            ref = bench.refs[index]
            handle, envelope = await sign_decision(
                client, bench.pool, person, ref, stage=stage, decision=Decision.APPROVED, comment="load"
            )
            sent = time.perf_counter()
            await send_decision(handle, ref, SignedDecision(envelope=envelope), approve=True)

            async def status(handle: WorkflowHandle[Any, Any] = handle) -> LifecycleStatus | None:
                return await read_status(handle)

            await poll(status, lambda s: s is not None and s.stage == following, what=f"{ref} in {following}")
            latencies.append(time.perf_counter() - sent)

    await asyncio.gather(*(approver(c, p) for c, p in zip(clients, bench.approvers, strict=True)))
    return latencies


async def bare_all(clients: list[Client], runs: int) -> list[float]:
    """N bare workflows with two gates, approved by the K clients like the lifecycles."""
    starter = clients[0]
    handles = [
        await starter.start_workflow(
            BareLifecycle.run,
            RunBareInput(segments=(1, 1, 1)),
            id=f"bare-{uuid.uuid4().hex}",
            task_queue=BARE_QUEUE,
        )
        for _ in range(runs)
    ]
    latencies: list[float] = []
    for segment in (0, 1):
        queue: asyncio.Queue[WorkflowHandle[Any, Any]] = asyncio.Queue()
        for handle in handles:
            queue.put_nowait(handle)

        async def approver(
            client: Client, segment: int = segment, queue: asyncio.Queue[WorkflowHandle[Any, Any]] = queue
        ) -> None:
            while not queue.empty():
                handle = client.get_workflow_handle(queue.get_nowait().id)

                async def phase(handle: WorkflowHandle[Any, Any] = handle) -> BarePhase:
                    return await handle.query(BareLifecycle.phase)

                await poll(phase, lambda p: p.segment == segment and p.waiting, what="a bare gate")
                sent = time.perf_counter()
                await handle.execute_update(BareLifecycle.approve, segment)
                await poll(phase, lambda p: p.segment == segment + 1, what="the next bare segment")
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(approver(c) for c in clients))
    await asyncio.gather(*(h.result() for h in handles))
    return latencies


async def check_nothing_lost(bench: Bench, handles: list[WorkflowHandle[Any, Any]]) -> tuple[int, int]:
    """Every run succeeded and holds exactly two decisions in the trail; returns counts."""
    results = await asyncio.gather(*(h.result() for h in handles), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, failed[:3]
    ended = await bench.pool.fetchval(
        "SELECT count(*) FROM lifecycle_runs WHERE state = $1 AND ended_at IS NOT NULL",
        LifecycleState.SUCCEEDED.value,
    )
    decisions = await trail.read_entries(bench.pool, kinds=(trail.DECISION,))
    per_run: dict[str | None, int] = {}
    for entry in decisions:
        per_run[entry.workflow_id] = per_run.get(entry.workflow_id, 0) + 1
    assert ended == len(handles), f"{ended} of {len(handles)} runs recorded as succeeded"
    assert all(per_run.get(h.id) == 2 for h in handles), "a decision is missing or recorded twice"
    assert len({e.nonce for e in decisions}) == len(decisions)
    return int(ended), len(decisions)


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
    try:
        while not port_open("127.0.0.1", port):
            await asyncio.sleep(0.1)
        dsn = postgres.start()
        address = f"127.0.0.1:{port}"
        bench = await setup(work, address, dsn, args.runs, args.approvers)
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
        async with (
            Worker(starter, task_queue=RUNTIME_QUEUE, activities=[standin_batch_job, standin_stage_tests]),
            Worker(starter, task_queue=BARE_QUEUE, workflows=[BareLifecycle], activities=[noop]),
        ):
            began = time.perf_counter()
            handles, starts = await start_all(bench, starter)
            to_gate = await wait_parked(bench, handles, starts)
            parked_in = time.perf_counter() - began
            await asyncio.sleep(2)
            rss_parked = bench.rss_mb()
            print(
                f"{args.runs} runs parked at DEV in {parked_in:.1f} s; worker RSS {rss_parked:.0f} MB",
                flush=True,
            )
            caches: dict[int, float] = {}
            if args.park_only:
                for cache in args.rss_caches:
                    caches[cache] = await rss_with_cache(bench, starter, handles, cache)
                    print(
                        f"  cache {cache}: RSS {caches[cache]:.0f} MB with {args.runs} parked runs",
                        flush=True,
                    )
                report(args, to_gate, [], [], rss_parked, caches, None, parked_in)
                return
            ours = await approve_all(bench, clients, handles, "DEV", "SIT")
            ours += await approve_all(bench, clients, handles, "SIT", "UAT")
            lost = await check_nothing_lost(bench, handles)
            bare = await bare_all(clients, args.runs)
            report(args, to_gate, ours, bare, rss_parked, caches, lost, parked_in)
    finally:
        if bench is not None:
            bench.stop_worker()
            await bench.pool.close()
        processes.stop(temporal.pid, child=temporal)
        postgres.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def report(
    args: argparse.Namespace,
    to_gate: list[float],
    ours: list[float],
    bare: list[float],
    rss_parked: float,
    caches: dict[int, float],
    lost: tuple[int, int] | None,
    parked_in: float,
) -> None:
    """Print the table, with the goals next to the measurements."""
    print()
    print(
        f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; N={args.runs} lifecycles (DEV gate, SIT gate, UAT), "
        f"K={args.approvers} approver clients, one worker (MLC_WORKFLOW_CACHE={args.cache}), "
        f"{os.cpu_count()} cores"
    )
    print(row("start -> waiting at DEV (ms)", to_gate))
    print(f"  all {args.runs} parked after {parked_in:.1f} s ({args.runs / parked_in:.1f} runs/s)")
    if ours and bare:
        ratio = statistics.median(ours) / statistics.median(bare)
        print(row("approve -> next stage, ModelLifecycle", ours))
        print(row("approve -> next segment, bare update", bare))
        verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
        print(f"  p50 ratio {ratio:.2f}x (goal <= {GOAL_RATIO}x: {verdict})")
    print(f"  worker RSS with {args.runs} runs parked at DEV: {rss_parked:.0f} MB")
    for cache, rss in caches.items():
        print(f"  worker RSS, cache {cache}, every parked run queried into the cache: {rss:.0f} MB")
    if lost is not None:
        ended, decisions = lost
        print(
            f"  nothing lost: {ended}/{args.runs} runs succeeded, "
            f"{decisions} decisions in the trail, each once"
        )
    print(f"  goal: {GOAL_PARKED} parked runs under {GOAL_RSS_MB:.0f} MB of worker RSS (see --park-only)")


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="lifecycles at once (N)")
    parser.add_argument("--approvers", type=int, default=8, help="concurrent approver clients (K)")
    parser.add_argument(
        "--cache", type=int, default=DEFAULT_WORKFLOW_CACHE, help="the worker's MLC_WORKFLOW_CACHE"
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
