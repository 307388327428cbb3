"""Commands that drive lifecycles (start, status, approve, reject) and manage uploaded code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import quote

import typer
from rich.markup import escape
from rich.table import Table

from cli.context import api, client, console, emit, inventory, rows, run, settings, signer
from mlc.contracts.lifecycle import SignedDecision
from mlc.domain import Decision, LifecycleDefinition, LifecycleSpec, ModelRef

if TYPE_CHECKING:
    from mlc.config import Settings
    from mlc.contracts.lifecycle import LifecycleStatus
    from mlc.domain import ApprovalRecord
    from mlc.statements import Envelope

# Temporal, the payload models and the upload checks load inside the commands that use
# them: `mlc status` without a run reads only the inventory (see register_commands).

lifecycle_app = typer.Typer(help="Start lifecycles (and manage custom lifecycle code).", no_args_is_help=True)

REF = Annotated[str, typer.Argument(help="MODEL@VERSION, e.g. cc-fraud@1.")]
JSON = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
STAGE = Annotated[str, typer.Option(help="The gate's stage (guards against deciding at the wrong one).")]
COMMENT = Annotated[str, typer.Option(help="Why; kept in the audit trail.")]


def _evidence_option(value: str | None) -> str | None:
    """``--evidence`` must be ``sha256:`` and 64 hex digits, as the web page prints it."""
    if value is None:
        return None
    digits = value.lower().removeprefix("sha256:")
    if (
        not value.lower().startswith("sha256:")
        or len(digits) != 64
        or any(c not in "0123456789abcdef" for c in digits)
    ):
        raise typer.BadParameter(
            f"expected sha256: and 64 hex digits (as the run's web page shows it), not {value!r}"
        )
    return value.lower()


EVIDENCE = Annotated[
    str | None,
    typer.Option(
        help="sha256:... of the evidence you looked at (the run's web page shows it): refuse to "
        "sign if the run now shows other evidence.",
        callback=_evidence_option,
        metavar="sha256:HEX",
    ),
]
PRINT = Annotated[
    bool,
    typer.Option(
        "--print-statement",
        help="Print the signed statement as the `decide` signal's JSON input instead of sending it.",
    ),
]


def register(app: typer.Typer) -> None:
    """Attach these commands to the root app."""
    app.add_typer(lifecycle_app, name="lifecycle")
    app.command("status")(status)
    app.command("approve")(approve)
    app.command("reject")(reject)
    app.command("rollback")(rollback)


@lifecycle_app.command("start")
def start(
    ref: REF,
    lifecycle: Annotated[
        str | None, typer.Option(help="Lifecycle (workflow type) to run [default: ModelLifecycle].")
    ] = None,
    spec: Annotated[Path | None, typer.Option(help="JSON file overriding the stages.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the started run's ids as JSON.")] = False,
) -> None:
    """Start a lifecycle for a registered snapshot."""
    from mlc import names

    workflow_type = lifecycle or names.STANDARD_LIFECYCLE
    model_ref = ModelRef.parse(ref)
    override = LifecycleSpec.model_validate_json(spec.read_text()) if spec else None

    async def go() -> None:
        cfg = settings()
        remote = api(cfg)
        if remote is not None:  # the server starts it as the principal this key belongs to
            body = {"model": model_ref.model, "version": model_ref.version, "lifecycle": workflow_type}
            async with remote:
                answer = await remote.post(
                    "/v1/runs", {**body, "spec": override.model_dump(mode="json") if override else None}
                )
            started = {k: answer[k] for k in ("workflow_id", "run_id", "model", "version", "lifecycle")}
            return report({**started, "task_queue": answer["task_queue"]})
        async with inventory(cfg) as pool:
            # A run for a snapshot that does not exist could only fail: refuse it here
            # (NotFoundError names the versions there are and `mlc model register DIR`).
            from mlc.store import snapshots

            await snapshots.read_snapshot(pool, model_ref.model, model_ref.version)
            # Temporal records the client identity as the run's starter, which segregation
            # of duties keeps from approving it.
            starter = (await signer(cfg, pool)).name
        from mlc.lifecycle_client import start_lifecycle

        handle = await start_lifecycle(
            await client(cfg, identity=starter),
            model_ref,
            task_queue=cfg.task_queue,
            lifecycle=workflow_type,
            spec=override,
        )
        report(
            {
                "workflow_id": handle.id,
                "run_id": handle.result_run_id,
                "model": model_ref.model,
                "version": model_ref.version,
                "lifecycle": workflow_type,
                "task_queue": names.lifecycle_task_queue(workflow_type, cfg.task_queue),
            }
        )

    def report(started: dict[str, object]) -> None:
        if as_json:
            print(json.dumps(started, indent=2))
            return
        console.print(
            f"started {workflow_type} for {model_ref} on task queue {started['task_queue']}: "
            f"workflow {started['workflow_id']}; follow it with `mlc status {model_ref}`"
        )

    run(go())


@lifecycle_app.command("upload")
def upload(
    file: Annotated[Path, typer.Argument(help="The lifecycle's Python file (defines `async def run(mlc)`).")],
    name: Annotated[
        str | None, typer.Option(help="Workflow type to start it by (default: file stem in CamelCase).")
    ] = None,
) -> None:
    """Validate, dry-run, sign and store lifecycle code as a new version; running workers serve it at once."""
    from mlc import names

    async def go() -> None:
        cfg = settings()
        remote = api(cfg)
        if remote is not None:
            from cli import remote as through

            async with remote:
                stored, created = await through.upload_lifecycle(remote, file, name)
        else:
            async with inventory(cfg) as pool:
                from cli.lifecycle_uploads import upload_lifecycle

                stored, created = await upload_lifecycle(
                    pool, file, signer=await signer(cfg, pool), settings=cfg, name=name
                )
        if not created:
            console.print(
                f"{stored.name} version {stored.version} already has this source; nothing new was stored"
            )
            return
        console.print(
            f"uploaded {stored.name} version {stored.version} (sha256 {stored.sha256[:12]}); start it from "
            f"the Web UI with Workflow Type {stored.name}, Task Queue "
            f"{names.lifecycles_task_queue(cfg.task_queue)} and Input "
            f'{{"model": "cc-fraud", "version": 1}}, or `mlc lifecycle start MODEL@VERSION '
            f"--lifecycle {stored.name}`"
        )

    run(go())


@lifecycle_app.command("list")
def list_lifecycles(as_json: JSON = False) -> None:
    """Every uploaded version, by name (built-in lifecycles are not listed)."""

    from mlc.store import lifecycle_definitions

    async def go() -> None:
        listed = await rows(settings(), "/v1/lifecycles", lifecycle_definitions.read_lifecycle_definitions)
        found = [LifecycleDefinition.model_validate(d) for d in listed]
        emit(
            [_summary(d) for d in found] if not as_json else found,
            as_json=as_json,
            title="Uploaded lifecycles",
            columns=["name", "version", "sha256", "uploaded_by", "uploaded_at"],
        )

    run(go())


@lifecycle_app.command("show")
def show(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION (default: the newest version).")],
    as_json: JSON = False,
) -> None:
    """Show one version of an uploaded lifecycle, with its source."""
    name, _, version = ref.partition("@")
    if version and not version.isdigit():
        raise ValueError(f"{ref!r} is not NAME or NAME@VERSION (for example FourEyes@2)")

    from mlc.store import lifecycle_definitions

    async def go() -> None:
        cfg = settings()
        remote = api(cfg)
        if remote is not None:
            async with remote:
                answer = await remote.get(f"/v1/lifecycles/{quote(name, safe='')}", version=version or None)
            found = LifecycleDefinition.model_validate(answer)
        else:
            async with inventory(cfg) as pool:
                found = await lifecycle_definitions.read_lifecycle_definition(
                    pool, name, int(version) if version else None
                )
        if as_json:
            print(found.model_dump_json(indent=2))
            return
        console.print(
            f"[bold]{found.name}@{found.version}[/bold] sha256 {found.sha256}, uploaded by "
            f"{found.uploaded_by} at {found.uploaded_at:%Y-%m-%d %H:%M:%S}"
        )
        from rich.syntax import Syntax

        console.print(Syntax(found.source, "python", line_numbers=True))

    run(go())


def _summary(definition: LifecycleDefinition) -> dict[str, object]:
    """A definition without its source, for the table."""
    return {**definition.model_dump(mode="json", exclude={"source"}), "sha256": definition.sha256[:12]}


def status(
    ref: Annotated[str | None, typer.Argument(help="MODEL@VERSION; all runs if omitted.")] = None,
    as_json: JSON = False,
) -> None:
    """Show lifecycle runs, or one run's stage, state, tests, gate and decisions."""

    async def go() -> None:
        cfg = settings()
        if ref is None:
            from server.reads.runs import RUN_COLUMNS, run_rows

            found = await rows(cfg, "/v1/runs", run_rows)
            emit(found, as_json=as_json, title="Lifecycle runs", columns=RUN_COLUMNS)
            return
        model_ref = ModelRef.parse(ref)
        current = await _status(cfg, model_ref)
        if current is None:
            console.print(f"{model_ref}: starting")
        elif as_json:
            print(current.model_dump_json(indent=2))
        else:
            render_status(current)

    run(go())


async def _status(cfg: Settings, ref: ModelRef) -> LifecycleStatus | None:
    """``ref``'s newest run's status, from the server or from the inventory and Temporal."""
    from mlc.contracts.lifecycle import LifecycleStatus

    remote = api(cfg)
    if remote is not None:
        async with remote:
            answer = await remote.get(f"/v1/runs/{quote(ref.model, safe='')}/{ref.version}/status")
        return None if answer["status"] is None else LifecycleStatus.model_validate(answer["status"])
    from server.reads.runs import run_status

    async with inventory(cfg) as pool:
        return await run_status(pool, await client(cfg), ref)


def render_status(current: LifecycleStatus) -> None:
    """Print one run's status as people read it."""
    console.print(
        f"[bold]{current.model}@{current.version}[/bold] ({current.lifecycle}): "
        f"{current.state.value}" + (f" in {current.stage}" if current.stage else "")
    )
    if current.reason:
        console.print(f"  reason: {current.reason}", markup=False, highlight=False)
    if current.pending_gate:
        gate = current.pending_gate
        console.print(
            f"  waiting for approval at {gate.stage} by {', '.join(gate.approvers) or 'nobody'}"
            f" until {gate.deadline:%Y-%m-%d %H:%M} UTC ({len(gate.approved_by)} of {gate.needed} approvals"
            + (f": {', '.join(gate.approved_by)})" if gate.approved_by else ")")
        )
    table = Table(title="Tests")
    for column in ("stage", "test", "deployment", "passed", "summary"):
        table.add_column(column)
    for report in current.reports:
        for r in report.results:
            cells = (report.stage, r.test.value, r.deployment_id, "yes" if r.passed else "NO", r.summary)
            table.add_row(*(escape(cell) for cell in cells))
    if current.reports:
        console.print(table)
    for d in current.decisions:
        console.print(
            f"  {d.stage}: {d.decision.value} by {d.approver} at {d.decided_at:%Y-%m-%d %H:%M:%S}"
            + (f" ({d.comment})" if d.comment else ""),
            markup=False,
        )
    from mlc.contracts.lifecycle import EVIDENCE_NOTE

    for note in current.refused:
        what = "evidence" if note.startswith(EVIDENCE_NOTE) else "signal"
        console.print(f"  [yellow]refused {what}:[/yellow] {escape(note.removeprefix(EVIDENCE_NOTE))}")


def _decide(
    ref: str, stage: str, comment: str, *, decision: Decision, print_statement: bool, evidence: str | None
) -> None:
    from mlc.contracts.lifecycle import SignalDecision
    from mlc.lifecycle_client import send_decision, sign_decision

    model_ref = ModelRef.parse(ref)

    async def go() -> None:
        cfg = settings()
        remote = api(cfg)
        if remote is not None:  # signed here on what the server shows; verified by the run
            from cli import remote as through

            async with remote:
                envelope = await through.sign_decision(
                    remote, model_ref, stage=stage, decision=decision, comment=comment, evidence=evidence
                )
                if print_statement:
                    return show(envelope)
                record = await through.send_decision(remote, model_ref, envelope)
            return done(record)
        async with inventory(cfg) as pool:
            me = await signer(cfg, pool)
            handle, envelope = await sign_decision(
                await client(cfg),
                pool,
                me,
                model_ref,
                stage=stage,
                decision=decision,
                comment=comment,
                evidence=evidence,
            )
        if print_statement:
            return show(envelope)
        done(
            await send_decision(
                handle, model_ref, SignedDecision(envelope=envelope), approve=decision is Decision.APPROVED
            )
        )

    def show(envelope: Envelope) -> None:
        print(json.dumps(SignalDecision(envelope=envelope).model_dump(mode="json", by_alias=True)))

    def done(record: ApprovalRecord) -> None:
        console.print(f"{model_ref}: {stage} {record.decision.value} by {record.approver} (signed, verified)")

    run(go())


def approve(
    ref: REF, stage: STAGE, comment: COMMENT = "", evidence: EVIDENCE = None, print_statement: PRINT = False
) -> None:
    """Sign and send an approval for the gate a lifecycle is waiting at."""
    _decide(
        ref, stage, comment, decision=Decision.APPROVED, print_statement=print_statement, evidence=evidence
    )


def reject(
    ref: REF, stage: STAGE, comment: COMMENT = "", evidence: EVIDENCE = None, print_statement: PRINT = False
) -> None:
    """Sign and send a rejection: the lifecycle undeploys that stage and ends as failed."""
    _decide(
        ref, stage, comment, decision=Decision.REJECTED, print_statement=print_statement, evidence=evidence
    )


def rollback(
    model: Annotated[str, typer.Argument(help="The model to roll back, e.g. cc-fraud.")],
    stage: Annotated[str, typer.Option(help="The stage whose stable endpoints to roll back, e.g. PROD.")],
    reason: Annotated[str, typer.Option(help="Why (required); kept in the audit trail with your name.")],
    to: Annotated[
        int | None,
        typer.Option("--to", min=1, help="The version to put back (default: the one before the current)."),
    ] = None,
    as_json: JSON = False,
) -> None:
    """Put the previous (or --to) version back behind STAGE's stable endpoints: a signed decision.

    Within seconds when that version is still warm; redeployed from its snapshot (and
    smoke-tested) where it was retired.
    """
    import time

    from cli.rollbacks import roll_back, sign_rollback

    if not reason.strip():
        raise ValueError("a rollback needs a reason: pass --reason TEXT (it is kept in the audit trail)")

    async def go() -> None:
        cfg = settings()
        began = time.monotonic()
        remote = api(cfg)
        if remote is not None:  # signed here; started as this key's principal by the server
            from cli import remote as through

            async with remote:
                done = await through.roll_back(remote, model=model, stage=stage, reason=reason, version=to)
        else:
            async with inventory(cfg) as pool:
                me = await signer(cfg, pool)
                envelope = await sign_rollback(pool, me, model=model, stage=stage, reason=reason, version=to)
            done = await roll_back(await client(cfg, identity=me.name), envelope, task_queue=cfg.task_queue)
        took = time.monotonic() - began
        if as_json:
            print(json.dumps({**done.model_dump(mode="json"), "wall_seconds": round(took, 3)}, indent=2))
            return
        was = f" (was v{done.replaced})" if done.replaced else ""
        console.print(
            f"{done.model} in {done.stage}: v{done.version} answers again{was}, rolled back by "
            f"{done.signer} in {took:.1f} s: {done.reason}"
        )
        for r in done.runtimes:
            how = "warm" if r.warm else "redeployed from its snapshot"
            console.print(
                f"  {r.runtime}: {r.endpoint} -> {done.model}@{r.version} ({how}, {r.deployment_id})"
            )

    run(go())
