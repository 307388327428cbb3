"""Custom lifecycle code: upload, validation, pick-up by running workers, version pinning.

Runs on the real Temporal dev server and PostgreSQL of the session fixtures; uploaded code
runs on the real sandboxed lifecycle worker (``mlc worker --lifecycles`` under bubblewrap),
and uploads dry run on the time-skipping test server in that same sandbox, as for users.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError

from activities.runtimes.local.layout import STATE_FILE
from cli.lifecycle_uploads import upload_lifecycle
from lifecycles.lifecycle_code import load_lifecycle
from mlc.domain import DeploymentState, LifecycleDefinition, Mode, ModelSnapshot
from mlc.errors import InvalidLifecycleError, PermissionDeniedError
from mlc.lifecycle_client import read_status
from mlc.names import BUILT_IN_LIFECYCLES, BUILT_IN_WORKFLOWS, lifecycles_task_queue, workflow_id_for
from mlc.store import audit, deployments, lifecycle_definitions, runs, runtimes
from tests.conftest import APPROVER, AUTHOR, FIXTURES, Stack, require_sandbox
from tests.lifecycle_helpers import keep_history, start_like_ui, wait_for, wait_for_gate
from workers.catalog import LIFECYCLE_WORKFLOWS, MAIN_WORKFLOWS
from workers.sandbox import SandboxedWorker
from workers.worker import build_main_worker

LIFECYCLES = FIXTURES / "lifecycles"
FOUR_EYES = Path(__file__).parent.parent / "examples" / "lifecycles" / "four_eyes.py"

BAD_UPLOADS = {
    "syntax_error.py": (7, "syntax error: expected ':'"),
    "forbidden_import.py": (5, "import of subprocess is not allowed"),
    "no_entry_point.py": (1, "no entry point: define `async def run(mlc: Lifecycle) -> None`"),
    "nondeterministic.py": (9, "non-deterministic call datetime.now()"),
    "sandbox_escape.py": (7, "access to .__class__ is not allowed"),
    "fails_dry_run.py": (15, "ValueError: stage PROD has no approval gate"),
}


def wid() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def one_line(text: str) -> str:
    """CLI output as one line (rich wraps long messages at the terminal width)."""
    return " ".join(text.split())


async def upload(stack: Stack, path: Path, *, name: str | None = None) -> tuple[LifecycleDefinition, bool]:
    """Upload ``path`` as the lifecycle author (who therefore may not approve its runs)."""
    require_sandbox()  # the dry run runs the code in the lifecycle worker's sandbox
    return await upload_lifecycle(
        stack.pool, path, signer=stack.signers[AUTHOR], settings=stack.settings, name=name
    )


async def approve(stack: Stack, ref: str, stage: str, *, user: str = APPROVER) -> None:
    result = await stack.mlc("approve", ref, "--stage", stage, user=user)
    assert result.returncode == 0, result.stderr


async def second_snapshot(stack: Stack, package: Path, tmp_path: Path) -> ModelSnapshot:
    """Version 2 of the example model: the same package with one changed byte."""
    copy = tmp_path / "cc-fraud-2"
    shutil.copytree(package, copy)
    with (copy / "score.py").open("a") as score:
        score.write("\n# version 2\n")
    return await stack.register(copy)


async def test_running_workers_pick_up_uploads_and_runs_keep_their_version(
    stack: Stack, example_package: Path, tmp_path: Path
) -> None:
    first = await stack.register(example_package)
    second = await second_snapshot(stack, example_package, tmp_path)
    await stack.add_local_runtimes(("DEV", "SIT"))
    queue = f"custom-{uuid.uuid4().hex[:8]}"
    require_sandbox()

    uploaded = await stack.mlc(
        "lifecycle", "upload", str(LIFECYCLES / "good" / "pinned_v1.py"), "--name", "Pinned", user=AUTHOR
    )
    assert uploaded.returncode == 0, uploaded.stderr
    assert "uploaded Pinned version 1" in one_line(uploaded.stdout)

    async with build_main_worker(stack.client, stack.settings, stack.pool, task_queue=queue):
        sandboxed = await stack.sandboxed_worker(task_queue=queue)
        on_v1 = await start_like_ui(
            stack.client,
            {"model": first.model, "version": first.version},
            workflow_id=wid(),
            task_queue=lifecycles_task_queue(queue),
            workflow="Pinned",
        )
        assert (await wait_for_gate(on_v1, "DEV")).lifecycle == "Pinned@1"

        v2, created = await upload(stack, LIFECYCLES / "good" / "pinned_v2.py", name="Pinned")
        assert created and v2.version == 2
        on_v2 = await start_like_ui(
            stack.client,
            {"model": second.model, "version": second.version},
            workflow_id=wid(),
            task_queue=lifecycles_task_queue(queue),
            workflow="Pinned",
        )
        status = await wait_for_gate(on_v2, "DEV")
        assert status.lifecycle == "Pinned@2", "the running worker serves the new upload at once"
        assert status.stages == ("DEV", "SIT")
        await sandboxed.stop()

    # A new lifecycle worker that caches nothing replays each run's whole history on every task.
    async with build_main_worker(stack.client, stack.settings, stack.pool, task_queue=queue):
        replacement = await stack.sandboxed_worker(
            task_queue=queue, extra_env={"MLC_MAX_CACHED_WORKFLOWS": "0"}
        )
        try:
            # One after the other: two runs of one model promoting in one stage at the same
            # time would each retire the other's deployment, and the second is refused.
            await approve(stack, f"{first.model}@{first.version}", "DEV")
            result_v1 = await on_v1.result()
            await approve(stack, f"{second.model}@{second.version}", "DEV")
            result_v2 = await on_v2.result()
        finally:
            await replacement.stop()

    assert result_v1.stages == ("DEV",)
    assert result_v2.stages == ("DEV", "SIT")
    lifecycles = {(r["version"], r["lifecycle"], r["state"]) for r in await runs.read_runs(stack.pool)}
    assert lifecycles == {(1, "Pinned@1", "succeeded"), (2, "Pinned@2", "succeeded")}
    notes = {
        r["workflow_id"]: r["message"]
        for r in await stack.pool.fetch(
            "SELECT workflow_id, message FROM notifications WHERE message LIKE 'version%'"
        )
    }
    assert notes == {on_v1.id: "version 1 behaviour: DEV only", on_v2.id: "version 2 behaviour: DEV and SIT"}
    everything = await deployments.read_deployments(stack.pool, model=first.model, live_only=False)
    assert {(d.version, d.stage) for d in everything} == {(1, "DEV"), (2, "DEV"), (2, "SIT")}


@pytest.mark.parametrize("file", sorted(BAD_UPLOADS), ids=lambda f: f.removesuffix(".py"))
async def test_bad_uploads_are_refused_with_file_line_and_reason(stack: Stack, file: str) -> None:
    path = LIFECYCLES / "bad" / file
    line, reason = BAD_UPLOADS[file]
    with pytest.raises(InvalidLifecycleError) as refused:
        await upload(stack, path)
    message = str(refused.value)
    assert f"{path}:{line}: " in message and reason in message, message
    assert await lifecycle_definitions.read_lifecycle_definitions(stack.pool) == []


async def test_cli_refuses_uploaders_without_the_role_bad_code_and_built_in_names(stack: Stack) -> None:
    stranger = await stack.mlc("lifecycle", "upload", str(FOUR_EYES), user="mallory")
    assert stranger.returncode == 4
    assert "your key" in stranger.stderr and "is not registered" in one_line(stranger.stderr)
    assert "Traceback" not in stranger.stderr

    await stack.add_principal("mallory")
    no_role = await stack.mlc("lifecycle", "upload", str(FOUR_EYES), user="mallory")
    assert no_role.returncode == 4
    assert "mallory may not upload lifecycle code: it needs role lifecycle-author" in one_line(no_role.stderr)
    assert "Traceback" not in no_role.stderr

    bad = LIFECYCLES / "bad" / "forbidden_import.py"
    refused = await stack.mlc("lifecycle", "upload", str(bad), user=AUTHOR)
    assert refused.returncode == 1
    assert f"{bad}:5: import of subprocess is not allowed" in one_line(refused.stderr)

    taken = await stack.mlc(
        "lifecycle", "upload", str(FOUR_EYES), "--name", BUILT_IN_LIFECYCLES[0], user=AUTHOR
    )
    assert taken.returncode == 1
    assert "taken by the built-in ModelLifecycle" in one_line(taken.stderr)
    for reserved in (*BUILT_IN_WORKFLOWS, "runtimereconciler"):
        with pytest.raises(InvalidLifecycleError, match="is taken by the built-in"):
            await upload_lifecycle(
                stack.pool, FOUR_EYES, signer=stack.signers[AUTHOR], settings=stack.settings, name=reserved
            )

    carol = await stack.add_principal("carol", "lifecycle-author")
    with pytest.raises(
        PermissionDeniedError, match="carol may not upload lifecycle code: it needs role mlops"
    ):
        await upload_lifecycle(
            stack.pool, FOUR_EYES, signer=carol, settings=replace(stack.settings, author_role="mlops")
        )
    assert await lifecycle_definitions.read_lifecycle_definitions(stack.pool) == []


async def test_four_eyes_example_needs_two_different_approvers(
    stack: Stack, lifecycles: SandboxedWorker, example_package: Path
) -> None:
    for _ in range(2):
        uploaded = await stack.mlc("lifecycle", "upload", str(FOUR_EYES), user=AUTHOR)
        assert uploaded.returncode == 0, uploaded.stderr
    assert "FourEyes version 1 already has this source" in one_line(uploaded.stdout)
    listed = await stack.mlc("lifecycle", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert '"name": "FourEyes"' in listed.stdout and '"version": 2' not in listed.stdout
    shown = await stack.mlc("lifecycle", "show", "FourEyes@1", "--json")
    assert shown.returncode == 0, shown.stderr
    assert f'"uploaded_by": "{AUTHOR}"' in shown.stdout and "APPROVALS_NEEDED = 2" in shown.stdout

    await stack.add_principal("bob", "approver")
    snap = await stack.register(example_package)
    await stack.add_local_runtimes(("DEV", "UAT", "PROD"))
    ref = f"{snap.model}@{snap.version}"
    handle = await start_like_ui(
        stack.client,
        {"model": snap.model, "version": snap.version},
        workflow_id=wid(),
        task_queue=stack.lifecycles_queue,
        workflow="FourEyes",
    )
    await wait_for_gate(handle, "UAT")
    await approve(stack, ref, "UAT")
    await wait_for(handle, lambda s: s.pending_gate is not None and len(s.decisions) == 1, what="second gate")
    await approve(stack, ref, "UAT")  # the same person again: recorded, but does not count
    status = await wait_for(
        handle, lambda s: s.pending_gate is not None and len(s.decisions) == 2, what="third gate"
    )
    assert status.stage == "UAT" and not any(d.stage == "PROD" for d in status.deployments)
    await approve(stack, ref, "UAT", user="bob")
    result = await handle.result()
    await keep_history(handle, "FourEyes", "two_approvers")

    assert result.stages == ("DEV", "UAT", "PROD")
    decisions = await audit.read_decisions(stack.pool, snap.model, snap.version)
    assert [(d["stage"], d["approver"]) for d in decisions] == [
        ("UAT", "alice"),
        ("UAT", "alice"),
        ("UAT", "bob"),
    ]
    live = await deployments.read_deployments(stack.pool, model=snap.model)
    assert {(d.stage, d.state) for d in live} == {
        (s, DeploymentState.SERVING) for s in ("DEV", "UAT", "PROD")
    }
    note = await stack.pool.fetchval(
        "SELECT message FROM notifications WHERE workflow_id = $1 AND message LIKE '%different approver%'",
        handle.id,
    )
    assert note == f"{ref}: alice already approved UAT; a second, different approver is needed"


async def test_unknown_workflow_type_fails_at_once_naming_the_uploaded_ones(
    stack: Stack, lifecycles: SandboxedWorker
) -> None:
    await upload(stack, FOUR_EYES)
    handle = await start_like_ui(
        stack.client,
        {"model": "cc-fraud", "version": 1},
        workflow_id=wid(),
        task_queue=stack.lifecycles_queue,
        workflow="FourEye",
    )
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    message = str(failure.value.cause)
    assert (
        "no lifecycle named FourEye; uploaded: FourEyes; built-in: ModelLifecycle, BatchPromotion" in message
    )


async def test_cli_start_input_reaches_the_uploaded_lifecycle(
    stack: Stack, lifecycles: SandboxedWorker, example_package: Path
) -> None:
    await upload(stack, FOUR_EYES)
    snap = await stack.register(example_package)  # the CLI refuses snapshots that do not exist
    started = await stack.mlc("lifecycle", "start", f"{snap.model}@{snap.version}", "--lifecycle", "FourEyes")
    assert started.returncode == 0, started.stderr
    assert f"on task queue {stack.lifecycles_queue}" in one_line(started.stdout), "routed to the sandbox"
    handle = stack.client.get_workflow_handle(workflow_id_for(snap.model, snap.version))
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    assert "no runtime serves service tag cc-fraud in stage DEV" in str(failure.value.cause), "input decoded"
    status = await read_status(handle)
    assert status is not None
    assert (status.model, status.version, status.lifecycle, status.stages) == (
        snap.model,
        snap.version,
        "FourEyes@1",
        ("DEV", "UAT", "PROD"),
    ), "the uploaded lifecycle ran on the CLI's input"


def test_the_guide_shows_the_example_verbatim() -> None:
    guide = (Path(__file__).parent.parent / "docs" / "custom-lifecycles.md").read_text()
    assert f"```python\n{FOUR_EYES.read_text()}```" in guide


async def test_batch_promotion_runs_batch_jobs_only(stack: Stack, example_package: Path) -> None:
    snap = await stack.register(example_package)
    await stack.add_local_runtimes()
    handle = await start_like_ui(
        stack.client,
        {"model": snap.model, "version": snap.version},
        workflow_id=wid(),
        task_queue=stack.task_queue,
        workflow="BatchPromotion",
    )
    status = await wait_for_gate(handle, "UAT")
    assert [r.stage for r in status.reports] == ["DEV", "SIT", "UAT"]
    assert all(r.passed and {t.test.value for t in r.results} == {"smoke", "metrics"} for r in status.reports)
    await approve(stack, f"{snap.model}@{snap.version}", "UAT")
    result = await handle.result()
    await keep_history(handle, "BatchPromotion", "happy_path")

    assert result.stages == ("DEV", "SIT", "UAT", "PROD")
    assert [(d.stage, d.mode, d.state) for d in result.deployments] == [
        ("PROD", Mode.BATCH, DeploymentState.COMPLETED)
    ]
    assert result.deployments[0].details["records"] > 0
    everything = await deployments.read_deployments(stack.pool, model=snap.model, live_only=False)
    assert {(d.stage, d.mode, d.state) for d in everything} == {
        (s, Mode.BATCH, DeploymentState.COMPLETED) for s in ("DEV", "SIT", "UAT", "PROD")
    }
    assert await deployments.read_deployments(stack.pool, model=snap.model) == []
    leftovers = [
        state
        for runtime in await runtimes.read_runtimes(stack.pool)
        for state in (stack.settings.runtime_dir / runtime.name).glob(f"*/{STATE_FILE}")
    ]
    assert leftovers == [], "a batch job leaves no server process behind"


def test_built_in_names_match_the_registered_workflows() -> None:
    main = {getattr(w, "__temporal_workflow_definition").name for w in MAIN_WORKFLOWS}
    sandboxed = {getattr(w, "__temporal_workflow_definition").name for w in LIFECYCLE_WORKFLOWS}
    assert set(BUILT_IN_LIFECYCLES) <= main and None not in main, "the main worker runs no uploaded code"
    assert set(BUILT_IN_WORKFLOWS) == main, "every type the main worker serves is reserved for uploads"
    assert sandboxed == {None}, "the lifecycle worker runs only the dynamic workflow of uploaded lifecycles"


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("import os", "<lifecycle T@1>:1: import of os is not allowed"),
        ("found = ().__class__", "<lifecycle T@1>:1: access to .__class__ is not allowed"),
        ("handle = open", "<lifecycle T@1>:1: open is not allowed"),
    ],
    ids=["import", "dunder", "builtin"],
)
def test_the_worker_re_checks_stored_source_before_running_it(source: str, error: str) -> None:
    """Source that reached the store without passing validation is refused on the worker."""
    with pytest.raises(InvalidLifecycleError) as refused:
        load_lifecycle(f"{source}\n\nasync def run(mlc):\n    pass\n", filename="<lifecycle T@1>")
    assert str(refused.value).startswith(error), refused.value


RUN_TIME_ESCAPES = {
    "import": ("import os", "1: ImportError: lifecycle code may not import os"),
    "module-from-import": (
        "from dataclasses import builtins",
        "1: ImportError: lifecycle code may not import",
    ),
    "module-attribute": (
        "import typing\nfound = typing.sys",
        "2: AttributeError: module 'typing' has no attribute 'sys'",
    ),
    "computed-dunder": ("name = '__sub' + 'classes__'\nfound = getattr(int, name)", "2: AttributeError"),
    "frame": ("found = (x for x in ()).gi_frame", "1: AttributeError: lifecycle code may not access"),
    "private": ("from lifecycles.api import Lifecycle\nLifecycle()._x", "2: AttributeError: lifecycle code"),
    "shared-write": (
        "from lifecycles.api import Lifecycle\nLifecycle.deploy = 1",
        "2: AttributeError: lifecycle",
    ),
    "format": ("found = '{0.__class__}'.format(1)", "1: AttributeError: lifecycle code may not access"),
    "builtin": ("handle = open", "1: NameError: name 'open' is not defined"),
}


@pytest.mark.parametrize("escape", sorted(RUN_TIME_ESCAPES))
def test_run_time_guards_hold_on_their_own(escape: str) -> None:
    """With the static checks skipped, the compiled guards still refuse each escape."""
    source, error = RUN_TIME_ESCAPES[escape]
    with pytest.raises(InvalidLifecycleError) as refused:
        load_lifecycle(
            f"{source}\n\nasync def run(mlc):\n    pass\n", filename="<lifecycle T@1>", check=False
        )
    assert str(refused.value).startswith(f"<lifecycle T@1>:{error}"), refused.value


async def test_code_using_the_allowed_modules_passes_its_dry_run(stack: Stack) -> None:
    path = LIFECYCLES / "good" / "uses_allowed_modules.py"
    stored, created = await upload(stack, path)
    assert created and (stored.name, stored.version) == ("UsesAllowedModules", 1)
