"""Commands that run things: ``dev`` (embedded stack + worker), ``worker`` and ``demo``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import typer
from rich.markup import escape
from rich.table import Table
from temporalio.client import Client

from cli import admin
from cli.context import STATE, client, console, emit, local_user, settings
from cli.lifecycle_cmds import render_status
from cli.logs import service_logging, worker_logging
from cli.registration import register_package
from cli.stack.devstack import API_PORT, DevStack, dev_running, postgres_password_file
from mlc import endpoints
from mlc.artifacts import ArtifactStore
from mlc.config import Settings
from mlc.contracts.lifecycle import SignedDecision
from mlc.domain import Decision, LifecycleState, ModelRef
from mlc.errors import (
    BubblewrapMissingError,
    DeploymentFailedError,
    NginxMissingError,
    RuntimeUnavailableError,
)
from mlc.lifecycle_client import read_status, send_decision, sign_decision, start_lifecycle
from mlc.names import lifecycles_task_queue
from mlc.store import connect, deployments, runtimes, traffic
from mlc.store.db import enable_worker_login
from mlc.trust.keys import default_key_path, ensure_key

if TYPE_CHECKING:
    from workers.prerequisites import EmbeddedKafka


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
    cfg: Settings, *, temporal_port: int, ui_port: int, api_port: int, headless: bool
) -> AsyncIterator[Settings]:
    """Start the embedded servers, a migrated inventory with dev runtimes, ``mlc server`` and
    a worker; the settings yielded name the API (``api_url``) besides the owner's DSN, which
    only this process, the worker and the server hold.

    A previous stack of the home is picked up where it stopped, however it stopped (see
    :mod:`cli.stack.devstack`): leftovers of deployments that are no longer live are removed,
    and each runtime's reconciler checks the serving ones at once, restarting the model
    servers that stopped with the previous stack.
    """
    from activities.reconcile import keeping_reconcilers
    from cli.stack.kafka_broker import dev_brokers, serves
    from mlc import isolation
    from workers.client import ensure_search_attributes
    from workers.worker import build_main_worker

    stack = DevStack(cfg, temporal_port=temporal_port, ui_port=ui_port, api_port=api_port, headless=headless)
    try:
        with console.status("starting Temporal and PostgreSQL"):
            ready = await stack.start()
            assert ready.database_url is not None
            pool = await connect(ready.database_url)
        for note in stack.reused:
            console.print(f"reusing {note}, left running by the previous `mlc dev` of {ready.home}")
        for note in stack.stopped:
            console.print(f"stopped {note}, left running by the previous `mlc dev` of {ready.home}")
        for note in stack.notes:
            console.print(f"[yellow]{note}[/yellow]")
        try:
            await _check_served(pool, ready.task_queue, embedded_kafka=serves)
            ready = await admin.bootstrap_dev(
                pool,
                ready,
                local_user(),
                ensure_key(default_key_path()),
                task_queue=ready.task_queue,
                gateways=_gateways_available(),
            )
            worker_dsn = await enable_worker_login(pool, ready.database_url or "")
            ready = replace(ready, worker_database_url=worker_dsn, servers_die_with_worker=True)
            await _check_gateway_ports(ready, pool)
            await _remove_stale_local_leftovers(ready, pool)
            worker_pool = await connect(ready.worker_database_url or "", migrate_schema=False)
            temporal = await _embedded_client(ready)
            await ensure_search_attributes(temporal)
            with console.status("starting the API (mlc server)"):
                ready = await stack.start_server(ready)
            if api_port and ready.api_url != f"http://127.0.0.1:{api_port}":
                console.print(
                    f"[yellow]port {api_port} is taken by another program: the API listens on "
                    f"{ready.api_url} instead (--api-port picks another)[/yellow]"
                )
            try:
                main = build_main_worker(temporal, ready, worker_pool)
                async with (
                    main,
                    _sandboxed_lifecycles(ready),
                    dev_brokers(pool, ready.home, announce=console.print),
                    keeping_reconcilers(temporal, ready, worker_pool),
                ):
                    isolation.lock_home(ready.home, ready.runtime_dir)  # what the workers made (their logs)
                    supervisor = asyncio.create_task(stack.supervise_server(ready, _warn))
                    try:
                        yield ready
                    finally:
                        supervisor.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await supervisor
            finally:
                await worker_pool.close()
            await _stop_local_servers(ready, pool)
        finally:
            await pool.close()
    finally:
        stack.stop()


def _warn(line: str) -> None:
    console.print(f"[yellow]{escape(line)}[/yellow]", highlight=False)


def _gateways_available() -> bool:
    """Whether the stack's runtimes can have gateways: without nginx they are created
    without one (consumers call each deployment's own endpoint), said once here. Runtimes
    that have one already were checked before (no nginx for them is an error)."""
    from workers import prerequisites

    try:
        prerequisites.nginx("a runtime's gateway (its stable endpoints)")
    except NginxMissingError as exc:
        console.print(
            f"[yellow]{escape(str(exc))}; until then the stack's runtimes have no gateway: consumers "
            "call each deployment's own endpoint[/yellow]",
            highlight=False,
        )
        return False
    return True


def _sandbox_missing() -> BubblewrapMissingError | None:
    """Why uploaded lifecycles are off on this host (no working bubblewrap), or None."""
    from workers import prerequisites

    try:
        prerequisites.bubblewrap()
    except BubblewrapMissingError as exc:
        return exc
    return None


@contextlib.asynccontextmanager
async def _sandboxed_lifecycles(ready: Settings) -> AsyncIterator[None]:
    """The sandboxed lifecycle worker as a child of the stack (uploaded lifecycles run only
    there); without bubblewrap the stack runs without it and says so once, with the fix."""
    from workers.sandbox import lifecycle_worker

    missing = _sandbox_missing()
    if missing is not None:
        note = f"{missing}; until then uploaded lifecycles are off"
        console.print(f"[yellow]{escape(note)}[/yellow]", highlight=False)
        yield
        return
    from workers.client import tls_environ

    async with lifecycle_worker(
        main_queue=ready.task_queue,
        temporal_address=ready.temporal_address,
        namespace=ready.temporal_namespace,
        log_path=ready.home / "lifecycle-worker.log",
        environ=tls_environ(ready),
    ):
        yield


async def _embedded_client(ready: Settings) -> Client:
    """A client of the server ``embedded`` started (through its mutual-TLS proxy when it has
    one): TEMPORAL_TLS_*, TEMPORAL_API_KEY and TEMPORAL_PROFILE describe some other cluster,
    never this one."""
    from workers.client import connect as connect_temporal

    return await connect_temporal(ready, plain=True)


async def _check_gateway_ports(cfg: Settings, pool: asyncpg.Pool) -> None:
    """Refuse to start when a local gateway's port is held by another program: while the
    stack was down any local account could listen there, and consumers of the stable
    endpoint would send it their requests (the reconciler could only fail to start it).

    Raises:
        RuntimeUnavailableError: naming the port, the runtime and the holder.
    """
    from activities.runtimes.registry import gateway_for
    from mlc.domain import RuntimeKind

    for runtime in await runtimes.read_runtimes(pool):
        if runtime.kind is RuntimeKind.LOCAL and runtime.gateway is not None:
            problem = await gateway_for(cfg, runtime).port_problem()
            if problem is not None:
                raise RuntimeUnavailableError(problem)


async def _remove_stale_local_leftovers(cfg: Settings, pool: asyncpg.Pool) -> None:
    """Stop model servers and remove folders of deployments that are no longer live (a
    crash can leave them); serving ones are the reconciler's, batch outputs are kept.
    Whatever a killed stack's models left running (a daemon their code started) ends here,
    before the reconciler starts them again."""
    from activities.runtimes.base import CleanupRequest
    from activities.runtimes.local.driver import LocalDriver
    from activities.runtimes.registry import driver_for
    from mlc.domain import RuntimeKind

    keep = await deployments.kept_ids(pool)
    for runtime in await runtimes.read_runtimes(pool):
        if runtime.kind is RuntimeKind.LOCAL:
            await LocalDriver(cfg).stop_servers(runtime)
            removed = await driver_for(runtime, cfg).cleanup(CleanupRequest(runtime=runtime, keep=keep))
            if removed.removed:
                console.print(f"runtime {runtime.name}: removed leftovers of {', '.join(removed.removed)}")


async def _stop_local_servers(cfg: Settings, pool: asyncpg.Pool) -> None:
    """Stop the local model servers with the stack, keeping their records: the inventory
    still says what should serve, and the next ``mlc dev`` brings it back. Docker runtimes'
    warm spare containers go too (deployments' containers stay, the engine runs them)."""
    from activities.runtimes.docker.driver import DockerDriver
    from activities.runtimes.local.driver import LocalDriver
    from mlc.domain import RuntimeKind

    for runtime in await runtimes.read_runtimes(pool):
        if runtime.kind is RuntimeKind.LOCAL:
            await LocalDriver(cfg).stop_servers(runtime)
        elif runtime.kind is RuntimeKind.DOCKER:
            with contextlib.suppress(RuntimeUnavailableError, DeploymentFailedError):
                await DockerDriver(cfg).drop_spares(runtime)


DEBUG = Annotated[bool, typer.Option("--debug", help="Print tracebacks in the terminal too (mlc --debug).")]
API_PORT_HELP = "Port of the API (mlc server, 127.0.0.1); a free one when another program has it."


def dev(
    temporal_port: Annotated[int, typer.Option(help="Temporal frontend port.")] = 7233,
    ui_port: Annotated[int, typer.Option(help="Temporal Web UI port.")] = 8233,
    api_port: Annotated[int, typer.Option(help=API_PORT_HELP)] = API_PORT,
    headless: Annotated[bool, typer.Option(help="No Web UI.")] = False,
    debug: DEBUG = False,
) -> None:
    """Run Temporal (with its Web UI), PostgreSQL, the API (mlc server), a worker and local
    runtimes for every stage, all state under --home. Ctrl-C stops everything.

    Other mlc commands of the home act through the API, signed with your key, as a team
    member would: the database owner's DSN stays with the server and the worker.

    What its worker needs from this host is checked before it starts: a missing piece is
    one line naming it and its fix, with an exit code of its own: 10 nginx (gateways of
    runtimes that have one), 12 the Docker engine of a docker runtime, 13 the Kafka broker
    of a streaming runtime; 4 another mlc dev runs on this home, 5 a server did not start
    or a port it needs (Temporal's, the Web UI's, a gateway's) is held by another program.
    Without nginx the runtimes it creates get no gateway (consumers call each deployment's
    own endpoint), and without bubblewrap uploaded lifecycles are off: it says so once.

    A failed activity is one line here; its traceback is in MLC_HOME/worker.log (--debug
    prints it here too).
    """

    from cli.stack import dev_temporal

    async def go() -> None:
        stop = _stop_event()
        cfg = settings()
        log_path = worker_logging(cfg.home, debug=STATE.debug or debug)
        embedded_postgres = cfg.database_url is None
        async with embedded(
            cfg, temporal_port=temporal_port, ui_port=ui_port, api_port=api_port, headless=headless
        ) as ready:
            table = Table(title="mlc dev is running (Ctrl-C stops it)", show_header=False)
            guarded = ready.temporal_tls is not None
            tls = (
                f" (mutual TLS, client certificate in {ready.home / dev_temporal.TLS_DIR})" if guarded else ""
            )
            table.add_row("Temporal", ready.temporal_address + tls)
            if not headless:
                login = dev_temporal.ui_login(ready.home) if guarded else None
                table.add_row("Web UI", f"http://127.0.0.1:{ui_port}" + (f" ({login})" if login else ""))
            table.add_row("API", f"{ready.api_url} (mlc server; other mlc commands of this home use it)")
            table.add_row("Task queue", ready.task_queue)
            uploaded = lifecycles_task_queue(ready.task_queue)
            sandboxed = "off: no bubblewrap" if _sandbox_missing() else "uploaded code, sandboxed"
            table.add_row("Lifecycles queue", f"{uploaded} ({sandboxed})")
            table.add_row("Inventory", _inventory_row(ready.database_url, embedded_postgres, ready.home))
            table.add_row("State", str(ready.home))
            table.add_row("Worker log", f"{log_path} (tracebacks of failed activities)")
            table.add_row("Admin and approver", f"{local_user()} (key {default_key_path()})")
            table.add_row("Trust root", ready.trust_root or "-")
            console.print(table)
            await stop.wait()
        console.print("stopped")

    asyncio.run(go())


def _inventory_row(url: str | None, embedded_postgres: bool, home: Path) -> str:
    """The inventory's URL for the start-up table: never its password (a screen is shared,
    a terminal is logged), but where the password is kept and who holds the DSN (the server
    and the worker only)."""
    if url is None:
        return "-"
    parts = urlsplit(url)
    if parts.password is None:
        return f"{url} (server only)"
    host = parts.netloc.rpartition("@")[2]
    shown = urlunsplit(parts._replace(netloc=f"{parts.username or ''}@{host}"))
    kept = postgres_password_file(home) if embedded_postgres else "MLC_DATABASE_URL"
    return f"{shown} (server only; password in {kept})"


def worker(
    runtime: Annotated[
        str | None,
        typer.Option(help="Serve only this runtime's task queue (a worker next to its Docker engine)."),
    ] = None,
    lifecycles: Annotated[
        bool,
        typer.Option(
            "--lifecycles",
            help="Serve uploaded lifecycles (task queue <MLC_TASK_QUEUE>-lifecycles): no database, "
            "no keys, network only to Temporal.",
        ),
    ] = False,
    sandbox: Annotated[
        bool,
        typer.Option(
            "--sandbox/--no-sandbox",
            help="With --lifecycles: run under bubblewrap (default); --no-sandbox where a restricted "
            "container already is the sandbox.",
        ),
    ] = True,
    debug: DEBUG = False,
) -> None:
    """Run a worker against TEMPORAL_ADDRESS / MLC_DATABASE_URL.

    What it needs from this host for the runtimes on its task queue is checked before it
    starts: a missing piece is one line naming it and its fix, with an exit code of its
    own: 10 nginx (gateways), 11 bubblewrap (--lifecycles), 12 the Docker engine of a
    docker runtime, 13 the Kafka broker of a streaming runtime.

    In a terminal, a failed activity is one line and its traceback goes to
    MLC_HOME/worker.log (--debug prints it too); otherwise (a container, a service) whole
    log records go to stderr.
    """
    log_note = ""
    if sys.stderr.isatty():
        log_path = worker_logging(settings().home, debug=STATE.debug or debug)
        log_note = f"; tracebacks of failed activities go to {log_path}"
    else:
        service_logging()
    if lifecycles:
        asyncio.run(_lifecycle_worker(sandbox=sandbox))
        return
    from activities.reconcile import keeping_reconcilers
    from workers.client import ensure_search_attributes
    from workers.worker import build_main_worker, build_runtime_worker, run_until

    async def go() -> None:
        # A worker is a server-side process with credentials of its own: the API that a
        # running `mlc dev` names for people's commands of its home is not its way in.
        cfg = replace(settings(), api_url=None)
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
                await _check_served(pool, cfg.task_queue)
                console.print(f"serving task queue {cfg.task_queue}{log_note}")
                async with keeping_reconcilers(temporal, cfg, pool):  # what died meanwhile is seen at once
                    await run_until(build_main_worker(temporal, cfg, pool), stop)
            finally:
                await pool.close()
            return
        if dsn:
            pool = await connect(dsn, max_size=1, migrate_schema=cfg.worker_database_url is None)
            try:
                queue = (await runtimes.read_runtime(pool, runtime)).task_queue
                await _check_served(pool, queue)
            finally:
                await pool.close()
        else:
            queue = f"runtime-{runtime}"
        console.print(f"serving runtime {runtime} on task queue {queue}{log_note}")
        from cli.admin import local_evidence_key

        line = local_evidence_key(cfg, runtime)  # created now (0600) when missing
        console.print(
            f"it signs results with evidence key {line}; an admin registers it once: "
            f"`mlc runtime key add {runtime} '{line}'` (or `mlc runtime add ... --evidence-key`)",
            soft_wrap=True,
            markup=False,
        )
        await run_until(build_runtime_worker(temporal, cfg, queue), stop)

    asyncio.run(go())


async def _check_served(
    pool: asyncpg.Pool, task_queue: str, *, embedded_kafka: EmbeddedKafka | None = None
) -> None:
    """What the runtimes on ``task_queue`` (the worker's) need from this host, before it starts
    (``embedded_kafka``: ``mlc dev`` starts brokers for loopback addresses).

    Raises:
        PrerequisiteError: the first thing missing, with its fix and exit code.
    """
    from workers import prerequisites

    served = [r for r in await runtimes.read_runtimes(pool) if r.task_queue == task_queue]
    await prerequisites.check_runtimes(served, embedded_kafka=embedded_kafka)


async def _lifecycle_worker(*, sandbox: bool) -> None:
    """``mlc worker --lifecycles``: the sandboxed worker of uploaded code, or (``--no-sandbox``)
    that worker itself, as the sandbox and containers run it."""
    from workers import lifecycle_worker, prerequisites
    from workers.client import tls_environ
    from workers.sandbox import start_lifecycle_worker

    cfg = settings()
    stop = _stop_event()
    if not sandbox:
        await lifecycle_worker.serve(cfg, stop)
        return
    prerequisites.bubblewrap()
    log_path = cfg.home / "lifecycle-worker.log"
    started = await start_lifecycle_worker(
        main_queue=cfg.task_queue,
        temporal_address=cfg.temporal_address,
        namespace=cfg.temporal_namespace,
        log_path=log_path,
        environ={**os.environ, **tls_environ(cfg)},
    )
    console.print(f"serving uploaded lifecycles on {started.task_queue}, sandboxed (log {log_path})")
    exited = asyncio.ensure_future(started.process.wait())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({exited, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if exited.done() and not stopped.done():
            raise RuntimeUnavailableError(
                f"the sandboxed lifecycle worker exited (code {started.process.returncode}); "
                f"last lines of {log_path}:\n{started.log_tail()}"
            )
    finally:
        stopped.cancel()
        await started.stop()


def demo(
    yes: Annotated[bool, typer.Option("--yes", help="Approve every gate automatically.")] = False,
    temporal_port: Annotated[int, typer.Option(help="Temporal port of the embedded stack.")] = 7233,
    ui_port: Annotated[int, typer.Option(help="Web UI port of the embedded stack.")] = 8233,
    api_port: Annotated[int, typer.Option(help=API_PORT_HELP)] = API_PORT,
    debug: DEBUG = False,
) -> None:
    """Register the example fraud model and walk it DEV -> PROD on an embedded stack.

    It acts through the stack's API (mlc server), signed with your key, as a team member
    would; on a server or worker host (MLC_DATABASE_URL and TEMPORAL_ADDRESS set, no running
    mlc dev) it uses the database and Temporal directly.
    """
    from cli.stack import dev_temporal

    async def go() -> int:
        cfg = settings()
        external = "TEMPORAL_ADDRESS" in os.environ and cfg.database_url is not None
        if cfg.api_url:
            console.print(f"using the running stack's API at {cfg.api_url} and its workers")
            return await _walk_api(cfg, yes=yes, ui=None)
        if dev_running(cfg) or external:
            console.print(f"using the running stack at {cfg.temporal_address} and its workers")
            return await _walk(cfg, yes=yes)
        log_path = worker_logging(cfg.home, debug=STATE.debug or debug)
        async with embedded(
            cfg, temporal_port=temporal_port, ui_port=ui_port, api_port=api_port, headless=False
        ) as ready:
            login = dev_temporal.ui_login(ready.home) if ready.temporal_tls else None
            ui = f"http://127.0.0.1:{ui_port}" + (f" ({login})" if login else "")
            code = await _walk_api(ready, yes=yes, ui=ui)
        if code:
            console.print(f"the worker's log, with the tracebacks of failed activities: {log_path}")
        return code

    raise typer.Exit(asyncio.run(go()))


async def _walk_api(cfg: Settings, *, yes: bool, ui: str | None) -> int:
    """The demo as a team member runs it: through the API, signed with the user's key."""
    from cli import demo_api
    from cli.api_client import ApiClient
    from cli.examples import prepare_example_model

    assert cfg.api_url
    with console.status("training the example credit-card-fraud model"):
        package = await asyncio.to_thread(prepare_example_model)
    async with ApiClient(cfg.api_url, ensure_key(default_key_path())) as api:
        return await demo_api.walk(api, package, yes=yes, ui=ui)


async def _walk(cfg: Settings, *, yes: bool) -> int:
    """The demo on a server or worker host, with the owner's DSN and Temporal directly."""
    from cli.examples import prepare_example_model

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
        console.print(f"registered {ref} (sha256 {snap.sha256[:12]})")
        temporal = await client(cfg)
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
        tables = await traffic.read_traffic(pool, model=ref.model, stage=last)
        stable = [t.endpoint for t in tables if t.routes]
        # consumers call the stable endpoint where the runtime has a gateway
        for endpoint in stable or [d.endpoint for d in live if d.stage == last and d.endpoint]:
            async with endpoints.connect(endpoint, timeout=5.0) as (http, url):
                health = await http.get(f"{url}/health")
                health.raise_for_status()
                kind = "its stable endpoint " if stable else ""
                console.print(f"[green]{ref} serves in {last} at {kind}{endpoint}[/green]")
        return 0
    finally:
        await pool.close()
