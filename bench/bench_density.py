"""Many models on one host: one multi-model process vs one process per model, in one run.

N copies of the cc-fraud example (separate package folders, so N distinct models as far
as the server knows) are served two ways:

* one ``python -m mlc.serving serve-many`` process, every model loaded (one request each);
* N ``python -m mlc.serving serve`` processes, as the local runtime starts them today.

With ``--runtime``, the same comparison goes through the local runtime's driver as a
lifecycle would: N deployments of one cc-fraud snapshot on a DEV runtime (its shared model
host, the default) against N on a runtime with ``hosting: dedicated`` (one server each,
forked from the warm forkserver), with the deploy time of each.

Memory is PSS from ``/proc/PID/smaps_rollup`` (shared pages split among the processes that
share them) and RSS, summed over processes. Throughput comes from the same client for both:
``--concurrency`` asyncio workers send single-record requests round robin over the N models
for ``--duration`` seconds. The client is in Python, so it may bound both rates: the figure
that matters is that the shared process serves as fast as the separate ones.

    .venv/bin/python bench/bench_density.py --models 50
    .venv/bin/python bench/bench_density.py --models 50 --runtime
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.examples import prepare_example_model  # noqa: E402 (after the path setup)

RECORD = {
    "amount": 48.9,
    "hour": 10,
    "merchant_risk": 0.12,
    "distance_from_home": 5.5,
    "foreign": False,
    "card_present": True,
    "velocity_24h": 2,
}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def memory_mb(pid: int) -> tuple[float, float]:
    """(PSS, RSS) of one process in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        values[key] = float(rest.split()[0]) / 1024
    return values["Pss"], values["Rss"]


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A server process in its own group."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mlc.serving", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd="/",
        )


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every group, then wait."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


async def wait_healthy(urls: list[str], timeout: float = 300.0) -> None:
    """Until every URL answers 200."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as client:
        for url in urls:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(url)).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"{url} not healthy in {timeout:.0f} s")
                await asyncio.sleep(0.1)


async def load(urls: list[str], concurrency: int, seconds: float) -> float:
    """Requests/s of ``concurrency`` workers posting one record round robin over ``urls``."""
    done = 0
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=10.0, limits=limits) as client:

        async def worker(offset: int) -> None:
            nonlocal done
            for url in itertools.islice(itertools.cycle(urls), offset, None):
                if time.monotonic() > stop_at:
                    return
                response = await client.post(url, json=RECORD)
                response.raise_for_status()
                done += 1

        started = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return done / (time.monotonic() - started)


async def through_runtime(args: argparse.Namespace, work: Path, source: Path) -> None:
    """N deployments into the local runtime's shared host vs N dedicated ones; print both."""
    from activities.runtimes.base import OnlineDeployRequest, UndeployRequest
    from activities.runtimes.local.driver import LocalDriver
    from mlc.artifacts import ArtifactStore, build_archive
    from mlc.config import Settings
    from mlc.domain import HostingMode, ModelSnapshot, Runtime
    from mlc.manifest import load_manifest

    n = args.models
    settings = Settings.from_env(home=work / "home")
    manifest = load_manifest(source)
    snapshot = ModelSnapshot(
        model=manifest.name,
        version=1,
        sha256=ArtifactStore(settings.artifact_dir).put(build_archive(source)),
        service_tags=manifest.service_tags,
        entry_module=manifest.entry_module,
        requirements=manifest.requirements,
    )
    driver = LocalDriver(settings)
    per_model = 0.0
    rows: dict[str, tuple[list[float], list[float], float, float, float]] = {}
    for label, runtime in (
        ("shared host (DEV default)", Runtime(name="bench-shared", stage="DEV")),
        ("dedicated processes", Runtime(name="bench-own", stage="DEV", hosting=HostingMode.DEDICATED)),
    ):
        times, endpoints, pids = [], [], set()
        one = (0.0, 0.0)
        try:
            for i in range(n):
                started = time.perf_counter()
                result = await driver.deploy_online(
                    OnlineDeployRequest(
                        deployment_id=f"dens-{i:03d}", snapshot=snapshot, runtime=runtime, stage="DEV"
                    ),
                    lambda note: None,
                )
                times.append(time.perf_counter() - started)
                endpoints.append(result.endpoint)
                pids.add(int(result.details["pid"]))
                if i == 0:
                    one = memory_mb(int(result.details["pid"]))
            sums = [memory_mb(pid) for pid in pids]
            rps = await load([f"{e}/score" for e in endpoints], args.concurrency, args.duration)
        finally:
            for i in range(n):
                await driver.undeploy(UndeployRequest(deployment_id=f"dens-{i:03d}", runtime=runtime))
        rows[label] = (times, [len(pids)], sum(m[0] for m in sums), sum(m[1] for m in sums), rps)
        if label.startswith("shared"):
            per_model = (sums[0][1] - one[1]) / max(1, n - 1)
    print(f"through the local runtime: {n} deployments of cc-fraud@1, load average {os.getloadavg()[0]:.1f}")
    print(
        f"{'':<28} {'processes':>9} {'PSS MB':>9} {'RSS MB':>9} {'req/s':>8} {'deploy p50':>11} {'max s':>7}"
    )
    for label, (times, procs, pss, rss, rps) in rows.items():
        print(
            f"{label:<28} {procs[0]:>9} {pss:>9.0f} {rss:>9.0f} {rps:>8.0f} "
            f"{statistics.median(times):>11.3f} {max(times):>7.2f}"
        )
    print(f"RSS per additional hosted model: {per_model:.2f} MB")
    print("(dedicated servers are forked from the forkserver, so they share its pages: PSS counts that)")


async def main() -> None:
    """Build N packages, measure the host, then N processes, and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--runtime", action="store_true", help="also compare through the local runtime")
    args = parser.parse_args()
    n = args.models
    with tempfile.TemporaryDirectory(prefix="mlc-bench-density-") as tmp:
        work = Path(tmp)
        source = prepare_example_model(work / "cc-fraud")
        models = work / "models"
        for i in range(n):  # hard links: N packages without N copies on disk
            shutil.copytree(source, models / f"dep-{i:03d}", copy_function=os.link)

        port = free_port()
        host = start(["serve-many", "--models-dir", str(models), "--port", str(port)], work / "host.log")
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_healthy([f"{base}/health"])
            empty = memory_mb(host.pid)
            urls = [f"{base}/models/dep-{i:03d}/score" for i in range(n)]
            async with httpx.AsyncClient(timeout=60.0) as client:
                (await client.post(urls[0], json=RECORD)).raise_for_status()
                one = memory_mb(host.pid)
                for url in urls[1:]:
                    (await client.post(url, json=RECORD)).raise_for_status()
            full = memory_mb(host.pid)
            host_rps = await load(urls, args.concurrency, args.duration)
        finally:
            stop([host])

        procs: list[subprocess.Popen[bytes]] = []
        ports = [free_port() for _ in range(n)]
        try:
            for i, p in enumerate(ports):
                procs.append(
                    start(
                        ["serve", "--package", str(models / f"dep-{i:03d}"), "--port", str(p)],
                        work / f"s{i}.log",
                    )
                )
                if i % 4 == 3:  # let them import a few at a time on two cores
                    await wait_healthy([f"http://127.0.0.1:{q}/health" for q in ports[i - 3 : i + 1]])
            await wait_healthy([f"http://127.0.0.1:{p}/health" for p in ports])
            sums = [memory_mb(proc.pid) for proc in procs]
            procs_rps = await load(
                [f"http://127.0.0.1:{p}/score" for p in ports], args.concurrency, args.duration
            )
        finally:
            stop(procs)

        if args.runtime:
            await through_runtime(args, work, source)
            print()

    pss = sum(s[0] for s in sums)
    rss = sum(s[1] for s in sums)
    print(f"{n} copies of cc-fraud; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
    print(f"{'':<44} {'PSS MB':>9} {'RSS MB':>9}")
    print(f"{'one host process, no model loaded':<44} {empty[0]:>9.0f} {empty[1]:>9.0f}")
    print(f"{'one host process, 1 model':<44} {one[0]:>9.0f} {one[1]:>9.0f}")
    print(f"{f'one host process, {n} models':<44} {full[0]:>9.0f} {full[1]:>9.0f}")
    print(f"{f'{n} processes, one model each (sum)':<44} {pss:>9.0f} {rss:>9.0f}")
    per_model = (full[1] - one[1]) / max(1, n - 1)
    print(f"RSS per additional hosted model: {per_model:.2f} MB (a separate process: {rss / n:.0f} MB RSS)")
    print(f"memory of {n} models, host / processes: {full[0] / pss:.1%} of PSS, {full[1] / rss:.1%} of RSS")
    print(
        f"throughput, {args.concurrency} concurrent single-record requests round robin over {n} models, "
        f"{args.duration:.0f} s: host {host_rps:.0f} req/s, {n} processes {procs_rps:.0f} req/s "
        f"({host_rps / procs_rps:.2f}x)"
    )


if __name__ == "__main__":
    asyncio.run(main())
