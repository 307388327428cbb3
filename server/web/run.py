"""A run's page (``/runs/{model}/{version}``): its stages, the test evidence with numbers,
the decisions with signer and verification, the gate it waits at with the exact
``mlc approve ... --evidence sha256:...`` command, and its link into the Temporal Web UI.

The page never decides (design §4): it shows the command, and the person runs it with
their own key. htmx re-fetches the status fragment every few seconds while the run lives.
"""

from __future__ import annotations

from datetime import datetime
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response
from temporalio.client import WorkflowQueryFailedError, WorkflowQueryRejectedError
from temporalio.service import RPCError

from activities.admission import RunContext, approver_problem, check_decision
from activities.inventory import load_run
from mlc.contracts.lifecycle import LifecycleStatus, evidence_digest
from mlc.domain import LifecycleState, ModelRef
from mlc.errors import NotFoundError, RefusedError
from mlc.lifecycle_client import EVIDENCE_PREFIX, recorded_status
from mlc.store import runs, trail
from mlc.trust.governance import Governance
from server.context import ServerContext
from server.principal import Principal
from server.web.common import View, command, may_decide, page, render

DECISIONS_SHOWN = 200
"""A run has a handful of decisions; a page lists at most this many."""
POLL_SECONDS = 2
"""How often the open page re-reads a live run's status."""


class Stage(View):
    """A stage of the run and where the run is relative to it."""

    name: str
    progress: str
    """``done``, ``current`` or ``ahead``."""


class TestRow(View):
    """One test of one deployment, as its runtime signed it and the inventory recorded it."""

    test: str
    deployment_id: str
    passed: bool
    summary: str
    metrics: tuple[tuple[str, float], ...]


class Report(View):
    """A stage's newest recorded test report and the digest a decision signs."""

    stage: str
    passed: bool
    evidence: str
    """``sha256:HEX`` of the report, as ``--evidence`` takes it."""
    results: tuple[TestRow, ...]


class DecisionRow(View):
    """A decision from the trail, re-verified now against the current keys and policy."""

    seq: int
    stage: str
    decision: str
    signer: str
    decided_at: str
    comment: str
    key_id: str | None
    verification: str
    """``verified``, ``unsigned (gate expired)`` or ``NOT verified: WHY``."""


class Gate(View):
    """The gate the run waits at, and what the person looking may do there."""

    stage: str
    approvers: tuple[str, ...]
    needed: int
    approved_by: tuple[str, ...]
    deadline: datetime
    evidence: str
    approve: str | None
    reject: str | None
    why_not: str | None
    """Why no command is shown (read-only, not an approver, segregation of duties)."""


class RunView(View):
    """Everything the run page shows."""

    model: str
    version: int
    lifecycle: str
    state: str
    stage: str | None
    reason: str | None
    started_by: str | None
    workflow_id: str
    run_id: str
    web_ui: str
    stages: tuple[Stage, ...]
    reports: tuple[Report, ...]
    decisions: tuple[DecisionRow, ...]
    refused: tuple[str, ...]
    gate: Gate | None
    live: bool
    unavailable: str | None
    """Why the run's own status could not be read (Temporal down): the page shows the row."""


def _stages(status: LifecycleStatus) -> tuple[Stage, ...]:
    finished = status.state is LifecycleState.SUCCEEDED
    at = status.stages.index(status.stage) if status.stage in status.stages else -1
    return tuple(
        Stage(name=s, progress="done" if finished or i < at else "current" if i == at else "ahead")
        for i, s in enumerate(status.stages)
    )


def _reports(status: LifecycleStatus) -> tuple[Report, ...]:
    return tuple(
        Report(
            stage=r.stage,
            passed=r.passed,
            evidence=EVIDENCE_PREFIX + evidence_digest(status, r.stage),
            results=tuple(
                TestRow(
                    test=t.test.value,
                    deployment_id=t.deployment_id,
                    passed=t.passed,
                    summary=t.summary,
                    metrics=tuple(sorted(t.metrics.items())),
                )
                for t in r.results
            ),
        )
        for r in status.reports
    )


def _decisions(entries: list[trail.Entry], run: RunContext, state: Governance) -> tuple[DecisionRow, ...]:
    rows = []
    for entry in entries:
        body = entry.data()
        envelope = entry.signed()
        if envelope is None:
            verification = "unsigned (gate expired)"
        else:
            try:
                check_decision(envelope, run, state)
                verification = "verified"
            except (RefusedError, ValueError) as exc:
                verification = f"NOT verified: {exc}"
        rows.append(
            DecisionRow(
                seq=entry.seq,
                stage=str(body.get("stage")),
                decision=str(body.get("decision")),
                signer=str(body.get("approver")),
                decided_at=str(body.get("decided_at", ""))[:19].replace("T", " "),
                comment=str(body.get("comment") or ""),
                key_id=body.get("key_id"),
                verification=verification,
            )
        )
    return tuple(rows)


def _gate(
    status: LifecycleStatus, ref: ModelRef, principal: Principal, run: RunContext, state: Governance
) -> Gate | None:
    pending = status.pending_gate
    if pending is None:
        return None
    evidence = EVIDENCE_PREFIX + evidence_digest(status, pending.stage)
    why_not = None
    if not may_decide(principal):
        why_not = f"{principal.name} is read-only here: no decisions"
    elif principal.name in pending.approved_by:
        why_not = f"{principal.name} has approved this gate already"
    else:
        who = state.principals.get(principal.name)
        if who is None or not who.active_keys():
            why_not = f"{principal.name} has no signing key: an admin registers one with `mlc key add`"
        else:
            why_not = approver_problem(
                state.policy(pending.stage), who, run, state, gate_approvers=pending.approvers
            )
    arguments = (str(ref), "--stage", pending.stage, "--evidence", evidence)
    return Gate(
        stage=pending.stage,
        approvers=pending.approvers,
        needed=pending.needed,
        approved_by=pending.approved_by,
        deadline=pending.deadline,
        evidence=evidence,
        approve=None if why_not else command("mlc", "approve", *arguments),
        reject=None if why_not else command("mlc", "reject", *arguments),
        why_not=why_not,
    )


def web_ui_link(base: str, namespace: str, workflow_id: str, run_id: str) -> str:
    """The run's history in the Temporal Web UI."""
    return (
        f"{base.rstrip('/')}/namespaces/{quote(namespace, safe='')}/workflows/"
        f"{quote(workflow_id, safe='')}/{quote(run_id, safe='')}/history"
    )


async def build(ctx: ServerContext, ref: ModelRef, principal: Principal) -> RunView:
    """The newest run of snapshot ``ref`` as its workflow and the trail tell it.

    Raises:
        NotFoundError: the snapshot has no run.
    """
    found = await runs.read_latest_of(ctx.pool, [(ref.model, ref.version)])
    if not found:
        raise NotFoundError(f"{ref} has no lifecycle run; start one with `mlc lifecycle start {ref}`")
    row = found[0]
    workflow_id, run_id = row["workflow_id"], row["run_id"]
    run = await load_run(ctx.pool, workflow_id, run_id)
    state = await ctx.governance()
    status: LifecycleStatus | None = None
    unavailable = None
    try:
        handle = (await ctx.temporal()).get_workflow_handle(workflow_id, run_id=run_id)
        status = await recorded_status(ctx.pool, handle)
    except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError) as exc:
        unavailable = f"the run's status could not be read from Temporal ({exc})"
    entries = await trail.read_entries(
        ctx.pool, kinds=(trail.DECISION,), workflow_id=workflow_id, run_id=run_id, limit=DECISIONS_SHOWN
    )
    settings = ctx.settings
    state_now = status.state.value if status else str(row["state"])
    return RunView(
        model=ref.model,
        version=ref.version,
        lifecycle=str(row["lifecycle"]),
        state=state_now,
        stage=(status.stage if status else row["stage"]),
        reason=(status.reason if status else row["reason"]),
        started_by=row.get("started_by"),
        workflow_id=workflow_id,
        run_id=run_id,
        web_ui=web_ui_link(ctx.config.temporal_ui_url, settings.temporal_namespace, workflow_id, run_id),
        stages=_stages(status) if status else (),
        reports=_reports(status) if status else (),
        decisions=_decisions(entries, run, state),
        refused=status.refused if status else (),
        gate=_gate(status, ref, principal, run, state) if status else None,
        live=row.get("ended_at") is None,
        unavailable=unavailable,
    )


@page
async def run_page(request: Request, ctx: ServerContext, principal: Principal) -> Response:
    """``GET /runs/{model}/{version}``: the page, or its status fragment for htmx."""
    version = str(request.path_params["version"])
    if not version.isdigit() or len(version) > 9 or int(version) < 1:
        raise NotFoundError(f"{version[:20]!r} is not a version number (1, 2, ...)")
    ref = ModelRef(model=str(request.path_params["model"]), version=int(version))
    view = await build(ctx, ref, principal)
    return render(
        request, "run.html", principal, fragment="run_status.html", view=view, poll_seconds=POLL_SECONDS
    )
