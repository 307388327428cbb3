"""Commands that run things: ``dev`` (embedded stack + worker), ``worker`` and ``demo``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Annotated

import asyncpg
import httpx
import typer
from rich.table import Table
from temporalio.client import Client

from mlc import admin
from mlc.artifacts import ArtifactStore
from mlc.cli.context import client, console, emit, local_user, settings
from mlc.cli.lifecycle_cmds import render_status
from mlc.config import Settings
from mlc.devstack import DevStack, dev_running
from mlc.domain import Decision, LifecycleState, ModelRef, SignedDecision
from mlc.errors import RuntimeUnavailableError
from mlc.operations import read_status, send_decision, sign_decision, start_lifecycle
from mlc.registry import register_package
from mlc.store import connect, deployments, runtimes
from mlc.store.db import enable_worker_login
from mlc.trust.keys import default_key_path, ensure_key


def register(app: typer.Typer) -> None:
    """Attach these commands to the root app."""
    app.command("dev")(dev)
    app.command("worker")(worker)
    app.command("demo")(demo)


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


@contextlib.asynccontextmanager
async def embedded(
    cfg: Settings, *, temporal_port: int, ui_port: int, headless: bool
) -> AsyncIterator[Settings]:
    """Start the embedded servers, a migrated inventory with dev runtimes, and a worker."""
    from workers.client import ensure_search_attributes
    from workers.worker import build_main_worker

    stack = DevStack(cfg, temporal_port=temporal_port, ui_port=ui_port, headless=headless)
    try:
        with console.status("starting Temporal and PostgreSQL"):
            ready = await stack.start()
            assert ready.database_url is not None
            pool = await connect(ready.database_url)
        try:
            ready = await admin.bootstrap_dev(
                pool, ready, local_user(), ensure_key(default_key_path()), task_queue=ready.task_queue
            )
            worker_dsn = await enable_worker_login(pool, ready.database_url or "")
            ready = replace(ready, worker_database_url=worker_dsn)
            worker_pool = await connect(ready.worker_database_url or "", migrate_schema=False)
            temporal = await _embedded_client(ready)
            await ensure_search_attributes(temporal)
            try:
                async with build_main_worker(temporal, ready, worker_pool):
                    yield ready
            finally:
                await worker_pool.close()
            await _stop_local_deployments(ready, pool)
        finally:
            await pool.close()
    finally:
        stack.stop()


async def _embedded_client(ready: Settings) -> Client:
    """A plain-text client of the server ``embedded`` started: TEMPORAL_TLS_*, TEMPORAL_API_KEY
    and TEMPORAL_PROFILE describe some other cluster, never this one."""
    from workers.client import connect as connect_temporal

    return await connect_temporal(ready, plain=True)


async def _stop_local_deployments(cfg: Settings, pool: asyncpg.Pool) -> None:
    """Stop local model servers with the stack, and say so in the inventory."""
    from activities.runtimes import driver_for
    from activities.runtimes.base import UndeployRequest
    from mlc.domain import DeploymentState, RuntimeKind

    for d in await deployments.read_deployments(pool):
        runtime = await runtimes.read_runtime(pool, d.runtime)
        if runtime.kind is RuntimeKind.LOCAL:
            await driver_for(runtime, cfg).undeploy(UndeployRequest(deployment_id=d.id, runtime=runtime))
            await deployments.upsert_deployment(
                pool,
                d.model_copy(
                    update={"state": DeploymentState.RETIRED, "details": {"retired_by": "mlc dev stopped"}}
                ),
            )


def dev(
    temporal_port: Annotated[int, typer.Option(help="Temporal frontend port.")] = 7233,
    ui_port: Annotated[int, typer.Option(help="Temporal Web UI port.")] = 8233,
    headless: Annotated[bool, typer.Option(help="No Web UI.")] = False,
) -> None:
    """Run Temporal (with its Web UI), PostgreSQL, a worker and local runtimes for every
    stage, all state under --home. Ctrl-C stops everything."""

    async def go() -> None:
        stop = _stop_event()
        async with embedded(
            settings(), temporal_port=temporal_port, ui_port=ui_port, headless=headless
        ) as ready:
            table = Table(title="mlc dev is running (Ctrl-C stops it)", show_header=False)
            table.add_row("Temporal", ready.temporal_address)
            if not headless:
                table.add_row("Web UI", f"http://127.0.0.1:{ui_port}")
            table.add_row("Task queue", ready.task_queue)
            table.add_row("Inventory", ready.database_url or "-")
            table.add_row("State", str(ready.home))
            table.add_row("Admin and approver", f"{local_user()} (key {default_key_path()})")
            table.add_row("Trust root", ready.trust_root or "-")
            console.print(table)
            await stop.wait()
        console.print("stopped")

    asyncio.run(go())


def worker(
    runtime: Annotated[
        str | None,
        typer.Option(help="Serve only this runtime's task queue (a worker next to its Docker engine)."),
    ] = None,
) -> None:
    """Run a worker against TEMPORAL_ADDRESS / MLC_DATABASE_URL."""
    from workers.client import ensure_search_attributes
    from workers.worker import build_main_worker, build_runtime_worker, run_until

    async def go() -> None:
        cfg = settings()
        stop = _stop_event()
        temporal = await client(cfg)
        dsn = cfg.worker_database_url or cfg.database_url
        if runtime is None:
            if not dsn:
                raise RuntimeUnavailableError(
                    "the main worker needs the inventory: set MLC_WORKER_DATABASE_URL (its least-privilege "
                    "role) or MLC_DATABASE_URL, or run `mlc dev`"
                )
            await ensure_search_attributes(temporal)
            pool = await connect(dsn, migrate_schema=cfg.worker_database_url is None)
            try:
                await run_until(build_main_worker(temporal, cfg, pool), stop)
            finally:
                await pool.close()
            return
        if dsn:
            pool = await connect(dsn, max_size=1, migrate_schema=cfg.worker_database_url is None)
            try:
                queue = (await runtimes.read_runtime(pool, runtime)).task_queue
            finally:
                await pool.close()
        else:
            queue = f"runtime-{runtime}"
        console.print(f"serving runtime {runtime} on task queue {queue}")
        await run_until(build_runtime_worker(temporal, cfg, queue), stop)

    asyncio.run(go())


def demo(
    yes: Annotated[bool, typer.Option("--yes", help="Approve every gate automatically.")] = False,
    temporal_port: Annotated[int, typer.Option(help="Temporal port of the embedded stack.")] = 7233,
    ui_port: Annotated[int, typer.Option(help="Web UI port of the embedded stack.")] = 8233,
) -> None:
    """Register the example fraud model and walk it DEV -> PROD on an embedded stack."""

    async def go() -> int:
        cfg = settings()
        external = "TEMPORAL_ADDRESS" in os.environ and cfg.database_url is not None
        if dev_running(cfg) or external:
            console.print(f"using the running stack at {cfg.temporal_address} and its workers")
            return await _walk(cfg, yes=yes, ui=None)
        async with embedded(cfg, temporal_port=temporal_port, ui_port=ui_port, headless=False) as ready:
            return await _walk(ready, yes=yes, ui=f"http://127.0.0.1:{ui_port}")

    raise typer.Exit(asyncio.run(go()))


async def _walk(cfg: Settings, *, yes: bool, ui: str | None) -> int:
    from mlc.examples import prepare_example_model

    assert cfg.database_url
    with console.status("training the example credit-card-fraud model"):
        package = await asyncio.to_thread(prepare_example_model)
    pool = await connect(cfg.database_url, max_size=2)
    try:
        cfg = await admin.bootstrap_dev(
            pool, cfg, local_user(), ensure_key(default_key_path()), task_queue=cfg.task_queue
        )
        me = await admin.identify(pool, cfg, ensure_key(default_key_path()))
        snap, _ = await register_package(
            pool, ArtifactStore(cfg.artifact_dir), package, signer=me, settings=cfg
        )
        ref = ModelRef(model=snap.model, version=snap.version)
        console.print(
            f"registered {ref} (sha256 {snap.sha256[:12]})"
            + (f"; watch it in the Web UI: {ui}" if ui else "")
        )
        # ui is set only when _walk runs on the embedded stack
        temporal = await (_embedded_client(cfg) if ui else client(cfg))
        handle = await start_lifecycle(temporal, ref, task_queue=cfg.task_queue)
        console.print(f"started ModelLifecycle {handle.id}")
        announced: set[str] = set()
        with console.status("lifecycle running") as spinner:
            while True:
                current = await read_status(handle)
                if current is not None:
                    spinner.update(f"{ref}: {current.state.value} in {current.stage}")
                    if current.state in (LifecycleState.SUCCEEDED, LifecycleState.FAILED):
                        break
                    gate = current.pending_gate
                    if gate and gate.stage not in announced:
                        announced.add(gate.stage)
                        if yes:
                            handle, envelope = await sign_decision(
                                temporal,
                                pool,
                                me,
                                ref,
                                stage=gate.stage,
                                decision=Decision.APPROVED,
                                comment="approved by mlc demo --yes",
                            )
                            await send_decision(handle, ref, SignedDecision(envelope=envelope), approve=True)
                            console.print(f"approved {gate.stage} as {me.name} (signed, verified)")
                        else:
                            console.print(
                                f"{ref} waits at {gate.stage}; approve with:\n"
                                f"  mlc approve {ref} --stage {gate.stage} --comment 'looks good'"
                            )
                await asyncio.sleep(0.3)
        render_status(current)
        if current.state is LifecycleState.FAILED:
            return 1
        live = await deployments.read_deployments(pool, model=ref.model)
        emit(
            live,
            as_json=False,
            title="Deployments (mlc deployments)",
            columns=["model", "version", "stage", "runtime", "mode", "state", "endpoint"],
        )
        last = current.stages[-1]
        async with httpx.AsyncClient() as http:
            for d in live:
                if d.stage == last and d.endpoint:
                    health = await http.get(f"{d.endpoint}/health")
                    health.raise_for_status()
                    console.print(f"[green]{ref} serves in {last} at {d.endpoint}[/green]")
        return 0
    finally:
        await pool.close()
