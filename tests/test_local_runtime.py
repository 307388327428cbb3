"""The local runtime driver and the stage-test activity, with real server processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.runtimes.base import (
    BatchJobRequest,
    CleanupRequest,
    OnlineDeployRequest,
    ProbeRequest,
    UndeployRequest,
)
from activities.runtimes.local.driver import LocalDriver
from activities.runtimes.local.layout import STATE_FILE
from activities.testing import TestingActivities
from mlc import endpoints, processes
from mlc.artifacts import ArtifactStore, build_archive
from mlc.config import Settings
from mlc.contracts.runtime import RunStageTestsInput
from mlc.domain import (
    Deployment,
    DeploymentState,
    HostingMode,
    Mode,
    ModelSnapshot,
    Runtime,
    TestKind,
)
from mlc.errors import DeploymentFailedError
from mlc.evaluation import load_evaluation
from mlc.manifest import load_manifest
from mlc.trust import grants

FIXTURES = Path(__file__).parent / "fixtures" / "models"
BOTH_TESTS = (TestKind.SMOKE, TestKind.METRICS)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env(home=tmp_path / "home")


@pytest.fixture
def runtime() -> Runtime:
    """A process per deployment (these tests are about its pid); see the shared-host tests."""
    return Runtime(name="local-sit", stage="SIT", hosting=HostingMode.DEDICATED)


@pytest.fixture
async def driver(settings: Settings, runtime: Runtime) -> AsyncIterator[LocalDriver]:
    local = LocalDriver(settings)
    yield local
    await local.cleanup(CleanupRequest(runtime=runtime))


def snapshot_of(settings: Settings, package: Path, version: int = 1) -> ModelSnapshot:
    manifest = load_manifest(package)
    sha = ArtifactStore(settings.artifact_dir).put(build_archive(package))
    return ModelSnapshot(
        model=manifest.name,
        version=version,
        sha256=sha,
        service_tags=manifest.service_tags,
        entry_module=manifest.entry_module,
        requirements=manifest.requirements,
    )


def deployment_of(
    snapshot: ModelSnapshot, runtime: Runtime, mode: Mode, *, endpoint: str | None = None
) -> Deployment:
    return Deployment(
        id=f"{snapshot.model}-{uuid.uuid4().hex[:8]}",
        model=snapshot.model,
        version=snapshot.version,
        runtime=runtime.name,
        stage=runtime.stage,
        mode=mode,
        state=DeploymentState.SERVING,
        endpoint=endpoint,
    )


def alive(pid: int) -> bool:
    return processes.alive(pid, marker="mlc.serving")


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def deploy(
    driver: LocalDriver, snapshot: ModelSnapshot, runtime: Runtime, deployment_id: str
) -> tuple[str, dict]:
    notes: list[str] = []
    result = await driver.deploy_online(
        OnlineDeployRequest(
            deployment_id=deployment_id, snapshot=snapshot, runtime=runtime, stage=runtime.stage
        ),
        notes.append,
    )
    return result.endpoint, result.details


async def test_online_deploy_is_idempotent_and_undeploy_stops_it(
    driver: LocalDriver, settings: Settings, runtime: Runtime, example_package: Path
) -> None:
    snapshot = snapshot_of(settings, example_package)
    endpoint, details = await deploy(driver, snapshot, runtime, "dep-online")
    assert endpoint == f"unix:{driver.workdir(runtime, 'dep-online')}/server.sock"
    assert Path(details["log"]).is_file()
    sample = load_manifest(example_package).samples[2]
    async with endpoints.connect(endpoint, timeout=10) as (client, url):
        scored = (await client.post(f"{url}/score", json=sample.input)).json()
        health = (await client.get(f"{url}/health")).json()
    assert scored["is_fraud"] == sample.expected["is_fraud"]
    assert health == {"status": "ok", "model": "cc-fraud", "version": "1", "sha256": snapshot.sha256}

    again, details_again = await deploy(driver, snapshot, runtime, "dep-online")
    assert (again, details_again["pid"]) == (endpoint, details["pid"])
    assert len(processes_mentioning(str(driver.workdir(runtime, "dep-online")))) == 1

    request = UndeployRequest(deployment_id="dep-online", runtime=runtime)
    await driver.undeploy(request)
    assert not alive(details["pid"])
    assert not driver.workdir(runtime, "dep-online").exists()
    await driver.undeploy(request)  # already gone: still fine


async def test_dead_server_is_restarted_on_redeploy(
    driver: LocalDriver, settings: Settings, runtime: Runtime
) -> None:
    snapshot = snapshot_of(settings, FIXTURES / "weak-model")
    _, first = await deploy(driver, snapshot, runtime, "dep-restart")
    os.killpg(first["pid"], signal.SIGKILL)
    endpoint, second = await deploy(driver, snapshot, runtime, "dep-restart")
    assert second["pid"] != first["pid"]
    assert (await endpoints.get(endpoint, "/health", timeout=10)).status_code == 200


async def test_batch_job_writes_outputs_and_leaves_nothing_running(
    driver: LocalDriver, settings: Settings, runtime: Runtime, example_package: Path
) -> None:
    snapshot = snapshot_of(settings, example_package)
    notes: list[str] = []
    result = await driver.run_batch(
        BatchJobRequest(deployment_id="dep-batch", snapshot=snapshot, runtime=runtime, stage=runtime.stage),
        notes.append,
    )
    manifest = load_manifest(example_package)
    expected = len(manifest.samples) + len(load_evaluation(manifest, example_package).labels)
    assert result.records == expected
    assert result.seconds > 0
    assert len(Path(result.output_path).read_text().splitlines()) == expected
    workdir = driver.workdir(runtime, "dep-batch")
    assert not (workdir / "package").exists()
    assert processes_mentioning(str(workdir)) == []
    assert notes, "the driver heartbeats while the job runs"


async def test_batch_job_on_given_input(
    driver: LocalDriver, settings: Settings, runtime: Runtime, tmp_path: Path
) -> None:
    package = FIXTURES / "weak-model"
    source = tmp_path / "in.jsonl"
    source.write_text(
        (package / "data" / "eval.jsonl")
        .read_text()
        .replace(',"is_fraud":0', "")
        .replace(',"is_fraud":1', "")
    )
    result = await driver.run_batch(
        BatchJobRequest(
            deployment_id="dep-input",
            snapshot=snapshot_of(settings, package),
            runtime=runtime,
            stage=runtime.stage,
            input_path=str(source),
        ),
        lambda note: None,
    )
    assert result.records == len(source.read_text().splitlines())


async def test_failing_batch_job_reports_its_log(
    driver: LocalDriver, settings: Settings, runtime: Runtime, tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"amount": "lots"}\n')
    with pytest.raises(DeploymentFailedError, match=r"exited with code 1(.|\n)*in\.jsonl:1"):
        await driver.run_batch(
            BatchJobRequest(
                deployment_id="dep-bad-input",
                snapshot=snapshot_of(settings, FIXTURES / "weak-model"),
                runtime=runtime,
                stage=runtime.stage,
                input_path=str(source),
            ),
            lambda note: None,
        )


async def test_crashing_model_fails_the_deploy_with_its_log_tail(
    driver: LocalDriver, settings: Settings, runtime: Runtime
) -> None:
    snapshot = snapshot_of(settings, FIXTURES / "crash-model")
    with pytest.raises(DeploymentFailedError) as caught:
        await deploy(driver, snapshot, runtime, "dep-crash")
    message = str(caught.value)
    assert "crash-model@1" in message and "exited during start with code 1" in message
    assert "init() fails on purpose" in message
    assert processes_mentioning(str(driver.workdir(runtime, "dep-crash"))) == []


async def test_cleanup_removes_only_orphans(
    driver: LocalDriver, settings: Settings, runtime: Runtime
) -> None:
    snapshot = snapshot_of(settings, FIXTURES / "weak-model")
    _, kept = await deploy(driver, snapshot, runtime, "dep-kept")
    _, orphan = await deploy(driver, snapshot, runtime, "dep-orphan")
    result = await driver.cleanup(CleanupRequest(runtime=runtime, keep=("dep-kept",)))
    assert result.removed == ("dep-orphan",)
    assert not alive(orphan["pid"])
    assert alive(kept["pid"])
    assert not driver.workdir(runtime, "dep-orphan").exists()


# --- the run_stage_tests activity against real deployments ---------------------------


async def run_tests(settings: Settings, input: RunStageTestsInput) -> list:
    result = await ActivityEnvironment().run(TestingActivities(settings).run_stage_tests, input)
    return list(result.results)


def granted(
    settings: Settings, snapshot: ModelSnapshot, runtime: Runtime, deployment_id: str, mode: Mode
) -> RunStageTestsInput:
    """A test request carrying the platform's grant, as ``record_deployment`` issues it.

    Its ``deployment`` claims an endpoint nobody listens on: the activity must use the one
    its driver locates, never the payload's.
    """
    grant = grants.RuntimeGrant(
        action="run_stage_tests",
        deployment_id=deployment_id,
        runtime=runtime,
        stage=runtime.stage,
        mode=mode,
        snapshot=snapshot,
        workflow_id="test",
        run_id="test-run",  # ActivityEnvironment's run
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    claimed = deployment_of(snapshot, runtime, mode, endpoint="http://198.51.100.1:9")
    return RunStageTestsInput(
        stage=runtime.stage,
        snapshot=snapshot,
        deployment=claimed,
        tests=BOTH_TESTS,
        batch_output="/etc/passwd",
        grant=grants.issue(grants.platform_key(settings.platform_key_path), grant),
    )


async def test_stage_tests_pass_for_the_example_online(
    driver: LocalDriver, settings: Settings, runtime: Runtime, example_package: Path
) -> None:
    snapshot = snapshot_of(settings, example_package)
    await deploy(driver, snapshot, runtime, "dep-tests")
    tested = settings.runtime_dir / "_tests"
    tested.mkdir()
    tested.chmod(0o755)  # as older workers left it
    smoke, metrics = await run_tests(settings, granted(settings, snapshot, runtime, "dep-tests", Mode.ONLINE))
    assert (smoke.test, smoke.passed, smoke.summary) == (TestKind.SMOKE, True, "4/4 samples match")
    assert metrics.passed, metrics.summary
    assert metrics.metrics["auc"] >= 0.85
    assert metrics.metrics["records"] == 2_000
    # the unpacked package (weights, labelled evaluation data) is the worker's alone
    assert stat.S_IMODE(tested.stat().st_mode) == 0o700
    assert (tested / snapshot.sha256 / "manifest.yaml").is_file()


async def test_weak_model_fails_metrics_in_both_modes(
    driver: LocalDriver, settings: Settings, runtime: Runtime
) -> None:
    snapshot = snapshot_of(settings, FIXTURES / "weak-model")
    await deploy(driver, snapshot, runtime, "dep-weak")
    smoke, metrics = await run_tests(settings, granted(settings, snapshot, runtime, "dep-weak", Mode.ONLINE))
    assert smoke.passed
    assert (metrics.passed, metrics.summary) == (False, "auc 0.500 < 0.800")

    await driver.run_batch(
        BatchJobRequest(deployment_id="dep-weak-batch", snapshot=snapshot, runtime=runtime, stage="SIT"),
        lambda note: None,
    )
    smoke, metrics = await run_tests(
        settings, granted(settings, snapshot, runtime, "dep-weak-batch", Mode.BATCH)
    )
    assert smoke.passed
    assert (metrics.passed, metrics.summary) == (False, "auc 0.500 < 0.800")


async def test_stage_tests_errors(settings: Settings, runtime: Runtime, driver: LocalDriver) -> None:
    snapshot = snapshot_of(settings, FIXTURES / "weak-model")
    # A live "server" (its command line names mlc.serving) that listens on nothing.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "mlc.serving"])
    while b"mlc.serving" not in Path(f"/proc/{sleeper.pid}/cmdline").read_bytes():
        await asyncio.sleep(0.01)  # until it has exec'd
    try:
        with socket_port() as port:
            workdir = driver.workdir(runtime, "dep-silent")
            workdir.mkdir(parents=True)
            (workdir / STATE_FILE).write_text(json.dumps({"pid": sleeper.pid, "port": port}))
            with pytest.raises(ApplicationError) as caught:
                await run_tests(settings, granted(settings, snapshot, runtime, "dep-silent", Mode.ONLINE))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not caught.value.non_retryable
    assert "unreachable" in str(caught.value)

    with pytest.raises(ApplicationError) as caught:
        await run_tests(settings, granted(settings, snapshot, runtime, "dep-gone", Mode.ONLINE))
    assert caught.value.non_retryable and caught.value.type == "NotFoundError"
    assert "deployment dep-gone has no live model server on runtime local-sit" in str(caught.value)

    missing = snapshot.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(ApplicationError) as caught:
        await run_tests(settings, granted(settings, missing, runtime, "dep-gone", Mode.BATCH))
    assert caught.value.non_retryable
    assert caught.value.type == "NotFoundError"
    assert "artifact 000000000000 is missing" in str(caught.value)


async def test_stage_tests_act_only_on_a_grant(settings: Settings, runtime: Runtime) -> None:
    snapshot = snapshot_of(settings, FIXTURES / "weak-model")
    request = granted(settings, snapshot, runtime, "dep-x", Mode.BATCH)
    with pytest.raises(ApplicationError, match="needs the platform's grant") as caught:
        await run_tests(settings, request.model_copy(update={"grant": None}))
    assert caught.value.non_retryable and caught.value.type == "RefusedError"

    foreign = granted(settings, snapshot, runtime, "dep-x", Mode.BATCH)
    other_run = ActivityEnvironment()
    other_run.info = replace(other_run.info, workflow_run_id="another-run")
    with pytest.raises(ApplicationError, match="belongs to another lifecycle run"):
        await other_run.run(TestingActivities(settings).run_stage_tests, foreign)

    stranger = Ed25519PrivateKey.generate()
    forged = grants.issue(stranger, grants.RuntimeGrant.model_validate(foreign.grant.statement().predicate))  # type: ignore[union-attr]
    with pytest.raises(ApplicationError, match="not signed by this platform's key"):
        await run_tests(settings, foreign.model_copy(update={"grant": forged}))


class socket_port:
    """A 127.0.0.1 port that is bound but not listening, so connections are refused."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


# --- the shared model host (the default of non-PROD local runtimes) --------------------


def package_with(tmp_path: Path, name: str, requirements: str) -> Path:
    """A copy of the weak model with other ``requirements``."""
    import shutil

    copy = tmp_path / name
    shutil.copytree(FIXTURES / "weak-model", copy)
    manifest = copy / "manifest.yaml"
    lines = [ln for ln in manifest.read_text().splitlines() if not ln.startswith("requirements")]
    manifest.write_text("\n".join([*lines, f"requirements: {requirements}"]) + "\n")
    return copy


async def test_non_prod_deployments_share_one_host_process(
    settings: Settings, example_package: Path, tmp_path: Path
) -> None:
    runtime = Runtime(name="local-dev", stage="DEV")
    assert runtime.shares_hosts("DEV") and not Runtime(name="p", stage="PROD").shares_hosts("PROD")
    driver = LocalDriver(settings)
    try:
        first = snapshot_of(settings, example_package)
        weak = snapshot_of(settings, FIXTURES / "weak-model")
        endpoint_a, details_a = await deploy(driver, first, runtime, "dep-a")
        endpoint_b, details_b = await deploy(driver, weak, runtime, "dep-b")
        host = settings.runtime_dir.resolve() / runtime.name / ".host" / "host.sock"
        assert endpoint_a == f"unix:{host}/models/dep-a"
        assert endpoint_b == f"unix:{host}/models/dep-b"
        assert details_a["pid"] == details_b["pid"] and details_a["host"]
        assert await driver.locate(runtime, "dep-b") == endpoint_b
        sample = load_manifest(example_package).samples[2]
        async with endpoints.connect(endpoint_a, timeout=10) as (client, url):
            scored = (await client.post(f"{url}/score", json=sample.input)).json()
            health = (await client.get(f"{url}/health")).json()
        assert scored["is_fraud"] == sample.expected["is_fraud"]
        assert health == {"status": "ok", "model": "cc-fraud", "version": "1", "sha256": first.sha256}
        probe = await driver.probe(ProbeRequest(deployment_id="dep-a", runtime=runtime))
        assert probe.healthy and probe.endpoint == endpoint_a

        again, details_again = await deploy(driver, first, runtime, "dep-a")
        assert (again, details_again["pid"]) == (endpoint_a, details_a["pid"])
        second = snapshot_of(settings, example_package, version=2).model_copy(update={"sha256": weak.sha256})
        replaced, _ = await deploy(driver, second, runtime, "dep-a")  # another snapshot, same id
        assert (await endpoints.get(replaced, "/health", timeout=10)).json()["model"] == "weak-model"

        await driver.undeploy(UndeployRequest(deployment_id="dep-a", runtime=runtime))
        assert not driver.workdir(runtime, "dep-a").exists()
        assert (await endpoints.get(endpoint_a, "/health", timeout=10)).status_code == 404
        assert (await endpoints.get(endpoint_b, "/health", timeout=10)).status_code == 200
        await driver.undeploy(UndeployRequest(deployment_id="dep-b", runtime=runtime))
        assert not alive(details_a["pid"]), "the host stops with its last deployment"
        assert list((settings.runtime_dir / runtime.name).iterdir()) == []
    finally:
        await driver.cleanup(CleanupRequest(runtime=runtime))


async def test_a_dead_host_is_brought_back_on_its_port(settings: Settings) -> None:
    runtime = Runtime(name="local-dev", stage="DEV")
    driver = LocalDriver(settings)
    try:
        snapshot = snapshot_of(settings, FIXTURES / "weak-model")
        endpoint, details = await deploy(driver, snapshot, runtime, "dep-host")
        os.killpg(details["pid"], signal.SIGKILL)
        probe = await driver.probe(ProbeRequest(deployment_id="dep-host", runtime=runtime))
        assert not probe.healthy and "shared model host" in probe.detail and "not running" in probe.detail
        request = OnlineDeployRequest(
            deployment_id="dep-host", snapshot=snapshot, runtime=runtime, stage="DEV"
        )
        restarted = await driver.restart(request, lambda note: None)
        assert restarted.endpoint == endpoint and restarted.details["pid"] != details["pid"]
        assert (await driver.probe(ProbeRequest(deployment_id="dep-host", runtime=runtime))).healthy
    finally:
        await driver.cleanup(CleanupRequest(runtime=runtime))
    assert processes_mentioning(str(settings.runtime_dir / runtime.name)) == []


async def test_a_host_that_does_not_answer_is_restarted_when_a_model_leaves(settings: Settings) -> None:
    """A wedged host (stopped: it answers nothing) cannot unload a leaving model: it is
    restarted on its socket instead, and the model that stays serves from the new one."""
    runtime = Runtime(name="local-dev", stage="DEV")
    driver = LocalDriver(settings)
    try:
        snapshot = snapshot_of(settings, FIXTURES / "weak-model")
        _, details = await deploy(driver, snapshot, runtime, "dep-leaving")
        staying, _ = await deploy(driver, snapshot, runtime, "dep-staying")
        os.kill(details["pid"], signal.SIGSTOP)
        await driver.undeploy(UndeployRequest(deployment_id="dep-leaving", runtime=runtime))
        assert not alive(details["pid"])
        assert (await endpoints.get(staying, "/health", timeout=10)).status_code == 200
        moved = await driver.probe(ProbeRequest(deployment_id="dep-staying", runtime=runtime))
        assert moved.healthy and moved.endpoint == staying
    finally:
        await driver.cleanup(CleanupRequest(runtime=runtime))


async def test_hosted_model_failures_and_refusals(settings: Settings, tmp_path: Path) -> None:
    runtime = Runtime(name="local-dev", stage="DEV")
    driver = LocalDriver(settings)
    try:
        endpoint, details = await deploy(
            driver, snapshot_of(settings, FIXTURES / "weak-model"), runtime, "dep-ok"
        )
        with pytest.raises(DeploymentFailedError) as caught:
            await deploy(driver, snapshot_of(settings, FIXTURES / "crash-model"), runtime, "dep-crash")
        assert "crash-model@1" in str(caught.value) and "init() fails on purpose" in str(caught.value)
        # a package the host refuses (409: requirements) is given a process of its own
        odd = snapshot_of(settings, package_with(tmp_path, "odd", '["no-such-package-mlc-test>=1"]'))
        with pytest.raises(DeploymentFailedError, match="exited during start"):
            await deploy(driver, odd, runtime, "dep-odd")
        assert not (settings.runtime_dir / runtime.name / ".host" / "models" / "dep-odd").exists()
        health = await endpoints.get(endpoint, "/health", timeout=10)
        assert health.status_code == 200, "the others serve on"
        # the failed models left the host without restarting it: the others kept answering
        assert alive(details["pid"])
        models = await endpoints.get(endpoint.rsplit("/models/", 1)[0], "/models", timeout=10)
        assert models.json()["models"] == ["dep-ok"]
    finally:
        await driver.cleanup(CleanupRequest(runtime=runtime))


async def test_batch_jobs_fork_from_the_warm_forkserver(
    driver: LocalDriver, settings: Settings, runtime: Runtime, tmp_path: Path
) -> None:
    from activities.runtimes.local.layout import BATCH_SUMMARY
    from activities.runtimes.local.servers import fork_client as _fork_client

    for _ in range(600):  # the first call starts it; it is ready after its imports
        if _fork_client(settings.home) is not None:
            break
        await asyncio.sleep(0.05)
    assert _fork_client(settings.home) is not None
    snapshot = snapshot_of(settings, FIXTURES / "weak-model")
    result = await driver.run_batch(
        BatchJobRequest(deployment_id="dep-forked", snapshot=snapshot, runtime=runtime, stage=runtime.stage),
        lambda note: None,
    )
    workdir = driver.workdir(runtime, "dep-forked")
    summary = json.loads((workdir / BATCH_SUMMARY).read_text().splitlines()[-1])
    assert summary["records"] == result.records > 0
    assert processes_mentioning(str(workdir)) == []
    source = tmp_path / "bad.jsonl"
    source.write_text('{"amount": "lots"}\n')
    with pytest.raises(DeploymentFailedError, match=r"exited with code 1(.|\n)*bad\.jsonl:1"):
        await driver.run_batch(
            BatchJobRequest(
                deployment_id="dep-forked-bad",
                snapshot=snapshot,
                runtime=runtime,
                stage=runtime.stage,
                input_path=str(source),
            ),
            lambda note: None,
        )


async def _warm_forkserver(settings: Settings) -> None:
    """Wait until this process's forkserver is ready: servers are forked from then on."""
    from activities.runtimes.local.servers import fork_client

    for _ in range(600):  # the first call starts it; it is ready after its imports
        if fork_client(settings.home) is not None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the forkserver did not get ready")


async def test_a_fifo_the_models_leave_at_the_host_log_does_not_stop_the_host(settings: Settings) -> None:
    runtime = Runtime(name="local-dev", stage="DEV")
    driver = LocalDriver(settings)
    await _warm_forkserver(settings)
    try:
        snapshot = snapshot_of(settings, FIXTURES / "weak-model")
        endpoint, details = await deploy(driver, snapshot, runtime, "dep-host")
        host_dir = settings.runtime_dir.resolve() / runtime.name / ".host"
        log = host_dir / "host.log"
        owner = host_dir.stat()
        # what the hosted models' code can do: it runs as the host's user, which owns the folder
        log.unlink()
        os.mkfifo(log, 0o600)
        os.chown(log, owner.st_uid, owner.st_gid)
        os.killpg(details["pid"], signal.SIGKILL)
        request = OnlineDeployRequest(
            deployment_id="dep-host", snapshot=snapshot, runtime=runtime, stage="DEV"
        )
        restarted = await asyncio.wait_for(driver.restart(request, lambda note: None), timeout=30)
        assert restarted.endpoint == endpoint and restarted.details["pid"] != details["pid"]
        assert (await driver.probe(ProbeRequest(deployment_id="dep-host", runtime=runtime))).healthy
        info = log.lstat()
        assert stat.S_ISREG(info.st_mode) and info.st_uid == owner.st_uid, "the FIFO was replaced by a log"
    finally:
        await driver.cleanup(CleanupRequest(runtime=runtime))


async def test_a_host_that_does_not_start_is_logged_as_a_warning(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = Runtime(name="local-dev", stage="DEV")
    driver = LocalDriver(settings)
    monkeypatch.setenv("MLC_HOST_MEMORY_MB", "lots")  # the host exits at once: not a number
    try:
        with pytest.raises(DeploymentFailedError, match="exited during start"):
            await deploy(driver, snapshot_of(settings, FIXTURES / "weak-model"), runtime, "dep-host")
    finally:
        await driver.cleanup(CleanupRequest(runtime=runtime))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    expected = "the shared model host of runtime local-dev exited during start"
    assert any(w.startswith(expected) for w in warnings), warnings
