"""Hostile lifecycle code and hostile activity payloads, through the real upload and run path.

Every file in tests/fixtures/lifecycles/hostile/ is either refused at upload with
``file:line: reason`` (the checks, hardening) or uploaded, run on the real sandboxed
lifecycle worker and shown to reach nothing: a secret planted in the trusted worker's
environment and a canary file are never read, no process is started, no connection is
opened, and the inventory holds nothing but the run's own rows. Code that escaped every
check is modelled twice: a workflow sending raw payloads to the trusted activities, and a
probe run directly in the lifecycle worker's sandbox (the boundary).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from temporalio.worker import Worker

from cli import admin
from mlc import isolation
from mlc.store import lifecycle_definitions
from mlc.trust.governance import LIFECYCLE_UPLOAD
from tests.conftest import AUTHOR, FIXTURES, Stack, require_sandbox
from tests.hostile_workflow import HostilePayloads
from workers.sandbox import (
    SANDBOX_HOST_UID,
    SandboxedWorker,
    bwrap_command,
    host_user,
    launch_options,
    read_only_roots,
)

HOSTILE = FIXTURES / "lifecycles" / "hostile"
SECRET_VARIABLE = "MLC_CANARY_SECRET"

REFUSED: dict[str, list[tuple[int, str]]] = {
    "module_objects.py": [
        (6, "dataclasses.builtins is not available to lifecycle code: it is the module builtins"),
        (12, "typing.sys is not available to lifecycle code: it is the module sys"),
        (13, "enum.bltns is not available to lifecycle code: it is the module builtins"),
        (14, "datetime.sys is not available to lifecycle code: it is the module sys"),
    ],
    "api_reexports.py": [
        (3, "`import lifecycles.api` binds the package lifecycles, which is not allowed"),
        (5, "lifecycles.api.asyncio is not available to lifecycle code"),
        (5, "lifecycles.api.workflow is not available to lifecycle code"),
        (12, "lifecycles.api.workflow is not available to lifecycle code"),
    ],
    "frames_and_tracebacks.py": [
        (8, "access to .gi_frame is not allowed: frame, traceback, code and generator internals"),
        (8, "access to .f_back is not allowed"),
        (16, "match pattern capturing .__traceback__ is not allowed"),
        (17, "access to .tb_frame is not allowed"),
        (20, "match pattern capturing .gi_frame is not allowed"),
    ],
    "code_in_strings.py": [
        (4, "typing.get_type_hints is not available to lifecycle code: it evaluates code held in strings"),
        (11, "string annotation \"__import__('os')"),
        (16, "access to .format is not allowed: str.format looks up attributes named inside the string"),
    ],
    "private_members.py": [
        (8, "access to ._inventory is not allowed: private members are not part of the authoring API"),
        (9, "access to ._runtime_call is not allowed"),
        (10, "access to ._decision is not allowed"),
        (11, "setattr(..., '_pending') is not allowed"),
    ],
}
"""Files refused at upload, with every ``line: reason`` the author must see."""

RUN = ("dynamic_escapes.py", "detects_dry_run.py")
"""Files that pass upload (their escapes are computed at run time) and must reach nothing."""

ELSEWHERE = ("skips_approval.py",)
"""Run by tests/test_trust.py: uploaded code that skips approval cannot deploy to PROD."""


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_every_hostile_file_has_an_expected_outcome() -> None:
    files = {p.name for p in HOSTILE.glob("*.py")}
    assert files == {*REFUSED, *RUN, *ELSEWHERE}


@pytest.mark.parametrize("file", sorted(REFUSED), ids=lambda f: f.removesuffix(".py"))
async def test_hostile_code_is_refused_at_upload_with_file_line_and_reason(stack: Stack, file: str) -> None:
    path = HOSTILE / file
    refused = await stack.mlc("lifecycle", "upload", str(path), user=AUTHOR)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    message = one_line(refused.stderr)
    assert "nothing was stored" in message
    for line, reason in REFUSED[file]:
        assert f"{path}:{line}: {reason}" in message, message
    assert "Traceback" not in refused.stderr
    assert await lifecycle_definitions.read_lifecycle_definitions(stack.pool) == []


# --- code that passes upload: it runs in the sandbox and reaches nothing -------------------


class Canary:
    """What a successful escape would touch: a secret variable, a file, a TCP port."""

    def __init__(self, folder: Path) -> None:
        self.secret = f"canary-{uuid.uuid4().hex}"
        self.file = folder / "canary.txt"
        self.file.write_text(self.secret)
        self.connections = 0
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def listen(self) -> None:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)

    def plant(self, source: str) -> str:
        """``source`` aimed at this canary (the fixture's placeholders replaced)."""
        return (
            source.replace('CANARY_FILE = "/canary"', f'CANARY_FILE = "{self.file}"')
            .replace("CANARY_PORT = 9", f"CANARY_PORT = {self.port}")
            .replace('SECRET_VARIABLE = "MLC_CANARY_SECRET"', f'SECRET_VARIABLE = "{SECRET_VARIABLE}"')
        )


@pytest.fixture
async def canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Canary]:
    """A canary whose secret is in the trusted worker's environment (this process's)."""
    planted = Canary(tmp_path)
    monkeypatch.setenv(SECRET_VARIABLE, planted.secret)
    await planted.listen()
    try:
        yield planted
    finally:
        assert planted.server is not None
        planted.server.close()
        await planted.server.wait_closed()


def descendants(pid: int) -> list[tuple[int, str]]:
    """Processes below ``pid`` (pid, command line), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found: list[tuple[int, str]] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            command = "?"
        found.append((child, command.strip()))
        todo += children.get(child, [])
    return found


async def everything_written(stack: Stack) -> dict[str, set[str | None]]:
    """The workflow ids of every inventory row that names one."""
    tables = ("audit_log", "lifecycle_runs", "deployments", "notifications")
    return {
        table: {r["workflow_id"] for r in await stack.pool.fetch(f"SELECT workflow_id FROM {table}")}
        for table in tables
    }


async def test_computed_escapes_run_in_the_sandbox_and_reach_nothing(
    stack: Stack, lifecycles: SandboxedWorker, canary: Canary, example_package: Path, tmp_path: Path
) -> None:
    planted = tmp_path / "dynamic_escapes.py"
    planted.write_text(canary.plant((HOSTILE / "dynamic_escapes.py").read_text()))
    uploaded = await stack.mlc("lifecycle", "upload", str(planted), user=AUTHOR)
    assert uploaded.returncode == 0, uploaded.stderr  # its dry run ran in the sandbox too
    snap = await stack.register(example_package)
    await stack.add_local_runtimes(("DEV",))
    before = await everything_written(stack)

    handle = await stack.start(snap, workflow="DynamicEscapes")
    result = await handle.result()
    assert result.stages == ("DEV",)

    notes = [
        r["message"]
        for r in await stack.pool.fetch(
            "SELECT message FROM notifications WHERE workflow_id = $1 AND message LIKE 'escape attempt:%'",
            handle.id,
        )
    ]
    assert len(notes) == 9, notes
    assert all(n.startswith("escape attempt: refused ") for n in notes), notes
    assert any("lifecycle code may not access attribute 'sys'" in n or "'sys'" in n for n in notes), notes
    assert any("may not change attributes of Lifecycle" in n for n in notes), notes

    # Nothing read, spawned or connected; nothing written but the run's own rows.
    history = json.dumps((await handle.fetch_history()).to_json_dict())
    trail = " ".join(r["body"] for r in await stack.pool.fetch("SELECT body FROM audit_log"))
    for where, text in {
        "notifications": " ".join(notes),
        "history": history,
        "trail": trail,
        "lifecycle worker log": lifecycles.log_path.read_text(errors="replace"),
    }.items():
        assert canary.secret not in text, f"the secret leaked into the {where}"
    assert canary.connections == 0, "nothing connected to the canary port"
    assert not Path(f"{canary.file}.spawned").exists(), "no process ran `touch`"
    sandbox = descendants(lifecycles.process.pid)
    assert len(sandbox) == 2 and all("bwrap" in c or "mlc worker --lifecycles" in c for _, c in sandbox), (
        sandbox
    )
    after = await everything_written(stack)
    for table, ids in after.items():
        assert ids - before[table] <= {handle.id}, f"{table} has rows of another run: {ids - before[table]}"


async def test_code_cannot_tell_its_dry_run_from_a_run(stack: Stack, example_package: Path) -> None:
    """It fails whenever it suspects a dry run, so its upload passing shows it could not tell."""
    require_sandbox()
    await stack.register(example_package)
    uploaded = await stack.mlc("lifecycle", "upload", str(HOSTILE / "detects_dry_run.py"), user=AUTHOR)
    assert uploaded.returncode == 0, uploaded.stderr
    assert "uploaded DetectsDryRun version 1" in one_line(uploaded.stdout)


async def test_the_worker_refuses_stored_code_that_skipped_the_upload_checks(
    stack: Stack, lifecycles: SandboxedWorker, example_package: Path
) -> None:
    """An uploader that skipped the checks (but signed the upload) still gets nothing to run."""
    source = (FIXTURES / "lifecycles" / "bad" / "sandbox_escape.py").read_text()
    sha256 = lifecycle_definitions.source_sha256(source)
    author = stack.signers[AUTHOR]
    await admin.submit(
        stack.pool,
        stack.settings,
        author,
        LIFECYCLE_UPLOAD,
        {"name": "Sneaky", "sha256": sha256},
        subject="Sneaky",
    )
    await lifecycle_definitions.create_lifecycle_definition(stack.pool, "Sneaky", source, uploaded_by=AUTHOR)
    snap = await stack.register(example_package)
    handle = await stack.start(snap, workflow="Sneaky")
    with pytest.raises(Exception) as failure:
        await handle.result()
    message = str(getattr(failure.value, "cause", failure.value))
    assert "<lifecycle Sneaky@1>:7: access to .__class__ is not allowed" in message, message
    status = await stack.pool.fetchval(
        "SELECT count(*) FROM lifecycle_runs WHERE workflow_id = $1", handle.id
    )
    assert status == 0, "the code never ran, so no run began"


# --- payloads that escaped code could send: the trusted activities refuse them ----------


async def test_hostile_activity_payloads_are_refused_with_clear_messages(
    stack: Stack, canary: Canary, example_package: Path
) -> None:
    snap = await stack.register(example_package)
    await stack.add_local_runtimes(("DEV",))
    main = stack.task_queue
    forged_deployment = {
        "id": "../../etc",
        "model": snap.model,
        "version": snap.version,
        "runtime": "local-dev",
        "stage": "DEV",
        "mode": "online",
        "state": "serving",
        "endpoint": f"http://127.0.0.1:{canary.port}",
    }
    no_signature = {"payload": "", "payloadType": "application/vnd.in-toto+json", "signatures": []}
    calls = [
        ("begin_lifecycle_run", {"model": snap.model, "version": snap.version}),
        ("record_deployment", {"deployment_id": "../../../etc/passwd", "state": "serving"}),
        ("authorize_undeploy", {"deployment_id": "../runtimes/local-prod/x"}),
        ("record_deployment", {"deployment_id": "cc-fraud-v1-dev-local-dev-00000000", "state": "serving"}),
        ("load_lifecycle_definition", {"name": "FourEyes"}),
        (
            "record_decision",
            {
                "record": {
                    "stage": "DEV",
                    "decision": "approved",
                    "approver": "alice",
                    "decided_at": "2026-01-01T00:00:00Z",
                }
            },
        ),
        (
            "run_stage_tests",
            {
                "stage": "DEV",
                "snapshot": snap.model_dump(mode="json"),
                "deployment": forged_deployment,
                "tests": ["smoke"],
                "batch_output": str(canary.file),
            },
        ),
        ("deploy_online", {"grant": no_signature}),
    ]
    queue = f"{main}-hostile"
    async with Worker(stack.client, task_queue=queue, workflows=[HostilePayloads]):
        outcomes = await stack.client.execute_workflow(
            HostilePayloads.run,
            [{"activity": a, "payload": p, "queue": main} for a, p in calls],
            id=f"hostile-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
        )
    expected = [
        "begin_lifecycle_run: accepted",
        "record_deployment: deployment id '../../../etc/passwd' is not valid: ids are lower-case letters",
        "authorize_undeploy: deployment id '../runtimes/local-prod/x' is not valid",
        "record_deployment: deployment cc-fraud-v1-dev-local-dev-00000000 does not exist",
        "load_lifecycle_definition: a HostilePayloads run may only load its own code, not FourEyes",
        "record_decision: only an expired gate is recorded unsigned; approvals must be signed",
        "run_stage_tests: testing a deployment needs the platform's grant",
        "deploy_online: the runtime action is not signed by this platform's key",
    ]
    assert len(outcomes) == len(expected), outcomes
    for outcome, start in zip(outcomes, expected, strict=True):
        assert outcome.startswith(start), outcomes
    assert canary.connections == 0, "the forged endpoint was never called"
    assert await stack.pool.fetchval("SELECT count(*) FROM deployments") == 0, (
        "nothing was deployed or recorded"
    )


# --- the boundary itself: code that escaped Python still reaches nothing ------------------

PROBE = r"""
import json, os, socket, subprocess, sys
canary_file, secret_variable, pg_socket = sys.argv[1], sys.argv[2], sys.argv[3]
ports = [int(p) for p in sys.argv[4:]]

def attempt(fn):
    try:
        return f"reached: {fn()!r}"[:200]
    except Exception as exc:
        return f"refused: {type(exc).__name__}"

def connect(port):
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return port

def write(path):
    with open(path, "w") as out:
        out.write("x")
    return path

print(json.dumps({
    "secret": os.environ.get(secret_variable, "absent"),
    "environment": sorted(os.environ),
    "canary": attempt(lambda: open(canary_file).read()),
    "connections": [attempt(lambda p=p: connect(p)) for p in ports],
    "docker": attempt(lambda: socket.socket(socket.AF_UNIX).connect("/var/run/docker.sock")),
    "postgres": attempt(lambda: socket.socket(socket.AF_UNIX).connect(pg_socket)),
    "write project": attempt(lambda: write(os.path.join(sys.prefix, "pwned"))),
    "write root": attempt(lambda: write("/pwned")),
    "uid": os.getuid(),
    "processes": len([p for p in os.listdir("/proc") if p.isdigit()]),
    "home": attempt(lambda: os.listdir(sys.argv[1].rsplit("/", 1)[0])),
    "root-only": attempt(lambda: open(os.environ["BOUND"] + "/root-only").read()),
    "public": attempt(lambda: open(os.environ["BOUND"] + "/public").read()),
}))
"""


def test_the_sandbox_holds_for_code_that_escaped_python(
    canary_file: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    postgres_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Arbitrary Python in the lifecycle worker's exact sandbox: no secret, file, socket or write."""
    require_sandbox()
    monkeypatch.setenv(SECRET_VARIABLE, "planted-secret")
    listener = socket.create_server(("127.0.0.1", 0))
    pg_folder = Path(postgres_dsn.split("host=", 1)[1].split("&", 1)[0])
    pg_socket = next(pg_folder.glob(".s.PGSQL.*"))
    assert pg_socket.is_socket()
    bridge = tmp_path / "bridge"
    bridge.mkdir()
    bound = tmp_path_factory.mktemp("bound")  # a folder the sandbox reads, with a root-only file
    bound.chmod(0o755)
    (bound / "public").write_text("public")
    (bound / "root-only").write_text("root only")
    (bound / "root-only").chmod(0o600)
    command = bwrap_command(
        [
            sys.executable,
            "-c",
            PROBE,
            str(canary_file),
            SECRET_VARIABLE,
            str(pg_socket),
            str(listener.getsockname()[1]),
        ],
        env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "BOUND": str(bound)},
        bridge_dir=bridge,
        read_only=[bound],
    )
    user = host_user([*read_only_roots(), bound, bridge])
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=60, check=False, **launch_options(user)
        )
    finally:
        listener.close()
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    # Only what the launcher passed, plus PWD (bwrap's --chdir) and LC_CTYPE (Python's locale coercion).
    assert seen["secret"] == "absent", seen
    assert set(seen["environment"]) <= {"PATH", "PYTHONDONTWRITEBYTECODE", "BOUND", "PWD", "LC_CTYPE"}, seen
    assert seen["canary"].startswith("refused"), seen
    assert all(c.startswith("refused") for c in seen["connections"]), "no loopback service is reachable"
    assert seen["docker"].startswith("refused") and seen["postgres"].startswith("refused"), seen
    assert seen["write project"].startswith("refused") and seen["write root"].startswith("refused"), seen
    assert seen["uid"] == 65534 and seen["processes"] <= 3, seen
    assert seen["home"].startswith("refused"), seen
    # 65534 inside is an unprivileged host user, not root: a root-only file stays unreadable
    assert seen["public"] == "reached: 'public'", seen
    assert seen["root-only"] == "refused: PermissionError", seen
    assert canary_file.read_text() == "canary" and not (Path(sys.prefix) / "pwned").exists()


@pytest.fixture
def canary_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "canary.txt"
    path.write_text("canary")
    yield path


def test_the_lifecycle_worker_refuses_to_start_where_it_could_see_secrets(tmp_path: Path) -> None:
    env = {**os.environ, "MLC_HOME": str(tmp_path), "MLC_DATABASE_URL": "postgresql://mlc:pw@127.0.0.1/mlc"}
    done = subprocess.run(
        [sys.executable, "-m", "mlc", "worker", "--lifecycles", "--no-sandbox"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 4, done.stdout + done.stderr
    assert "the lifecycle worker runs uploaded code and must not see secrets" in one_line(done.stderr)
    assert "$MLC_DATABASE_URL" in done.stderr and "Traceback" not in done.stderr


def test_lifecycle_state_names_stay_out_of_reach() -> None:
    """The facade exposes exactly the documented API: no private member, no run state."""
    from lifecycles import api

    public = {n for n in dir(api.Lifecycle) if not n.startswith("__")}
    assert public == {
        "model", "version", "spec", "stages", "report", "deployments",
        "deploy", "test", "approval", "promote", "rollout", "shadow", "undeploy", "notify", "sleep",
        "log", "fail",
    }  # fmt: skip
    assert not any(isinstance(v, type(os)) for v in vars(api).values()), "lifecycles.api holds no module"
    exported: dict[str, object] = {}
    exec("from lifecycles.api import *", exported)
    assert not any(isinstance(v, type(os)) for k, v in exported.items() if k != "__builtins__")


async def test_mlc_worker_lifecycles_sandboxes_itself(temporal_env: object, tmp_path: Path) -> None:
    """`mlc worker --lifecycles` on a host runs the worker under bubblewrap, not in itself."""
    require_sandbox()
    address = temporal_env.client.service_client.config.target_host  # type: ignore[attr-defined]
    queue = f"mlc-test-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "MLC_HOME": str(tmp_path),
        "TEMPORAL_ADDRESS": address,
        "MLC_TASK_QUEUE": queue,
        # The launching shell may hold it; the sandboxed worker never sees it (or it would refuse).
        "MLC_DATABASE_URL": "postgresql://mlc:secret@127.0.0.1/mlc",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlc", "worker", "--lifecycles",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert f"serving uploaded lifecycles on {queue}-lifecycles, sandboxed" in one_line(line.decode())
        inside = [c for _, c in descendants(proc.pid) if "--no-sandbox" in c and "bwrap" not in c]
        assert inside, "the worker runs as a child, inside bwrap"
        if isolation.isolating():  # seen from the host: its 65534 is an unprivileged user, not root
            for pid, command in descendants(proc.pid):
                if "--no-sandbox" not in command or "bwrap" in command:
                    continue
                status = Path(f"/proc/{pid}/status").read_text()
                assert f"Uid:\t{SANDBOX_HOST_UID}\t{SANDBOX_HOST_UID}\t" in status, status
                assert Path(f"/proc/{pid}/uid_map").read_text().split() == [
                    "65534",
                    str(SANDBOX_HOST_UID),
                    "1",
                ]
        log = (tmp_path / "lifecycle-worker.log").read_text()
        assert f"lifecycle worker polling task queue {queue}-lifecycles" in log
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
    assert descendants(proc.pid) == []
