"""Model code gets only what it needs: real model processes of a real local runtime try to
read another deployment's files and the worker's secrets under MLC_HOME, and fail.

When the worker is root (CI), each deployment runs as its own unprivileged user (see
:mod:`mlc.isolation`). A non-root worker cannot do that, so these tests need root: under
CI=true they fail without it, elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from activities.runtimes.base import BatchJobRequest, CleanupRequest, OnlineDeployRequest, ProbeRequest
from activities.runtimes.local.driver import LocalDriver
from activities.runtimes.local.layout import SERVER_LOG
from mlc import endpoints, isolation
from mlc.artifacts import ArtifactStore, build_archive
from mlc.config import Settings
from mlc.domain import HostingMode, ModelSnapshot, Runtime
from mlc.manifest import load_manifest
from tests.conftest import missing

SECRET = "platform-key-planted-by-the-test"
CANARY = "canary-of-the-victim-deployment"
WORKER_ENV = {"MLC_DATABASE_URL": "postgresql://mlc:hunter2@127.0.0.1:1/x", "SECRET_TOKEN": "s3cr3t-env"}

MANIFEST = """\
name: {name}
service_tags: [isolation]
requirements: []
evaluation:
  path: data/eval.jsonl
  label: y
  score_field: p
"""

SNOOP = """\
import os
import time

TARGETS = {targets!r}


def attempt(path, how):
    try:
        if how == "list":
            return "LISTED " + ",".join(sorted(os.listdir(path)))
        with open(path) as fh:
            return "READ " + fh.read()
    except OSError as exc:
        return "refused " + type(exc).__name__


def score(record):
    found = {{name: attempt(path, how) for name, (path, how) in TARGETS.items()}}
    if record.get("daemon"):  # a grandchild that would outlive the job, left alone
        if os.fork() == 0:
            os.setsid()
            time.sleep(600)
            os._exit(0)
    if record.get("plant"):
        # A link where the runtime keeps its log: the runtime must not read the key through it.
        log = os.path.join(os.environ["HOME"], "server.log")
        os.unlink(log)
        os.symlink(TARGETS["platform_key"][0], log)
    return {{"p": 0.5, "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
             "env": sorted(os.environ), "found": found}}
"""


@pytest.fixture
def as_root() -> None:
    if isolation.isolating():
        return
    missing("model processes get their own user only when the worker runs as root")


@pytest.fixture
async def local(tmp_path: Path, as_root: None) -> AsyncIterator[tuple[LocalDriver, Runtime]]:
    runtime = Runtime(name="local-sit", stage="SIT", hosting=HostingMode.DEDICATED)
    driver = LocalDriver(Settings.from_env(home=tmp_path / "home"))
    yield driver, runtime
    await driver.cleanup(CleanupRequest(runtime=runtime))


def write_package(root: Path, name: str, score: str) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "data" / "eval.jsonl").write_text('{"x": 1, "y": 1}\n{"x": 2, "y": 0}\n')
    (root / "score.py").write_text(score)
    (root / "manifest.yaml").write_text(MANIFEST.format(name=name))
    return root


def snapshot_of(settings: Settings, package: Path) -> ModelSnapshot:
    manifest = load_manifest(package)
    return ModelSnapshot(
        model=manifest.name,
        version=1,
        sha256=ArtifactStore(settings.artifact_dir).put(build_archive(package)),
        service_tags=manifest.service_tags,
        entry_module=manifest.entry_module,
    )


async def plant(driver: LocalDriver, runtime: Runtime, tmp_path: Path) -> dict[str, tuple[str, str]]:
    """The worker's secrets under MLC_HOME and a victim deployment with a canary file;
    return what the snooping model tries to read or list."""
    settings = driver.settings
    key = settings.platform_key_path
    key.parent.mkdir(parents=True)
    key.write_text(SECRET)
    key.chmod(0o644)  # even readable by all, it is out of reach behind MLC_HOME's lock
    (settings.home / "dev.json").write_text(json.dumps({"database_url": "postgresql://x:" + SECRET}))
    (settings.home / "postgres").mkdir()
    (settings.home / "postgres" / "pg_hba.conf").write_text(SECRET)
    victim = snapshot_of(
        settings, write_package(tmp_path / "victim", "victim", "def score(r):\n    return {'p': 1}\n")
    )
    request = OnlineDeployRequest(deployment_id="victim", snapshot=victim, runtime=runtime, stage="SIT")
    await driver.deploy_online(request, lambda note: None)
    victim_dir = driver.workdir(runtime, "victim")
    (victim_dir / "canary.txt").write_text(CANARY)
    (victim_dir / "canary.txt").chmod(0o644)
    return {
        "platform_key": (str(key), "read"),
        "dev_json": (str(settings.home / "dev.json"), "read"),
        "postgres": (str(settings.home / "postgres" / "pg_hba.conf"), "read"),
        "victim_canary": (str(victim_dir / "canary.txt"), "read"),
        "victim_package": (str(victim_dir / "package" / "score.py"), "read"),
        "home": (str(settings.home), "list"),
        "runtimes": (str(settings.runtime_dir / runtime.name), "list"),
        "root": ("/root", "list"),
    }


def assert_confined(output: dict, uid: int) -> None:
    assert output["uid"] == uid != 0
    assert output["gid"] != 0 and output["groups"] == []
    assert not any(name in output["env"] for name in WORKER_ENV)
    for name, result in output["found"].items():
        # A folder may be listed only where it is the model's private view of the path to
        # its own folder (see mlc.isolation.bind_unreachable): nothing planted shows.
        listed = result.startswith("LISTED ") and not any(
            planted in result for planted in ("keys", "dev.json", "postgres", "artifacts", "victim")
        )
        assert result.startswith("refused ") or listed, f"model code reached {name}: {result}"


def uids_of(pid: int) -> list[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return [int(v) for v in line.split()[1:]]


def open_up(tmp_path: Path) -> None:
    """Let others traverse ``tmp_path`` and its parents (pytest makes them 0700), so the
    model reaches its folder through the real MLC_HOME, locked by the runtime (0711 and
    nothing for others beside the runtimes folder), not through a private view of it."""
    for folder in [tmp_path, *tmp_path.parents]:
        mode = stat.S_IMODE(folder.stat().st_mode)
        if not mode & 0o001:
            folder.chmod(mode | 0o011)


@pytest.mark.parametrize("home", ["traversable", "behind a 0700 folder"])
async def test_model_server_reaches_nothing_beyond_its_own_folder(
    local: tuple[LocalDriver, Runtime], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: str
) -> None:
    driver, runtime = local
    if home == "traversable":
        open_up(tmp_path)
    for name, value in WORKER_ENV.items():
        monkeypatch.setenv(name, value)
    targets = await plant(driver, runtime, tmp_path)
    snoop = snapshot_of(
        driver.settings, write_package(tmp_path / "snoop", "snoop", SNOOP.format(targets=targets))
    )
    request = OnlineDeployRequest(deployment_id="snoop", snapshot=snoop, runtime=runtime, stage="SIT")
    result = await driver.deploy_online(request, lambda note: None)
    pid = int(result.details["pid"])
    workdir = driver.workdir(runtime, "snoop")
    owner = os.stat(workdir)
    assert uids_of(pid) == [owner.st_uid] * 4 and owner.st_uid != 0
    assert stat.S_IMODE(owner.st_mode) == 0o700
    assert os.stat(driver.workdir(runtime, "victim")).st_uid not in (0, owner.st_uid)
    if home == "traversable":
        for folder in (driver.settings.home, driver.settings.runtime_dir, workdir.parent):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o711
        assert not driver.settings.platform_key_path.parent.stat().st_mode & 0o007
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert b"hunter2" not in environ and b"s3cr3t" not in environ
    assert "NoNewPrivs:\t1" in Path(f"/proc/{pid}/status").read_text()

    async with endpoints.connect(result.endpoint, timeout=10) as (client, url):
        scored = (await client.post(f"{url}/score", json={"x": 1})).json()
        assert_confined(scored, owner.st_uid)
        # The runtime still reads its log and probes it, and a link the model plants where
        # the log was is never followed.
        assert (await driver.probe(ProbeRequest(deployment_id="snoop", runtime=runtime))).healthy
        await client.post(f"{url}/score", json={"x": 1, "plant": True})
    assert (workdir / SERVER_LOG).is_symlink()
    os.killpg(pid, signal.SIGKILL)
    probe = await driver.probe(ProbeRequest(deployment_id="snoop", runtime=runtime))
    assert not probe.healthy
    assert SECRET not in probe.log_tail and SECRET not in probe.detail


async def test_batch_job_reaches_nothing_beyond_its_own_folder(
    local: tuple[LocalDriver, Runtime], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver, runtime = local
    for name, value in WORKER_ENV.items():
        monkeypatch.setenv(name, value)
    targets = await plant(driver, runtime, tmp_path)
    snoop = snapshot_of(
        driver.settings, write_package(tmp_path / "snoop", "snoop", SNOOP.format(targets=targets))
    )
    source = tmp_path / "private" / "in.jsonl"  # readable by root only: the job gets a copy
    source.parent.mkdir(mode=0o700)
    source.write_text('{"x": 1}\n{"x": 2, "daemon": true}\n')
    source.chmod(0o600)
    request = BatchJobRequest(
        deployment_id="snoop-batch", snapshot=snoop, runtime=runtime, stage="SIT", input_path=str(source)
    )
    result = await driver.run_batch(request, lambda note: None)
    outputs = [json.loads(line) for line in Path(result.output_path).read_text().splitlines()]
    owner = os.stat(driver.workdir(runtime, "snoop-batch")).st_uid
    assert len(outputs) == 2
    for output in outputs:
        assert_confined(output, owner)
    assert isolation.processes_of(owner) == [], "nothing of the job outlives it"


async def test_a_shared_host_runs_as_its_own_user_and_reaches_nothing_beyond_its_runtime(
    local: tuple[LocalDriver, Runtime], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver, dedicated = local
    for name, value in WORKER_ENV.items():
        monkeypatch.setenv(name, value)
    targets = await plant(driver, dedicated, tmp_path)  # the victim: a dedicated deployment
    shared = Runtime(name="local-dev", stage="DEV")
    snoop = snapshot_of(
        driver.settings, write_package(tmp_path / "snoop", "snoop", SNOOP.format(targets=targets))
    )
    request = OnlineDeployRequest(deployment_id="snoop", snapshot=snoop, runtime=shared, stage="DEV")
    try:
        result = await driver.deploy_online(request, lambda note: None)
        assert result.endpoint.endswith("/models/snoop")
        pid = int(result.details["pid"])
        host = os.stat(driver.settings.runtime_dir / "local-dev" / ".host")
        assert uids_of(pid) == [host.st_uid] * 4 and host.st_uid != 0
        assert os.stat(driver.workdir(shared, "snoop")).st_uid == host.st_uid  # the host's user owns it
        assert os.stat(driver.workdir(dedicated, "victim")).st_uid not in (0, host.st_uid)
        assert "NoNewPrivs:\t1" in Path(f"/proc/{pid}/status").read_text()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"hunter2" not in environ and b"s3cr3t" not in environ
        async with endpoints.connect(result.endpoint, timeout=10) as (client, url):
            scored = (await client.post(f"{url}/score", json={"x": 1})).json()
        assert_confined(scored, host.st_uid)
    finally:
        await driver.cleanup(CleanupRequest(runtime=shared))
