"""Local vs docker runtime: deploy-to-healthy time and batch throughput, side by side.

Both runtimes are measured in one run on the same snapshot of the cc-fraud example, so
the ratios compare like with like on this machine:

* deploy-to-healthy: median of N deploys (new deployment id each, undeployed after), with
  the docker image already built; the first docker deploy, which may build the image, is
  reported separately. Local deploys are measured both ways: into the runtime's shared
  model host (the default of non-PROD local runtimes; a resident deployment keeps the host
  up, as any serving non-PROD model does; the deploy that started it is reported apart)
  and as a dedicated process (``hosting: dedicated``, what PROD gets). Docker deploys are
  measured as containers of their own (the docker default) and into a runtime with
  ``hosting: shared`` (one host container, a resident deployment keeping it up);
* batch: the cc-fraud evaluation records repeated up to ``--records``, scored by each
  runtime's batch job; records/second from the job's own timing (scoring only) and from
  wall time (including process or container start and model loading).

Needs the engine and base image of ``scripts/docker-engine.sh``.

    .venv/bin/python bench/bench_deploy.py --runs 5 --records 50000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import docker
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from activities.runtimes.base import (  # noqa: E402 (after the path setup)
    BatchJobRequest,
    OnlineDeployRequest,
    RuntimeDriver,
    UndeployRequest,
)
from activities.runtimes.docker.driver import DockerDriver  # noqa: E402
from activities.runtimes.local.driver import LocalDriver  # noqa: E402
from cli.examples import prepare_example_model  # noqa: E402
from mlc.artifacts import ArtifactStore, build_archive  # noqa: E402
from mlc.config import Settings  # noqa: E402
from mlc.domain import DockerSettings, HostingMode, ModelSnapshot, Runtime, RuntimeKind  # noqa: E402
from mlc.evaluation import load_evaluation  # noqa: E402
from mlc.manifest import load_manifest  # noqa: E402

BASE_IMAGE = "mlc-python:3.11-bookworm"


@dataclass
class KindResult:
    """What one runtime kind measured."""

    deploy_seconds: list[float]
    batch_wall_seconds: list[float]
    batch_job_seconds: list[float]
    records: int


def _ignore(_note: str) -> None:
    """Heartbeats go nowhere in a benchmark."""


def _snapshot(settings: Settings, package: Path) -> ModelSnapshot:
    manifest = load_manifest(package)
    return ModelSnapshot(
        model=manifest.name,
        version=1,
        sha256=ArtifactStore(settings.artifact_dir).put(build_archive(package)),
        service_tags=manifest.service_tags,
        entry_module=manifest.entry_module,
        requirements=manifest.requirements,
    )


def _scaled_input(package: Path, records: int, dest: Path) -> Path:
    """The evaluation records (label removed) repeated to ``records`` lines."""
    manifest = load_manifest(package)
    source = load_evaluation(manifest, package).records
    with dest.open("wb") as out:
        for record in itertools.islice(itertools.cycle(source), records):
            out.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
    return dest


async def _deploy_once(
    driver: RuntimeDriver, runtime: Runtime, snapshot: ModelSnapshot, image_seconds: list[float] | None = None
) -> float:
    """Seconds from deploy call to healthy endpoint; the deployment is removed afterwards.

    ``image_seconds`` receives the docker driver's image lookup time (``details["image_seconds"]``).
    """
    deployment_id = f"bench-{runtime.kind.value}-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    result = await driver.deploy_online(
        OnlineDeployRequest(deployment_id=deployment_id, snapshot=snapshot, runtime=runtime, stage="DEV"),
        _ignore,
    )
    elapsed = time.perf_counter() - started
    if image_seconds is not None and "image_seconds" in result.details:
        image_seconds.append(float(result.details["image_seconds"]))
    await driver.undeploy(UndeployRequest(deployment_id=deployment_id, runtime=runtime))
    return elapsed


async def _batch_once(
    driver: RuntimeDriver, runtime: Runtime, snapshot: ModelSnapshot, input_path: Path, result: KindResult
) -> None:
    """Run one batch job over ``input_path`` and record its wall and job times."""
    started = time.perf_counter()
    job = await driver.run_batch(
        BatchJobRequest(
            deployment_id=f"bench-{runtime.kind.value}-batch-{uuid.uuid4().hex[:8]}",
            snapshot=snapshot,
            runtime=runtime,
            stage="DEV",
            input_path=str(input_path),
        ),
        _ignore,
    )
    result.batch_wall_seconds.append(time.perf_counter() - started)
    result.batch_job_seconds.append(job.seconds)
    result.records = job.records


def _row(label: str, local: float, docker_value: float, unit: str) -> str:
    ratio = docker_value / local if local else float("nan")
    return f"{label:<40} {local:>10.3f} {docker_value:>10.3f} {ratio:>12.2f}  {unit}"


async def main() -> None:
    """Measure both runtimes and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="deploys per runtime (median)")
    parser.add_argument("--batch-runs", type=int, default=3, help="batch jobs per runtime (median)")
    parser.add_argument("--records", type=int, default=50_000, help="batch input size")
    parser.add_argument("--cpus", type=float, default=1.0, help="docker.cpus of the container")
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="remove this snapshot's model images first, so the first docker deploy builds",
    )
    parser.add_argument("--home", type=Path, help="MLC_HOME to use (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mlc-bench-") as tmp:
        settings = Settings.from_env(home=args.home or Path(tmp))
        package = prepare_example_model()
        snapshot = _snapshot(settings, package)
        input_path = _scaled_input(package, args.records, Path(tmp) / "input.jsonl")
        local_rt = Runtime(name="bench-local", kind=RuntimeKind.LOCAL, stage="DEV")
        docker_rt = Runtime(
            name="bench-docker",
            kind=RuntimeKind.DOCKER,
            stage="DEV",
            docker=DockerSettings(base_image=BASE_IMAGE, network_mode="host", cpus=args.cpus),
        )
        if args.rebuild:
            engine = docker.from_env(version="auto")
            for image in engine.images.list(filters={"label": f"mlc.sha256={snapshot.sha256}"}):
                engine.images.remove(image.id, force=True)
            engine.close()

        docker_driver = DockerDriver(settings)
        first_id = f"bench-docker-first-{uuid.uuid4().hex[:8]}"
        started = time.perf_counter()
        first = await docker_driver.deploy_online(
            OnlineDeployRequest(deployment_id=first_id, snapshot=snapshot, runtime=docker_rt, stage="DEV"),
            _ignore,
        )
        first_seconds = time.perf_counter() - started
        await docker_driver.undeploy(UndeployRequest(deployment_id=first_id, runtime=docker_rt))

        # Interleaved, so a change in machine load during the run hits both kinds alike.
        local_driver = LocalDriver(settings)
        own_rt = local_rt.model_copy(update={"name": "bench-local-own", "hosting": HostingMode.DEDICATED})
        local, dock = KindResult([], [], [], 0), KindResult([], [], [], 0)
        own: list[float] = []
        docker_shared: list[float] = []
        shared_rt = docker_rt.model_copy(
            update={"name": "bench-docker-shared", "hosting": HostingMode.SHARED}
        )
        image_seconds: list[float] = []
        started = time.perf_counter()
        resident = OnlineDeployRequest(
            deployment_id="bench-resident", snapshot=snapshot, runtime=local_rt, stage="DEV"
        )
        await local_driver.deploy_online(resident, _ignore)  # starts the runtime's shared host
        host_start_seconds = time.perf_counter() - started
        started = time.perf_counter()
        docker_resident = resident.model_copy(update={"runtime": shared_rt})
        await docker_driver.deploy_online(docker_resident, _ignore)  # starts its host container
        docker_host_seconds = time.perf_counter() - started
        for _ in range(args.runs):
            local.deploy_seconds.append(await _deploy_once(local_driver, local_rt, snapshot))
            own.append(await _deploy_once(local_driver, own_rt, snapshot))
            dock.deploy_seconds.append(await _deploy_once(docker_driver, docker_rt, snapshot, image_seconds))
            docker_shared.append(await _deploy_once(docker_driver, shared_rt, snapshot))
        await local_driver.undeploy(UndeployRequest(deployment_id="bench-resident", runtime=local_rt))
        await docker_driver.undeploy(UndeployRequest(deployment_id="bench-resident", runtime=shared_rt))
        for _ in range(args.batch_runs):
            await _batch_once(local_driver, local_rt, snapshot, input_path, local)
            await _batch_once(docker_driver, docker_rt, snapshot, input_path, dock)

    built = "built the image" if first.details.get("image_built") else "image was cached"
    print(f"cc-fraud@1 sha256 {snapshot.sha256[:12]}, docker base {BASE_IMAGE}, cpus={args.cpus}")
    print(
        f"first docker deploy ({built}): {first_seconds:.2f} s, of which image "
        f"{first.details.get('image_seconds', 0.0):.2f} s"
    )
    print()
    print(f"{'metric':<40} {'local':>10} {'docker':>10} {'docker/local':>12}")
    print(
        _row(
            f"deploy to healthy, median of {args.runs}",
            statistics.median(local.deploy_seconds),
            statistics.median(dock.deploy_seconds),
            "s (local: into the running shared host)",
        )
    )
    print(
        _row(
            "  local as a dedicated process",
            statistics.median(own),
            statistics.median(dock.deploy_seconds),
            "s",
        )
    )
    print(
        _row(
            "  docker into a shared host container",
            statistics.median(local.deploy_seconds),
            statistics.median(docker_shared),
            "s (hosting: shared)",
        )
    )
    print(
        _row(
            f"batch wall time, {local.records} records",
            statistics.median(local.batch_wall_seconds),
            statistics.median(dock.batch_wall_seconds),
            "s",
        )
    )
    print(
        _row(
            "batch records/s (job scoring time)",
            local.records / statistics.median(local.batch_job_seconds),
            dock.records / statistics.median(dock.batch_job_seconds),
            "rec/s",
        )
    )
    print(
        _row(
            "batch records/s (wall, incl. start+load)",
            local.records / statistics.median(local.batch_wall_seconds),
            dock.records / statistics.median(dock.batch_wall_seconds),
            "rec/s",
        )
    )
    print()
    print(f"first local deploy (started the shared host): {host_start_seconds:.2f} s")
    print(f"first shared docker deploy (started the host container): {docker_host_seconds:.2f} s")
    print("      docker shared", [round(s, 2) for s in docker_shared])
    print("deploy samples (s): local", [round(s, 2) for s in local.deploy_seconds])
    print("      local dedicated", [round(s, 2) for s in own])
    print("                    docker", [round(s, 2) for s in dock.deploy_seconds])
    if image_seconds:
        print(f"docker image lookup per deploy, median: {statistics.median(image_seconds):.3f} s")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")


if __name__ == "__main__":
    asyncio.run(main())
