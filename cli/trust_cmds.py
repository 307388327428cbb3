"""Commands for identities and trust: keys, the trust root, stage policies, the audit trail."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import typer

from cli import admin
from cli.context import api, console, emit, inventory, rows, run, settings, signer
from mlc.domain import ModelRef
from mlc.errors import RefusedError
from mlc.store import trail
from mlc.trust import audit as verification
from mlc.trust.keys import create_key, default_key_path, key_id, load_private_key, public_text
from mlc.trust.policy import StagePolicy

if TYPE_CHECKING:
    import asyncpg

    from mlc.config import Settings

JSON = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]

key_app = typer.Typer(help="Your signing key, and registering others' public keys.", no_args_is_help=True)
admin_app = typer.Typer(help="The installation's trust root.", no_args_is_help=True)
policy_app = typer.Typer(
    help="Stage policies the platform enforces (signed by an admin).", no_args_is_help=True
)
audit_app = typer.Typer(help="The hash-chained, signed audit trail.", no_args_is_help=True)
db_app = typer.Typer(
    help="The inventory database (run with the owner's MLC_DATABASE_URL).", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Attach these commands to the root app."""
    app.add_typer(key_app, name="key")
    app.add_typer(admin_app, name="admin")
    app.add_typer(policy_app, name="policy")
    app.add_typer(audit_app, name="audit")
    app.add_typer(db_app, name="db")


@db_app.command("migrate")
def db_migrate(
    worker_password_env: Annotated[
        str | None,
        typer.Option(help="Environment variable holding a password to give the workers' role mlc_worker."),
    ] = None,
) -> None:
    """Apply the schema migrations (as the owner); optionally enable the workers' login role."""
    import os

    from mlc.store.db import WORKER_ROLE

    async def go() -> None:
        cfg = settings()
        _host_only(cfg.api_url, "db migrate", "migrations need the owner's MLC_DATABASE_URL")
        async with inventory(cfg) as pool:  # opening the inventory as its owner migrates it
            if worker_password_env:
                password = os.environ.get(worker_password_env, "")
                if len(password) < 12:
                    raise ValueError(f"{worker_password_env} must hold a password of at least 12 characters")
                await pool.execute(f"ALTER ROLE {WORKER_ROLE} LOGIN PASSWORD {_literal(password)}")
        console.print(
            "the inventory schema is up to date"
            + (f"; {WORKER_ROLE} may log in" if worker_password_env else "")
        )

    run(go())


def _host_only(api_url: str | None, command: str, why: str) -> None:
    """Refuse ``command`` under ``MLC_API_URL``: it runs on the server's host only."""
    if api_url:
        raise RefusedError(
            f"`mlc {command}` runs only on the server's host with the owner's MLC_DATABASE_URL, never "
            f"through the API ({why}); MLC_API_URL is set ({api_url})"
        )


def _literal(text: str) -> str:
    """A SQL string literal (ALTER ROLE takes no bind parameters)."""
    return "'" + text.replace("'", "''") + "'"


# --- keys ---------------------------------------------------------------------------------


@key_app.command("create")
def key_create(
    path: Annotated[
        Path | None, typer.Option(help="Where to write it (default $MLC_SIGNING_KEY or config dir).")
    ] = None,
) -> None:
    """Create your Ed25519 signing key (mode 0600) and print its public key to register."""
    where = path or default_key_path()
    key = create_key(where)
    console.print(
        f"wrote {where}\n{public_text(key.public_key())}\nkey id {key_id(key.public_key())}", highlight=False
    )


@key_app.command("show")
def key_show(as_json: JSON = False) -> None:
    """Print your public key (send it to an admin) and its key id."""
    key = load_private_key()
    public = key.public_key()
    if as_json:
        print(
            json.dumps(
                {"public_key": public_text(public), "key_id": key_id(public), "path": str(default_key_path())}
            )
        )
        return
    console.print(f"{public_text(public)}\nkey id {key_id(public)}", highlight=False)


@key_app.command("add")
def key_add(
    name: Annotated[str, typer.Argument(help="The person or automation the key belongs to.")],
    public_key: Annotated[
        str, typer.Argument(help="An `ssh-ed25519 AAAA...` line, a PEM, or a file holding one.")
    ],
) -> None:
    """Register a public key for NAME (signed by you; admins only). Accepts OpenSSH keys."""

    async def go() -> None:
        cfg = settings()
        text = admin.read_public_key(public_key)
        remote = api(cfg)
        if remote is not None:
            from cli.remote import govern
            from mlc.trust.governance import KEY_ADD

            args, kid = admin.key_args(name, text)
            async with remote:
                await govern(remote, KEY_ADD, args)
        else:
            async with inventory(cfg) as pool:
                kid = await admin.add_key(pool, cfg, await signer(cfg, pool), name, text)
        console.print(f"registered key {kid} for {name}")

    run(go())


@key_app.command("revoke")
def key_revoke(name: str, kid: Annotated[str, typer.Argument(metavar="KEY_ID")]) -> None:
    """Revoke one of NAME's keys (admins, or the key's owner): its signatures stop counting at once."""

    async def go() -> None:
        from cli.remote import statement
        from mlc.trust.governance import KEY_REVOKE

        await statement(settings(), KEY_REVOKE, {"principal": name, "keyid": kid})
        console.print(f"revoked key {kid} of {name}")

    run(go())


# --- trust root ---------------------------------------------------------------------------


@admin_app.command("init")
def admin_init(name: Annotated[str, typer.Argument(help="Your principal name, e.g. alice.")]) -> None:
    """Once per installation: make NAME (with your key) the first admin and pin it as the trust root."""

    async def go() -> None:
        cfg = settings()
        _host_only(cfg.api_url, "admin init", "over HTTP the first caller would own the installation")
        async with inventory(cfg) as pool:
            kid = await admin.init_admin(pool, cfg, name, load_private_key())
        console.print(
            f"{name} is the first admin; trust root {kid}.\nSet MLC_TRUST_ROOT={kid} on every worker "
            f"(this home's workers read it from {cfg.home / 'trust-root'})."
        )

    run(go())


# --- policies -----------------------------------------------------------------------------


@policy_app.command("set")
def policy_set(
    stage: str,
    protected: Annotated[
        bool, typer.Option(help="Deploys need verified approvals at --admitted-by.")
    ] = False,
    admitted_by: Annotated[
        str | None, typer.Option(help="The gate whose approvals admit into STAGE.")
    ] = None,
    approver: Annotated[
        list[str] | None, typer.Option("--approver", help="Who may approve STAGE's gate: NAME or role:ROLE.")
    ] = None,
    min_approvals: Annotated[int, typer.Option(help="Distinct approvers needed at STAGE's gate.")] = 1,
    allow_registrant: Annotated[bool, typer.Option(help="Let the snapshot's registrant approve.")] = False,
    allow_starter: Annotated[bool, typer.Option(help="Let the lifecycle's starter approve.")] = False,
    allow_uploader: Annotated[bool, typer.Option(help="Let the lifecycle code's uploader approve.")] = False,
) -> None:
    """Sign a stage's policy (admins only). A run's spec can narrow it, never loosen it."""
    policy = StagePolicy(
        stage=stage,
        protected=protected,
        admitted_by=admitted_by,
        approvers=tuple(approver or ["role:approver"]),
        min_approvals=min_approvals,
        forbid_registrant=not allow_registrant,
        forbid_starter=not allow_starter,
        forbid_uploader=not allow_uploader,
    )

    async def go() -> None:
        from cli.remote import statement
        from mlc.trust.governance import POLICY_SET

        await statement(settings(), POLICY_SET, {"policy": policy.model_dump(mode="json")})
        console.print(f"policy for {stage}: {policy.model_dump_json()}")

    run(go())


@policy_app.command("list")
def policy_list(as_json: JSON = False) -> None:
    """The policies in force (signed ones, else the defaults) for every stage that has one."""

    from server.reads.governance import policies

    async def go() -> None:
        cfg = settings()

        async def direct(pool: asyncpg.Pool) -> list[StagePolicy]:
            return policies(await admin.state(pool, cfg))

        emit(
            await rows(cfg, "/v1/policies", direct),
            as_json=as_json,
            title="Stage policies",
            columns=[
                "stage",
                "protected",
                "admitted_by",
                "approvers",
                "min_approvals",
                "forbid_registrant",
                "forbid_starter",
                "forbid_uploader",
            ],
        )

    run(go())


# --- audit --------------------------------------------------------------------------------


@audit_app.command("show")
def audit_show(
    ref: Annotated[str, typer.Argument(help="MODEL@VERSION, e.g. cc-fraud@1.")], as_json: JSON = False
) -> None:
    """A snapshot's test results and gate decisions, from the trail."""
    model_ref = ModelRef.parse(ref)

    async def go() -> None:
        tests, decisions = await _snapshot_audit(settings(), model_ref)
        if as_json:
            print(json.dumps({"tests": tests, "decisions": decisions}, indent=2, default=str))
            return
        emit(
            tests,
            as_json=False,
            title=f"Tests of {model_ref}",
            columns=["seq", "stage", "test", "passed", "summary", "deployment_id"],
        )
        emit(
            decisions,
            as_json=False,
            title=f"Decisions on {model_ref}",
            columns=["seq", "decided_at", "stage", "decision", "approver", "comment", "key_id"],
        )

    run(go())


async def _snapshot_audit(cfg: Settings, ref: ModelRef) -> tuple[list[Any], list[Any]]:
    """``ref``'s test results and decisions: every page from the server, or from the trail."""
    from server.reads.audit import snapshot_audit

    remote = api(cfg)
    if remote is None:
        async with inventory(cfg) as pool:
            found = await snapshot_audit(pool, ref.model, ref.version)
        return found.tests, found.decisions
    tests: list[Any] = []
    decisions: list[Any] = []
    after = None
    async with remote:
        while True:
            page = await remote.get(
                f"/v1/audit/{quote(ref.model, safe='')}/{ref.version}", after=after, limit=500
            )
            tests += page["tests"]
            decisions += page["decisions"]
            if not (after := page.get("next")):
                return tests, decisions


@audit_app.command("verify")
def audit_verify(
    bundle: Annotated[
        Path | None, typer.Option(help="Verify an exported bundle instead of the database.")
    ] = None,
    trust_root: Annotated[
        str | None, typer.Option(help="The key id you trust (default: MLC_TRUST_ROOT).")
    ] = None,
    anchor: Annotated[
        str | None, typer.Option(help="SEQ:HASH from an earlier export's head that must still be there.")
    ] = None,
    as_json: JSON = False,
) -> None:
    """Recompute the hash chain and check every signature; exit 4 at the first broken link."""
    seq, _, head = (anchor or "").partition(":")
    if anchor and not (seq.isdigit() and head):
        raise ValueError(f"--anchor must be SEQ:HASH (an export's head), not {anchor!r}")

    async def go() -> verification.Verification:
        cfg = settings()
        root = trust_root or cfg.trust_root
        if root is None:
            raise RefusedError("give the trust root to verify against: --trust-root KEY_ID or MLC_TRUST_ROOT")
        if bundle is not None:
            data = json.loads(bundle.read_text())
            entries = verification.entries_of(data)
            author = str(data.get("author_role") or cfg.author_role)
        elif (remote := api(cfg)) is not None:  # the server's export, checked here, not by it
            async with remote:
                text = b"".join([chunk async for chunk in remote.stream("/v1/audit/export", format="json")])
            entries = verification.entries_of(json.loads(text))
            author = cfg.author_role
        else:
            async with inventory(cfg) as pool:
                entries = await trail.read_entries(pool)
            author = cfg.author_role
        return verification.verify_entries(
            entries, trust_root=root, author_role=author, anchor=(int(seq), head) if anchor else None
        )

    result = run(go())
    if as_json:
        print(json.dumps(result.summary()))
    elif result.ok:
        console.print(
            f"audit trail verified: {result.entries} entries ({result.signed} signed by people, "
            f"{result.evidence} runtime results signed by their runtimes), head {result.head}"
        )
    else:
        console.print(
            f"[red]audit trail broken after {result.entries} good entries:[/red] {result.problems[0]}"
        )
    if not result.ok:
        raise typer.Exit(RefusedError.exit_code)


@audit_app.command("export")
def audit_export(
    fmt: Annotated[str, typer.Option("--format", help="json (a verifiable bundle) or csv.")] = "json",
    output: Annotated[Path | None, typer.Option(help="Write here instead of standard output.")] = None,
) -> None:
    """Export the whole trail with the public keys an auditor needs to verify it offline."""
    if fmt not in ("json", "csv"):
        raise ValueError(f"--format must be json or csv, not {fmt!r}")

    async def go() -> None:
        cfg = settings()
        out = sys.stdout.buffer if output is None else output.open("wb")
        try:
            remote = api(cfg)
            if remote is not None:
                async with remote:
                    async for chunk in remote.stream("/v1/audit/export", format=fmt):
                        out.write(chunk)
                return
            from server.reads import audit as reads

            async with inventory(cfg) as pool:
                chunks = (
                    reads.export_csv(pool)
                    if fmt == "csv"
                    else reads.export_json(pool, trust_root=cfg.trust_root, author_role=cfg.author_role)
                )
                async for text in chunks:
                    out.write(text.encode())
        finally:
            out.flush()
            if output is not None:
                out.close()

    run(go())
    if output is not None:
        console.print(f"wrote {output}")
