"""The local runtime driver and the stage-test activity, with real server processes."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.runtimes.base import (
    BatchJobRequest,
    CleanupRequest,
    OnlineDeployRequest,
    UndeployRequest,
)
from activities.runtimes.local import LocalDriver
from activities.testing import TestingActivities
from mlc.artifacts import ArtifactStore, build_archive
from mlc.config import Settings
from mlc.domain import (
    Deployment,
    DeploymentState,
    Mode,
    ModelSnapshot,
    Runtime,
    TestKind,
)
from mlc.errors import DeploymentFailedError
from mlc.evaluation import load_evaluation
from mlc.manifest import load_manifest
from mlc.test_payloads import RunStageTestsInput

FIXTURES = Path(__file__).parent / "fixtures" / "models"
BOTH_TESTS = (TestKind.SMOKE, TestKind.METRICS)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env(home=tmp_path / "home")


@pytest.fixture
def runtime() -> Runtime:
    return Runtime(name="local-sit", stage="SIT")


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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}/cmdline").exists() and b"mlc.serving" in Path(f"/proc/{pid}/cmdline").read_bytes()
    )


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
    assert endpoint == f"http://127.0.0.1:{details['port']}"
    assert Path(details["log"]).is_file()
    sample = load_manifest(example_package).samples[2]
    async with httpx.AsyncClient() as client:
        scored = (await client.post(f"{endpoint}/score", json=sample.input)).json()
        health = (await client.get(f"{endpoint}/health")).json()
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
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{endpoint}/health")).status_code == 200


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


async def test_stage_tests_pass_for_the_example_online(
    driver: LocalDriver, settings: Settings, runtime: Runtime, example_package: Path
) -> None:
    snapshot = snapshot_of(settings, example_package)
    endpoint, _ = await deploy(driver, snapshot, runtime, "dep-tests")
    deployment = deployment_of(snapshot, runtime, Mode.ONLINE, endpoint=endpoint)
    smoke, metrics = await run_tests(
        settings,
        RunStageTestsInput(stage="SIT", snapshot=snapshot, deployment=deployment, tests=BOTH_TESTS),
    )
    assert (smoke.test, smoke.passed, smoke.summary) == (TestKind.SMOKE, True, "4/4 samples match")
    assert metrics.passed, metrics.summary
    assert metrics.metrics["auc"] >= 0.85
    assert metrics.metrics["records"] == 2_000


async def test_weak_model_fails_metrics_in_both_modes(
    driver: LocalDriver, settings: Settings, runtime: Runtime
) -> None:
    snapshot = snapshot_of(settings, FIXTURES / "weak-model")
    endpoint, _ = await deploy(driver, snapshot, runtime, "dep-weak")
    online = deployment_of(snapshot, runtime, Mode.ONLINE, endpoint=endpoint)
    smoke, metrics = await run_tests(
        settings, RunStageTestsInput(stage="SIT", snapshot=snapshot, deployment=online, tests=BOTH_TESTS)
    )
    assert smoke.passed
    assert (metrics.passed, metrics.summary) == (False, "auc 0.500 < 0.800")

    job = await driver.run_batch(
        BatchJobRequest(deployment_id="dep-weak-batch", snapshot=snapshot, runtime=runtime, stage="SIT"),
        lambda note: None,
    )
    batch = deployment_of(snapshot, runtime, Mode.BATCH)
    smoke, metrics = await run_tests(
        settings,
        RunStageTestsInput(
            stage="SIT", snapshot=snapshot, deployment=batch, tests=BOTH_TESTS, batch_output=job.output_path
        ),
    )
    assert smoke.passed
    assert (metrics.passed, metrics.summary) == (False, "auc 0.500 < 0.800")


async def test_stage_tests_errors(settings: Settings, runtime: Runtime) -> None:
    snapshot = snapshot_of(settings, FIXTURES / "weak-model")
    with socket_port() as port:
        unreachable = deployment_of(snapshot, runtime, Mode.ONLINE, endpoint=f"http://127.0.0.1:{port}")
        with pytest.raises(ApplicationError) as caught:
            await run_tests(
                settings,
                RunStageTestsInput(stage="SIT", snapshot=snapshot, deployment=unreachable, tests=BOTH_TESTS),
            )
    assert not caught.value.non_retryable
    assert "unreachable" in str(caught.value)

    missing = snapshot.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(ApplicationError) as caught:
        await run_tests(
            settings,
            RunStageTestsInput(stage="SIT", snapshot=missing, deployment=unreachable, tests=BOTH_TESTS),
        )
    assert caught.value.non_retryable
    assert caught.value.type == "NotFoundError"
    assert "artifact 000000000000 is missing" in str(caught.value)


class socket_port:
    """A 127.0.0.1 port that is bound but not listening, so connections are refused."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
