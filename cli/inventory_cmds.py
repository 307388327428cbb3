"""Commands over the inventory: models, runtimes, people, deployments."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import typer

from activities.runtimes.registry import kind_spec, kinds
from cli.context import api, console, emit, inventory, rows, run, settings, signer
from mlc.domain import (
    DEFAULT_RESTART,
    HostingMode,
    Mode,
    ModelNetwork,
    Runtime,
    RuntimeKind,
)
from mlc.errors import MLCError, RuntimeUnavailableError
from mlc.store import deployments, runtimes
from server.reads import deployments as reads

if TYPE_CHECKING:
    import asyncpg

    from cli import admin
    from cli.api_client import ApiClient
    from mlc.config import Settings
    from mlc.domain import GatewaySettings

# Governance (cryptography, payload models), registration and Kafka settings load inside
# the commands that use them: `mlc deployments` only reads the inventory.

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
    app.command("history")(traffic_history)


@model_app.command("register")
def register_model(
    directory: Annotated[Path, typer.Argument(help="Model package folder (with manifest.yaml).")],
    as_json: JSON = False,
) -> None:
    """Snapshot a model package: an immutable, numbered, content-addressed version."""

    from cli.registration import register_package
    from mlc.artifacts import ArtifactStore

    async def go() -> None:
        cfg = settings()
        remote = api(cfg)
        if remote is not None:
            from cli import remote as through

            async with remote:
                snap, new = await through.register(remote, directory.resolve())
        else:
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
        from mlc.store import snapshots  # manifests (yaml): not for `mlc deployments`

        found = await rows(
            settings(), "/v1/snapshots", lambda pool: snapshots.read_snapshots(pool, model), model=model
        )
        emit(
            found,
            as_json=as_json,
            title="Snapshots",
            columns=["model", "version", "sha256", "service_tags", "created_at"],
        )

    run(go())


def add_runtime(
    name: str,
    stage: Annotated[str, typer.Option(help="Stage this runtime serves (DEV, SIT, UAT, PROD, ...).")],
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Service tag served (repeatable; * = any).")
    ] = None,
    kind: Annotated[RuntimeKind, typer.Option(help="Driver kind.")] = RuntimeKind.LOCAL,
    mode: Annotated[list[Mode] | None, typer.Option("--mode", help="Supported modes (repeatable).")] = None,
    task_queue: Annotated[str | None, typer.Option(help="Task queue of the worker acting on it.")] = None,
    replace: Annotated[bool, typer.Option(help="Overwrite a runtime of the same name.")] = False,
    restart: Annotated[
        str,
        typer.Option(
            help="What the reconciler does with a serving deployment found dead: "
            "no (mark it failed), on-failure[:N] (restart up to N times in a row), always."
        ),
    ] = DEFAULT_RESTART,
    hosting: Annotated[
        HostingMode | None,
        typer.Option(
            help="shared: online deployments share one model-host process (and user); dedicated: "
            "a process each. Default: shared on local runtimes below PROD, else dedicated."
        ),
    ] = None,
    model_network: Annotated[
        ModelNetwork,
        typer.Option(
            help="Local runtimes under a root worker: none (model code reaches no network) or "
            "outbound (other hosts, never this host's own addresses)."
        ),
    ] = ModelNetwork.NONE,
    kafka_bootstrap: Annotated[
        str | None, typer.Option(help="Streaming: Kafka brokers, host:port[,host:port].")
    ] = None,
    input_topic: Annotated[str | None, typer.Option(help="Streaming: topic the model reads.")] = None,
    output_topic: Annotated[str | None, typer.Option(help="Streaming: topic the scores go to.")] = None,
    dead_letter_topic: Annotated[
        str | None, typer.Option(help="Streaming: rejected records (default INPUT.dead-letter).")
    ] = None,
    consumer_group: Annotated[
        str | None, typer.Option(help="Streaming: group of every version (default mlc.RUNTIME.MODEL).")
    ] = None,
    kafka_security_protocol: Annotated[
        str | None, typer.Option(help="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.")
    ] = None,
    sasl_mechanism: Annotated[str | None, typer.Option(help="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.")] = None,
    sasl_username: Annotated[str | None, typer.Option()] = None,
    sasl_password_env: Annotated[
        str | None, typer.Option(help="Variable holding the SASL password on the worker's host.")
    ] = None,
    kafka_ca_cert: Annotated[str | None, typer.Option(help="CA file to verify the brokers.")] = None,
    kafka_client_cert: Annotated[str | None, typer.Option()] = None,
    kafka_client_key: Annotated[str | None, typer.Option()] = None,
    partitions: Annotated[int | None, typer.Option(help="Partitions of topics the runtime creates.")] = None,
    instances: Annotated[int | None, typer.Option(help="Consumers per streaming deployment.")] = None,
    create_topics: Annotated[
        bool, typer.Option(help="Create missing input, output and dead-letter topics.")
    ] = True,
    gateway: Annotated[
        bool,
        typer.Option(
            help="Give online models a stable endpoint on this runtime's gateway "
            "(http://HOST:PORT/models/MODEL/score); --no-gateway: consumers call deployments directly."
        ),
    ] = True,
    gateway_port: Annotated[
        int | None, typer.Option(help="The gateway's port (default: a free one, picked now and kept).")
    ] = None,
    gateway_host: Annotated[
        str | None,
        typer.Option(
            help="Address the gateway binds and reports (default 127.0.0.1, or docker's publish host)."
        ),
    ] = None,
    evidence_key: Annotated[
        str | None,
        typer.Option(
            help="The runtime worker's evidence key (`mlc runtime key show NAME` on its host: an "
            "ssh-ed25519 line or a .pub file); default: the key of a worker using this MLC_HOME "
            "(through MLC_API_URL it must be given)."
        ),
    ] = None,
    **kind_options: Any,
) -> None:
    """Add a runtime tagged with a stage and the service tags it serves.

    A runtime serving online models gets a gateway by default: each model's stable endpoint
    ``http://HOST:PORT/models/MODEL`` never changes while versions come and go behind it.
    Its worker signs every test report and deploy result with the runtime's evidence key,
    registered by the same signed statement.
    """
    kafka = None
    if kafka_bootstrap is not None or Mode.STREAMING in (mode or []):
        given: dict[str, object] = {
            "bootstrap_servers": kafka_bootstrap,
            "input_topic": input_topic,
            "output_topic": output_topic,
            "dead_letter_topic": dead_letter_topic,
            "consumer_group": consumer_group,
            "security_protocol": kafka_security_protocol,
            "sasl_mechanism": sasl_mechanism,
            "sasl_username": sasl_username,
            "sasl_password_env": sasl_password_env,
            "ssl_ca_location": kafka_ca_cert,
            "ssl_certificate_location": kafka_client_cert,
            "ssl_key_location": kafka_client_key,
            "partitions": partitions,
            "instances": instances,
            "create_topics": create_topics,
        }
        missing = [f"--{k}" for k, v in (("kafka-bootstrap", kafka_bootstrap), ("input-topic", input_topic),
                                        ("output-topic", output_topic)) if v is None]  # fmt: skip
        if missing:
            raise typer.BadParameter(f"a streaming runtime needs {', '.join(missing)}")
        if Mode.STREAMING not in (mode or []):
            raise typer.BadParameter("kafka settings given without --mode streaming")
        from mlc.kafka_settings import KafkaSettings

        kafka = KafkaSettings.model_validate({k: v for k, v in given.items() if v is not None})
    spec = kind_spec(kind)  # the kind's own options (--docker-host...) fill its settings
    kind_settings = spec.settings_from(kind_options)

    modes = tuple(mode or [Mode.ONLINE, Mode.BATCH])
    if (gateway_port is not None or gateway_host is not None) and not gateway:
        raise typer.BadParameter("--gateway-port/--gateway-host given with --no-gateway")
    if gateway_port is not None and gateway and Mode.ONLINE not in modes:
        raise typer.BadParameter("a gateway serves online models: add --mode online, or drop --gateway-port")

    def runtime_of(cfg: Settings, gateway_settings: GatewaySettings | None) -> Runtime:
        return Runtime(
            name=name,
            kind=kind,
            stage=stage,
            service_tags=tuple(tag or ["*"]),
            modes=modes,
            task_queue=task_queue or cfg.task_queue,
            kafka=kafka,
            restart=restart,
            hosting=hosting,
            model_network=model_network,
            gateway=gateway_settings,
            **spec.runtime_fields(kind_settings),
        )

    async def through_api(cfg: Settings, remote: ApiClient) -> Runtime:
        """Sign ``runtime.add`` here; the evidence key and the gateway port must be given,
        since this host is not the runtime's (see the errors)."""
        from cli import admin
        from cli.remote import govern
        from mlc.trust.governance import RUNTIME_ADD

        if evidence_key is None:
            raise typer.BadParameter(
                "through the API, give the runtime worker's evidence key: --evidence-key 'ssh-ed25519 ...' "
                f"(`mlc runtime key show {name}` on the worker's host). It is not read from the server: "
                "a compromised server could substitute its own key and sign test results"
            )
        if replace:
            raise typer.BadParameter("--replace is not available through the API: `mlc runtime remove` first")
        gateway_settings = None
        if gateway and Mode.ONLINE in modes:
            if gateway_port is None:
                raise typer.BadParameter(
                    "through the API, give --gateway-port (a port free on the runtime's host, which this "
                    "host cannot check) or --no-gateway"
                )
            from mlc.domain import GatewaySettings

            gateway_settings = GatewaySettings(
                port=gateway_port, host=gateway_host or spec.gateway_host(kind_settings)
            )
        runtime = runtime_of(cfg, gateway_settings)
        args = {**admin.runtime_args(runtime), "evidence_key": admin.read_public_key(evidence_key)}
        async with remote:
            await govern(remote, RUNTIME_ADD, args)
        return runtime

    async def go() -> None:
        cfg = settings()
        from cli import admin

        remote = api(cfg)
        if remote is not None:
            runtime = await through_api(cfg, remote)
            return report(runtime)
        async with inventory(cfg) as pool:
            gateway_settings = None
            if gateway and Mode.ONLINE in modes:
                from mlc.domain import GatewaySettings
                from mlc.traffic import pick_gateway_port

                host = gateway_host or spec.gateway_host(kind_settings)
                taken = {
                    r.gateway.port for r in await runtimes.read_runtimes(pool) if r.gateway and r.name != name
                }
                if gateway_port is not None and gateway_port in taken:
                    raise typer.BadParameter(f"gateway port {gateway_port} is another runtime's already")
                port = gateway_port or pick_gateway_port(host, taken=taken)
                gateway_settings = GatewaySettings(port=port, host=host)
            runtime = runtime_of(cfg, gateway_settings)
            await admin.add_runtime(
                pool,
                cfg,
                await signer(cfg, pool),
                runtime,
                replace=replace,
                evidence_key=admin.read_public_key(evidence_key) if evidence_key else None,
            )
        report(runtime)

    def report(runtime: Runtime) -> None:
        console.print(
            f"runtime {name} ({kind.value}) serves {stage} for tags "
            f"{', '.join(runtime.service_tags)} on task queue {runtime.task_queue}"
        )
        if runtime.gateway is not None:
            console.print(f"stable endpoints: {runtime.gateway.endpoint('MODEL')}/score")

    run(go())


def _with_kind_options(command: Callable[..., None], *, after: str) -> inspect.Signature:
    """``command``'s signature with every runtime kind's own options (``--docker-host``...)
    after parameter ``after``, for typer to parse; they reach ``command`` as keywords."""
    params = [
        p
        for p in inspect.signature(command, eval_str=True).parameters.values()
        if p.kind is not p.VAR_KEYWORD
    ]
    at = [p.name for p in params].index(after) + 1
    options = [
        inspect.Parameter(
            option.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=option.default,
            annotation=Annotated[option.type, typer.Option(help=option.help)],
        )
        for spec in kinds().values()
        for option in spec.options
    ]
    return inspect.Signature([*params[:at], *options, *params[at:]], return_annotation=None)


add_runtime.__signature__ = _with_kind_options(add_runtime, after="task_queue")  # type: ignore[attr-defined]
runtime_app.command("add")(add_runtime)

RUNTIME_COLUMNS = ("name", "kind", "stage", "service_tags", "modes", "task_queue", "restart", "model_network")
"""What ``mlc runtime list`` shows of each runtime."""


@runtime_app.command("list")
def list_runtimes(stage: Annotated[str | None, typer.Option()] = None, as_json: JSON = False) -> None:
    """List runtimes with their stage, service tags, modes and task queue."""

    async def go() -> None:
        found = await rows(
            settings(), "/v1/runtimes", lambda pool: runtimes.read_runtimes(pool, stage=stage), stage=stage
        )
        emit(
            found,
            as_json=as_json,
            title="Runtimes",
            columns=[*RUNTIME_COLUMNS],
        )

    run(go())


runtime_key_app = typer.Typer(
    help="A runtime's evidence keys: the keys its worker signs test reports and deploy results with.",
    no_args_is_help=True,
)
runtime_app.add_typer(runtime_key_app, name="key")


@runtime_key_app.command("show")
def show_runtime_key(name: str) -> None:
    """Print the evidence key of runtime NAME's worker on this host (created on first use, 0600).

    Run it where the runtime's worker runs, with its MLC_HOME, and give the line to an admin.
    """
    from cli import admin

    print(admin.local_evidence_key(settings(), name))


@runtime_key_app.command("add")
def add_runtime_key(
    name: str,
    public_key: Annotated[str, typer.Argument(help="An ssh-ed25519 line or a .pub/PEM file.")],
) -> None:
    """Register another evidence key of runtime NAME (admins only; rotate, then revoke the old one)."""
    from cli import admin

    async def go() -> None:
        cfg = settings()
        text = admin.read_public_key(public_key)
        remote = api(cfg)
        if remote is not None:
            from cli.remote import govern
            from mlc.trust.governance import RUNTIME_KEY_ADD

            async with remote:
                args, kid = admin.runtime_key_args(name, text)
                await govern(remote, RUNTIME_KEY_ADD, args)
        else:
            async with inventory(cfg) as pool:
                kid = await admin.add_runtime_key(pool, cfg, await signer(cfg, pool), name, text)
        console.print(f"runtime {name}: evidence key {kid} registered")

    run(go())


@runtime_key_app.command("revoke")
def revoke_runtime_key(name: str, keyid: Annotated[str, typer.Argument(help="SHA256:... key id.")]) -> None:
    """Revoke an evidence key of runtime NAME (admins only): results it signs are refused from now on."""

    async def go() -> None:
        from cli.remote import statement
        from mlc.trust.governance import RUNTIME_KEY_REVOKE

        await statement(settings(), RUNTIME_KEY_REVOKE, {"runtime": name, "keyid": keyid})
        console.print(f"runtime {name}: evidence key {keyid} revoked")

    run(go())


@runtime_key_app.command("list")
def list_runtime_keys(as_json: JSON = False) -> None:
    """List the runtimes' evidence keys as the verified governance state has them."""
    from cli import admin
    from server.reads.governance import runtime_key_rows

    async def go() -> None:
        cfg = settings()

        async def direct(pool: asyncpg.Pool) -> list[dict[str, Any]]:
            return runtime_key_rows(await admin.state(pool, cfg))

        found = await rows(cfg, "/v1/runtimes/keys", direct)
        emit(found, as_json=as_json, title="Runtime evidence keys", columns=["runtime", "keyid", "revoked"])

    run(go())


@runtime_app.command("remove")
def remove_runtime(name: str) -> None:
    """Remove a runtime that has no live deployments (a docker runtime's warm spare
    containers go with it)."""

    from activities.runtimes.docker.driver import DockerDriver
    from cli import admin

    async def go() -> None:
        cfg = settings()
        remote = api(cfg)
        if remote is not None:  # a docker runtime's spares are its worker host's to drop
            from cli.remote import govern
            from mlc.trust.governance import RUNTIME_REMOVE

            async with remote:
                await govern(remote, RUNTIME_REMOVE, {"name": name})
            console.print(f"runtime {name} removed")
            return
        async with inventory(cfg) as pool:
            runtime = await runtimes.read_runtime(pool, name)
            await admin.remove_runtime(pool, cfg, await signer(cfg, pool), name)
        console.print(f"runtime {name} removed")
        if runtime.kind is RuntimeKind.DOCKER:
            try:
                await DockerDriver(cfg).drop_spares(runtime)
            except MLCError as exc:
                console.print(
                    f"its spare containers stay ({exc}): `docker rm -f` those labelled "
                    f"mlc.runtime={name} and mlc.mode=spare"
                )

    run(go())


@runtime_app.command("cleanup")
def cleanup_runtime(name: str, as_json: JSON = False) -> None:
    """Remove what a runtime still runs or holds for deployments the inventory no longer has
    live (finished batch jobs keep their output)."""
    from activities.runtimes.base import CleanupRequest
    from activities.runtimes.registry import driver_for

    async def go() -> None:
        cfg = settings()
        if cfg.api_url:  # the driver acts on the runtime's engine with the worker host's settings
            raise RuntimeUnavailableError(
                f"`mlc runtime cleanup` removes containers and processes through runtime {name}'s engine, "
                "which only its worker's host reaches (with that host's MLC_HOME): run it there, without "
                "MLC_API_URL; `mlc deployments --all --json` lists what the inventory keeps"
            )
        async with inventory(cfg) as pool:
            runtime = await runtimes.read_runtime(pool, name)
            keep = await deployments.kept_ids(pool, runtime=name)
        result = await driver_for(runtime, cfg).cleanup(CleanupRequest(runtime=runtime, keep=keep))
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
    from cli import admin

    _change_roles(name, role, admin.grant_role)


@user_app.command("revoke")
def revoke(
    name: str,
    role: Annotated[list[str], typer.Option("--role", help="Role to take away (repeatable).")],
) -> None:
    """Take roles away (a signed statement; the last admin keeps admin)."""
    from cli import admin

    _change_roles(name, role, admin.revoke_role)


def _change_roles(name: str, roles: list[str], change: admin.RoleChange) -> None:
    from cli import admin

    async def go() -> None:
        cfg = settings()
        remote = api(cfg)
        if remote is not None:
            from cli import remote as through
            from mlc.trust.governance import ROLE_GRANT, ROLE_REVOKE

            action = ROLE_GRANT if change is admin.grant_role else ROLE_REVOKE
            async with remote:
                signed_by = (await through.me(remote)).name
                for role in roles:
                    answer = await through.govern(remote, action, {"principal": name, "role": role})
            now = ", ".join(answer["roles"] or []) or "none"
            console.print(f"{name} now has roles: {now} (signed by {signed_by})")
            return
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
    from cli import admin
    from server.reads.governance import user_rows

    async def go() -> None:
        cfg = settings()

        async def direct(pool: asyncpg.Pool) -> list[dict[str, Any]]:
            return user_rows(await admin.state(pool, cfg))

        emit(
            await rows(cfg, "/v1/users", direct),
            as_json=as_json,
            title="People",
            columns=["name", "roles", "keys", "revoked_keys"],
        )

    run(go())


def list_deployments(
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    stage: Annotated[str | None, typer.Option(help="Only this stage.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Include retired, failed and finished ones.")] = False,
    endpoints: Annotated[
        bool, typer.Option("--endpoints", help="Only the stable endpoints and their versions' shares.")
    ] = False,
    as_json: JSON = False,
) -> None:
    """Which version of which model runs on which runtime in which stage; streaming ones
    with their topics and consumer lag (records the group has not committed yet).

    Per stable endpoint (a runtime's gateway), which versions answer it with which share
    of live traffic (``v2 90%, v1 10%``, ``v3 shadow``); each deployment shows its share
    (``traffic``) and, once moved off the endpoint, until when it stays warm (``standby``).
    """

    async def go() -> None:
        cfg = settings()
        where = {"model": model, "stage": stage}

        async def endpoint_list() -> list[dict[str, Any]]:
            async def direct(pool: asyncpg.Pool) -> list[dict[str, Any]]:
                return await reads.endpoint_rows(pool, cfg, model=model, stage=stage)

            return list(await rows(cfg, "/v1/endpoints", direct, **where))

        if endpoints:
            emit(
                await endpoint_list(),
                as_json=as_json,
                title="Stable endpoints",
                columns=reads.ENDPOINT_COLUMNS,
            )
            return
        found = list(
            await rows(
                cfg,
                "/v1/deployments",
                lambda pool: reads.deployment_rows(pool, model=model, stage=stage, all_=all_),
                **where,
                all="true" if all_ else None,
            )
        )
        tables = [] if as_json else await endpoint_list()
        if tables:
            emit(tables, as_json=False, title="Stable endpoints", columns=reads.ENDPOINT_COLUMNS)
        emit(found, as_json=as_json, title="Deployments", columns=reads.deployment_columns(found))

    run(go())


def traffic_history(
    model: Annotated[str, typer.Argument(help="The model whose stable endpoints to show.")],
    stage: Annotated[str | None, typer.Option(help="Only this stage (e.g. PROD).")] = None,
    as_json: JSON = False,
) -> None:
    """What served when: every traffic change of MODEL's stable endpoints, oldest first,
    with the versions' shares, the cause and who or what caused it (from the audit trail)."""

    async def go() -> None:
        from server.reads.history import HISTORY_COLUMNS, traffic_rows

        found = await rows(
            settings(),
            f"/v1/history/{quote(model, safe='')}",
            lambda pool: traffic_rows(pool, model, stage=stage),
            stage=stage,
        )
        where = f" in {stage}" if stage else ""
        emit(
            found,
            as_json=as_json,
            title=f"Traffic of {model}{where}",
            columns=HISTORY_COLUMNS,
        )

    run(go())
