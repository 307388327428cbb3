"""Deploy-to-healthy time of every way a model can be deployed here, and batch throughput.

What is measured, on one snapshot of the cc-fraud example, with its docker image built
already (the first docker deploy, which may build it, is reported apart):

* ``local shared``: into the local runtime's running shared model host (non-PROD local
  default; a resident deployment keeps the host up, as any serving model does);
* ``local dedicated``: a process of its own (``hosting: dedicated``, what PROD gets);
* ``docker dedicated``: a container of its own (the docker default, PROD's), claiming the
  runtime's warm spare when one is there (see ``activities/runtimes/docker/spares.py``).
  Spares live only while their snapshot serves on the runtime, so a resident deployment of
  the snapshot stays up during the run: what a restart, a reconciler's repair or another
  deployment of a serving snapshot costs;
* ``docker dedicated cold``: the same with the runtime's spares removed first (untimed):
  what a snapshot's first deploy on a runtime costs, or one after all its deployments left;
* ``docker shared``: into a docker runtime's running host container (``hosting: shared``).

Fairness rules:

* every variant is timed from the same point to the same point: from the driver's
  ``deploy_online`` call to its return, which each driver makes only after the
  deployment's own ``/health`` answered 200 (engine and package work included; the
  workflow's bookkeeping around it excluded for all alike); the undeploy after each deploy
  is not timed;
* the variants are interleaved, in an order rotated every round (so none always runs
  right after another's leftover work, e.g. a spare starting in the background), and
  repeated ``--runs`` times; each is reported as median and spread (min-max), with the
  machine's load average at start and end;
* a deploy or undeploy that raises fails the run (no sample is dropped);
* the docker containers run with the limits a runtime gives them (``--cpus``, default 1);
* batch jobs (local and docker) are interleaved the same way and reported as medians.

Needs the engine and base image of ``scripts/docker-engine.sh``.

    .venv/bin/python bench/bench_deploy.py --runs 7 --records 50000
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
from dataclasses import dataclass, field
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
from activities.runtimes.docker import spares  # noqa: E402
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
class Variant:
    """One way of deploying, and what it measured."""

    label: str
    driver: RuntimeDriver
    runtime: Runtime
    cold: bool = False
    """Remove the runtime's spare containers before each deploy (untimed)."""
    seconds: list[float] = field(default_factory=list)
    claimed: int = 0
    """Deploys that claimed a spare container."""


@dataclass
class BatchResult:
    """What one runtime kind's batch jobs measured."""

    wall_seconds: list[float] = field(default_factory=list)
    job_seconds: list[float] = field(default_factory=list)
    records: int = 0


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


async def _deploy_once(variant: Variant, snapshot: ModelSnapshot) -> float:
    """Seconds from the ``deploy_online`` call to its return (the driver returns once the
    deployment's own ``/health`` answered 200); the deployment is removed afterwards, untimed.

    Raises whatever the deploy or the undeploy raised: a run with an error fails.
    """
    if variant.cold:  # untimed: no spare to claim, as on a snapshot's first deploy here
        await spares.drop_spares(variant.driver.settings, variant.runtime)
    deployment_id = f"bench-{variant.runtime.name}-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    result = await variant.driver.deploy_online(
        OnlineDeployRequest(
            deployment_id=deployment_id, snapshot=snapshot, runtime=variant.runtime, stage="DEV"
        ),
        _ignore,
    )
    elapsed = time.perf_counter() - started
    if result.details.get("spare"):
        variant.claimed += 1
    await variant.driver.undeploy(UndeployRequest(deployment_id=deployment_id, runtime=variant.runtime))
    return elapsed


async def _batch_once(
    driver: RuntimeDriver, runtime: Runtime, snapshot: ModelSnapshot, input_path: Path
) -> tuple[float, float, int]:
    """Run one batch job over ``input_path``: (wall seconds, job seconds, records)."""
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
    return time.perf_counter() - started, job.seconds, job.records


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.3f} s  ({min(values):.3f}-{max(values):.3f})"


def _rotated(items: list[Variant], by: int) -> list[Variant]:
    by %= len(items)
    return items[by:] + items[:by]


async def main() -> None:
    """Measure every variant, interleaved, and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="deploys per variant (median, spread)")
    parser.add_argument("--batch-runs", type=int, default=3, help="batch jobs per runtime kind (median)")
    parser.add_argument("--records", type=int, default=50_000, help="batch input size")
    parser.add_argument("--cpus", type=float, default=1.0, help="docker.cpus of the containers")
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="remove this snapshot's model images first, so the first docker deploy builds",
    )
    parser.add_argument("--home", type=Path, help="MLC_HOME to use (default: a temporary one)")
    args = parser.parse_args()
    load_start = os.getloadavg()

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

        local_driver, docker_driver = LocalDriver(settings), DockerDriver(settings)
        shared_docker_rt = docker_rt.model_copy(
            update={"name": "bench-docker-shared", "hosting": HostingMode.SHARED}
        )
        variants = [
            Variant("local shared", local_driver, local_rt),
            Variant(
                "local dedicated",
                local_driver,
                local_rt.model_copy(update={"name": "bench-local-own", "hosting": HostingMode.DEDICATED}),
            ),
            Variant("docker dedicated (spare)", docker_driver, docker_rt),
            Variant(
                "docker dedicated cold",
                docker_driver,
                docker_rt.model_copy(update={"name": "bench-docker-cold"}),
                cold=True,
            ),
            Variant("docker shared", docker_driver, shared_docker_rt),
        ]
        first_id = f"bench-docker-first-{uuid.uuid4().hex[:8]}"
        started = time.perf_counter()
        first = await docker_driver.deploy_online(
            OnlineDeployRequest(deployment_id=first_id, snapshot=snapshot, runtime=docker_rt, stage="DEV"),
            _ignore,
        )
        first_seconds = time.perf_counter() - started  # it stays: the snapshot serves here

        resident = OnlineDeployRequest(
            deployment_id="bench-resident", snapshot=snapshot, runtime=local_rt, stage="DEV"
        )
        docker_resident = resident.model_copy(update={"runtime": shared_docker_rt})
        started = time.perf_counter()
        await local_driver.deploy_online(resident, _ignore)  # starts the runtime's shared host
        host_start_seconds = time.perf_counter() - started
        started = time.perf_counter()
        await docker_driver.deploy_online(docker_resident, _ignore)  # starts its host container
        docker_host_seconds = time.perf_counter() - started
        batches = {"local": BatchResult(), "docker": BatchResult()}
        try:
            for round_ in range(args.runs):
                for variant in _rotated(variants, round_):
                    variant.seconds.append(await _deploy_once(variant, snapshot))
            kinds = [("local", local_driver, local_rt), ("docker", docker_driver, docker_rt)]
            for round_ in range(args.batch_runs):
                for name, driver, runtime in kinds[round_ % 2 :] + kinds[: round_ % 2]:
                    wall, job, records = await _batch_once(driver, runtime, snapshot, input_path)
                    batches[name].wall_seconds.append(wall)
                    batches[name].job_seconds.append(job)
                    batches[name].records = records
        finally:
            await docker_driver.undeploy(UndeployRequest(deployment_id=first_id, runtime=docker_rt))
            await local_driver.undeploy(UndeployRequest(deployment_id="bench-resident", runtime=local_rt))
            await docker_driver.undeploy(
                UndeployRequest(deployment_id="bench-resident", runtime=shared_docker_rt)
            )
            for variant in variants:
                if variant.runtime.kind is RuntimeKind.DOCKER:
                    await spares.drop_spares(settings, variant.runtime)
            await spares.settled()

    built = "built the image" if first.details.get("image_built") else "image was cached"
    print(
        f"cc-fraud@1 sha256 {snapshot.sha256[:12]}, docker base {BASE_IMAGE}, "
        f"cpus={args.cpus}, {os.cpu_count()} cores"
    )
    print(f"load average (1 min) at start {load_start[0]:.1f}, at end {os.getloadavg()[0]:.1f}")
    print(
        f"first docker deploy ({built}): {first_seconds:.2f} s, of which image "
        f"{first.details.get('image_seconds', 0.0):.2f} s"
    )
    print(f"first local deploy (started the shared host): {host_start_seconds:.2f} s")
    print(f"first shared docker deploy (started the host container): {docker_host_seconds:.2f} s")
    print()
    print(f"deploy to healthy (deploy_online call to return), {args.runs} runs interleaved: median (min-max)")
    for variant in variants:
        note = (
            f"  [{variant.claimed}/{len(variant.seconds)} claimed a spare]"
            if variant.runtime.kind is RuntimeKind.DOCKER and not variant.runtime.shares_hosts("DEV")
            else ""
        )
        print(f"  {variant.label:<28} {_spread(variant.seconds)}{note}")
        print(f"  {'':<28} samples {[round(s, 3) for s in variant.seconds]}")
    if args.batch_runs:
        print()
        print(
            f"batch, {batches['local'].records} records, {args.batch_runs} jobs each interleaved: "
            "median (min-max)"
        )
        for name, result in batches.items():
            rate = result.records / statistics.median(result.job_seconds)
            print(
                f"  {name:<8} wall {_spread(result.wall_seconds)}   "
                f"scoring {rate:,.0f} rec/s (job's own timing)"
            )


if __name__ == "__main__":
    asyncio.run(main())
