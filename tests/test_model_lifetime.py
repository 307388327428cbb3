"""Every process of a model ends with it: a hostile package double-forks a ``setsid`` daemon
(SIGTERM and SIGHUP ignored) when it is imported and on every request, on a real local
runtime; after undeploy, after ``mlc dev``'s stop of the runtime's servers and after a
batch job, no process of the model remains, in a shared host and in a process of its own.

Processes are found by scanning ``/proc``: by the model's uid and by a marker in their
command line. Model processes get their own user only when the worker is root: under
CI=true these tests fail without it, elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from activities.runtimes.base import BatchJobRequest, CleanupRequest, OnlineDeployRequest, UndeployRequest
from activities.runtimes.local.driver import LocalDriver
from activities.runtimes.local.layout import HOST_DIR, HOST_STATE, read_state
from mlc import cgroups, isolation, processes
from mlc.artifacts import ArtifactStore, build_archive
from mlc.config import Settings
from mlc.domain import HostingMode, ModelSnapshot, Runtime
from mlc.manifest import load_manifest
from tests.conftest import call_model, missing

MANIFEST = """\
name: {name}
service_tags: [lifetime]
requirements: []
samples:
  - input: {{x: 1}}
    expected: {{p: 0.5}}
evaluation:
  path: data/eval.jsonl
  label: y
  score_field: p
"""

DAEMON = '''\
import os
import sys

MARKER = {marker!r}
SLEEP = (
    "import signal, time\\n"
    "for s in (signal.SIGTERM, signal.SIGHUP):\\n    signal.signal(s, signal.SIG_IGN)\\n"
    "time.sleep(3600)"
)


def daemon(when):
    """Double fork, new session, ignore TERM and HUP, the marker in the command line."""
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", SLEEP, MARKER + "-" + when])
        os._exit(0)
    os.waitpid(middle, 0)


daemon("import")


def score(record):
    daemon("request")
    return {{"p": 0.5}}
'''

BYSTANDER = "def score(record):\n    return {'p': 0.25}\n"


@pytest.fixture
def as_root() -> None:
    if isolation.isolating():
        return
    missing("model processes get their own user only when the worker runs as root")


@pytest.fixture
def marker() -> str:
    return f"mlc-hostile-daemon-{uuid.uuid4().hex}"


@pytest.fixture
async def driver(tmp_path: Path, as_root: None, marker: str) -> AsyncIterator[LocalDriver]:
    local = LocalDriver(Settings.from_env(home=tmp_path / "home"))
    yield local
    for name in ("local-dev", "local-sit"):
        await local.cleanup(CleanupRequest(runtime=Runtime(name=name, stage="DEV")))
    for pid in processes.find_processes(marker):  # a failed test leaves nothing for the others
        os.kill(pid, 9)


def runtime_for(hosting: str) -> Runtime:
    if hosting == "shared":
        return Runtime(name="local-dev", stage="DEV")
    return Runtime(name="local-sit", stage="DEV", hosting=HostingMode.DEDICATED)


def snapshot(settings: Settings, root: Path, name: str, code: str) -> ModelSnapshot:
    (root / "data").mkdir(parents=True)
    (root / "data" / "eval.jsonl").write_text('{"x": 1, "y": 1}\n{"x": 2, "y": 0}\n')
    (root / "score.py").write_text(code)
    (root / "manifest.yaml").write_text(MANIFEST.format(name=name))
    manifest = load_manifest(root)
    return ModelSnapshot(
        model=manifest.name,
        version=1,
        sha256=ArtifactStore(settings.artifact_dir).put(build_archive(root)),
        service_tags=manifest.service_tags,
        entry_module=manifest.entry_module,
    )


async def deploy(driver: LocalDriver, runtime: Runtime, deployment_id: str, snap: ModelSnapshot) -> str:
    request = OnlineDeployRequest(deployment_id=deployment_id, snapshot=snap, runtime=runtime, stage="DEV")
    return (await driver.deploy_online(request, lambda note: None)).endpoint


async def score(endpoint: str) -> dict:
    response = await call_model(endpoint, "/score", json={"x": 1})
    assert response.status_code == 200, response.text
    return dict(response.json())


def daemons(marker: str) -> dict[str, list[int]]:
    """Live processes carrying the marker, by when they were started (import, request)."""
    found: dict[str, list[int]] = {}
    for pid in processes.find_processes(marker):
        when = processes.command_line(pid).rsplit(f"{marker}-", 1)[-1].split()[0]
        found.setdefault(when, []).append(pid)
    return found


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def model_uid(driver: LocalDriver, runtime: Runtime, deployment_id: str) -> int:
    """The uid the deployment's code runs as: its own, or its host's."""
    folder = driver.workdir(runtime, deployment_id)
    if runtime.shares_hosts("DEV"):
        folder = driver.settings.runtime_dir / runtime.name / HOST_DIR
    return os.stat(folder).st_uid


async def hostile_serving(driver: LocalDriver, runtime: Runtime, tmp_path: Path, marker: str) -> int:
    """Deploy the hostile model, ask it once, and return its uid once both daemons run as it."""
    hostile = snapshot(driver.settings, tmp_path / "hostile", "hostile", DAEMON.format(marker=marker))
    endpoint = await deploy(driver, runtime, "hostile", hostile)
    assert (await score(endpoint)) == {"p": 0.5}
    uid = model_uid(driver, runtime, "hostile")
    deadline = time.monotonic() + 10
    while set(started := daemons(marker)) != {"import", "request"}:  # each execs after its fork
        assert time.monotonic() < deadline, started
        await asyncio.sleep(0.02)
    pids = {pid for found in started.values() for pid in found}
    assert {uid_of(pid) for pid in pids} == {uid} and uid != 0
    if cgroups.hierarchy() is not None:  # where the host offers groups, every daemon is in its user's
        assert pids <= set(cgroups.members(uid))
    return uid


def host_pid(driver: LocalDriver, runtime: Runtime) -> int:
    """The pid the runtime's shared host is recorded with."""
    state = read_state(driver.settings.runtime_dir / runtime.name / HOST_DIR, HOST_STATE)
    assert state is not None
    return int(state["pid"])


async def answering(endpoint: str, stop: asyncio.Event) -> int:
    """Score ``endpoint`` until ``stop``, each answer 200 with the bystander's output; the count."""
    count = 0
    while not stop.is_set() or count == 0:
        assert (await score(endpoint)) == {"p": 0.25}
        count += 1
    return count


@pytest.mark.parametrize("hosting", ["shared", "dedicated"])
async def test_undeploy_leaves_no_process_of_the_model(
    driver: LocalDriver, tmp_path: Path, marker: str, hosting: str
) -> None:
    """In a shared host the bystander answers throughout (no restart: the host keeps its
    pid) and only the host's own process still runs as its user."""
    runtime = runtime_for(hosting)
    bystander = snapshot(driver.settings, tmp_path / "bystander", "bystander", BYSTANDER)
    other = await deploy(driver, runtime, "bystander", bystander)
    uid = await hostile_serving(driver, runtime, tmp_path, marker)
    host = host_pid(driver, runtime) if hosting == "shared" else None
    hostile_endpoint = await driver.locate(runtime, "hostile")

    stop = asyncio.Event()
    calls = asyncio.ensure_future(answering(other, stop))
    await driver.undeploy(UndeployRequest(deployment_id="hostile", runtime=runtime))
    stop.set()
    assert await calls > 0

    assert daemons(marker) == {}
    assert isolation.processes_of(uid) == ([] if host is None else [host])
    if host is not None:
        assert host_pid(driver, runtime) == host, "the host was not restarted"
        if cgroups.hierarchy() is not None:
            assert cgroups.members(uid) == [host]
        gone = await call_model(hostile_endpoint, "/score", json={"x": 1})
        assert gone.status_code == 404, gone.text
    assert (await score(other)) == {"p": 0.25}, "the other model serves on"

    await driver.undeploy(UndeployRequest(deployment_id="bystander", runtime=runtime))
    assert isolation.processes_of(uid) == []


async def test_a_new_snapshot_in_the_shared_host_leaves_no_process_of_the_old_one(
    driver: LocalDriver, tmp_path: Path, marker: str
) -> None:
    """The same deployment redeployed with other code: the old code's daemons end, the
    host keeps its pid and the bystander answers throughout."""
    runtime = runtime_for("shared")
    bystander = snapshot(driver.settings, tmp_path / "bystander", "bystander", BYSTANDER)
    other = await deploy(driver, runtime, "bystander", bystander)
    uid = await hostile_serving(driver, runtime, tmp_path, marker)
    host = host_pid(driver, runtime)
    tamed = snapshot(driver.settings, tmp_path / "tamed", "hostile", BYSTANDER)

    stop = asyncio.Event()
    calls = asyncio.ensure_future(answering(other, stop))
    endpoint = await deploy(driver, runtime, "hostile", tamed)
    stop.set()
    assert await calls > 0

    assert (await score(endpoint)) == {"p": 0.25}
    assert daemons(marker) == {}
    assert host_pid(driver, runtime) == host
    assert isolation.processes_of(uid) == [host]


@pytest.mark.parametrize("hosting", ["shared", "dedicated"])
async def test_stopping_the_runtimes_servers_leaves_no_process_of_the_model(
    driver: LocalDriver, tmp_path: Path, marker: str, hosting: str
) -> None:
    """What ``mlc dev`` does to each local runtime when it stops."""
    runtime = runtime_for(hosting)
    uid = await hostile_serving(driver, runtime, tmp_path, marker)
    assert await driver.stop_servers(runtime) == ["hostile"]
    assert daemons(marker) == {}
    assert isolation.processes_of(uid) == [] and cgroups.members(uid) == []


async def test_a_batch_job_leaves_no_process_of_the_model(
    driver: LocalDriver, tmp_path: Path, marker: str
) -> None:
    runtime = runtime_for("dedicated")
    hostile = snapshot(driver.settings, tmp_path / "hostile", "hostile", DAEMON.format(marker=marker))
    request = BatchJobRequest(deployment_id="hostile-batch", snapshot=hostile, runtime=runtime, stage="DEV")
    result = await driver.run_batch(request, lambda note: None)
    assert result.records > 0
    assert daemons(marker) == {}
    assert isolation.processes_of(os.stat(driver.workdir(runtime, "hostile-batch")).st_uid) == []


async def test_a_deploy_loading_in_the_shared_host_completes_while_another_model_leaves(
    driver: LocalDriver, tmp_path: Path, marker: str
) -> None:
    """A model leaves the host while another is loading there (its import waits for a go):
    the host is not restarted, the leaving model's daemons end, and the loading deploy
    succeeds in the same host process."""
    runtime = runtime_for("shared")
    uid = await hostile_serving(driver, runtime, tmp_path, marker)
    host = host_pid(driver, runtime)
    wait_for_go = (
        "import os, time\nwhile not os.path.exists(os.environ['TMPDIR'] + '/go'):\n    time.sleep(0.05)\n"
    )
    slow = snapshot(driver.settings, tmp_path / "slow", "slow", wait_for_go + BYSTANDER)
    loading = asyncio.ensure_future(deploy(driver, runtime, "slow", slow))
    host_dir = driver.settings.runtime_dir / runtime.name / HOST_DIR
    while not (host_dir / "models" / "slow").is_symlink():  # in the host, its first /health loading it
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)
    await driver.undeploy(UndeployRequest(deployment_id="hostile", runtime=runtime))
    assert not loading.done()
    assert daemons(marker) == {}
    (host_dir / "tmp" / "go").write_text("")
    endpoint = await loading
    assert (await score(endpoint)) == {"p": 0.25}
    assert host_pid(driver, runtime) == host
    assert isolation.processes_of(uid) == [host], "only the host runs as the host's user"
