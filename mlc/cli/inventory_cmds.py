"""Commands over the inventory: models, runtimes, people, deployments."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlc import admin
from mlc.artifacts import ArtifactStore
from mlc.cli.context import console, emit, inventory, run, settings, signer
from mlc.domain import DockerSettings, Mode, Runtime, RuntimeKind
from mlc.registry import register_package
from mlc.store import deployments, runtimes, snapshots

JSON = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

model_app = typer.Typer(help="Register and list model snapshots.", no_args_is_help=True)
runtime_app = typer.Typer(help="Add, list, remove and clean up runtimes.", no_args_is_help=True)
user_app = typer.Typer(
    help="Grant and revoke roles (admin, approver, lifecycle-author); signed by an admin.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Attach these commands to the root app."""
    app.add_typer(model_app, name="model")
    app.add_typer(runtime_app, name="runtime")
    app.add_typer(user_app, name="user")
    app.command("deployments")(list_deployments)


@model_app.command("register")
def register_model(
    directory: Annotated[Path, typer.Argument(help="Model package folder (with manifest.yaml).")],
    as_json: JSON = False,
) -> None:
    """Snapshot a model package: an immutable, numbered, content-addressed version."""

    async def go() -> None:
        cfg = settings()
        async with inventory(cfg) as pool:
            snap, new = await register_package(
                pool,
                ArtifactStore(cfg.artifact_dir),
                directory.resolve(),
                signer=await signer(cfg, pool),
                settings=cfg,
            )
        if as_json:
            emit([snap], as_json=True, columns=[], title="")
        else:
            what = "registered" if new else "already registered (same content)"
            console.print(
                f"{snap.model}@{snap.version} {what}: sha256 {snap.sha256[:12]}, "
                f"service tags {', '.join(snap.service_tags)}"
            )

    run(go())


@model_app.command("list")
def list_models(model: Annotated[str | None, typer.Argument()] = None, as_json: JSON = False) -> None:
    """List snapshots (of one model, or all)."""

    async def go() -> None:
        async with inventory(settings()) as pool:
            found = await snapshots.read_snapshots(pool, model)
        emit(
            found,
            as_json=as_json,
            title="Snapshots",
            columns=["model", "version", "sha256", "service_tags", "created_at"],
        )

    run(go())


@runtime_app.command("add")
def add_runtime(
    name: str,
    stage: Annotated[str, typer.Option(help="Stage this runtime serves (DEV, SIT, UAT, PROD, ...).")],
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Service tag served (repeatable; * = any).")
    ] = None,
    kind: Annotated[RuntimeKind, typer.Option(help="Driver kind.")] = RuntimeKind.LOCAL,
    mode: Annotated[list[Mode] | None, typer.Option("--mode", help="Supported modes (repeatable).")] = None,
    task_queue: Annotated[str | None, typer.Option(help="Task queue of the worker acting on it.")] = None,
    docker_host: Annotated[
        str | None, typer.Option(help="Docker engine URL (unix://, tcp://, ssh://).")
    ] = None,
    base_image: Annotated[str | None, typer.Option(help="Base image for model images.")] = None,
    network_mode: Annotated[str | None, typer.Option(help="host, or a Docker network name.")] = None,
    tls_verify: Annotated[bool, typer.Option(help="Verify the engine's TLS certificate.")] = False,
    tls_ca_cert: Annotated[str | None, typer.Option()] = None,
    tls_client_cert: Annotated[str | None, typer.Option()] = None,
    tls_client_key: Annotated[str | None, typer.Option()] = None,
    replace: Annotated[bool, typer.Option(help="Overwrite a runtime of the same name.")] = False,
) -> None:
    """Add a runtime tagged with a stage and the service tags it serves."""
    docker = None
    if kind is RuntimeKind.DOCKER:
        options: dict[str, object] = {
            "base_url": docker_host,
            "base_image": base_image,
            "network_mode": network_mode,
            "tls_ca_cert": tls_ca_cert,
            "tls_client_cert": tls_client_cert,
            "tls_client_key": tls_client_key,
            "tls_verify": tls_verify,
        }
        docker = DockerSettings.model_validate({k: v for k, v in options.items() if v is not None})

    async def go() -> None:
        cfg = settings()
        runtime = Runtime(
            name=name,
            kind=kind,
            stage=stage,
            service_tags=tuple(tag or ["*"]),
            modes=tuple(mode or [Mode.ONLINE, Mode.BATCH]),
            task_queue=task_queue or cfg.task_queue,
            docker=docker,
        )
        async with inventory(cfg) as pool:
            await admin.add_runtime(pool, cfg, await signer(cfg, pool), runtime, replace=replace)
        console.print(
            f"runtime {name} ({kind.value}) serves {stage} for tags "
            f"{', '.join(runtime.service_tags)} on task queue {runtime.task_queue}"
        )

    run(go())


@runtime_app.command("list")
def list_runtimes(stage: Annotated[str | None, typer.Option()] = None, as_json: JSON = False) -> None:
    """List runtimes with their stage, service tags, modes and task queue."""

    async def go() -> None:
        async with inventory(settings()) as pool:
            found = await runtimes.read_runtimes(pool, stage=stage)
        emit(
            found,
            as_json=as_json,
            title="Runtimes",
            columns=["name", "kind", "stage", "service_tags", "modes", "task_queue"],
        )

    run(go())


@runtime_app.command("remove")
def remove_runtime(name: str) -> None:
    """Remove a runtime that has no live deployments."""

    async def go() -> None:
        cfg = settings()
        async with inventory(cfg) as pool:
            await admin.remove_runtime(pool, cfg, await signer(cfg, pool), name)
        console.print(f"runtime {name} removed")

    run(go())


@runtime_app.command("cleanup")
def cleanup_runtime(name: str, as_json: JSON = False) -> None:
    """Remove what a runtime still runs for deployments the inventory no longer has live."""
    from activities.runtimes import driver_for
    from activities.runtimes.base import CleanupRequest

    async def go() -> None:
        cfg = settings()
        async with inventory(cfg) as pool:
            runtime = await runtimes.read_runtime(pool, name)
            live = await deployments.read_deployments(pool, runtime=name)
        result = await driver_for(runtime, cfg).cleanup(
            CleanupRequest(runtime=runtime, keep=tuple(d.id for d in live))
        )
        if as_json:
            emit([result], as_json=True, columns=[], title="")
        else:
            console.print(
                f"runtime {name}: removed {len(result.removed)} orphan(s) {', '.join(result.removed)}"
            )

    run(go())


@user_app.command("grant")
def grant(
    name: str,
    role: Annotated[list[str], typer.Option("--role", help="Role to grant (repeatable).")],
) -> None:
    """Grant roles, e.g. ``approver`` (default gates), ``lifecycle-author`` (uploads), ``admin``."""
    _change_roles(name, role, admin.grant_role)


@user_app.command("revoke")
def revoke(
    name: str,
    role: Annotated[list[str], typer.Option("--role", help="Role to take away (repeatable).")],
) -> None:
    """Take roles away (a signed statement; the last admin keeps admin)."""
    _change_roles(name, role, admin.revoke_role)


def _change_roles(name: str, roles: list[str], change: admin.RoleChange) -> None:
    async def go() -> None:
        cfg = settings()
        async with inventory(cfg) as pool:
            me = await signer(cfg, pool)
            for role in roles:
                await change(pool, cfg, me, name, role)
            held = (await admin.state(pool, cfg)).roles_of(name)
        console.print(f"{name} now has roles: {', '.join(sorted(held)) or 'none'} (signed by {me.name})")

    run(go())


@user_app.command("list")
def list_users(as_json: JSON = False) -> None:
    """People and automations, their roles and keys, as the verified trail says."""

    async def go() -> None:
        cfg = settings()
        async with inventory(cfg) as pool:
            current = await admin.state(pool, cfg)
        emit(
            [
                {
                    "name": p.name,
                    "roles": sorted(p.roles),
                    "keys": sorted(p.active_keys()),
                    "revoked_keys": sorted(p.revoked),
                }
                for p in sorted(current.principals.values(), key=lambda p: p.name)
            ],
            as_json=as_json,
            title="People",
            columns=["name", "roles", "keys", "revoked_keys"],
        )

    run(go())


def list_deployments(
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    stage: Annotated[str | None, typer.Option(help="Only this stage.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Include retired, failed and finished ones.")] = False,
    as_json: JSON = False,
) -> None:
    """Which version of which model runs on which runtime in which stage."""

    async def go() -> None:
        async with inventory(settings()) as pool:
            found = await deployments.read_deployments(pool, live_only=not all_, model=model, stage=stage)
        emit(
            found,
            as_json=as_json,
            title="Deployments",
            columns=["model", "version", "stage", "runtime", "mode", "state", "endpoint", "id"],
        )

    run(go())
