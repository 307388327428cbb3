"""Cost of a runtime's gateway: requests/s and p99 through it vs straight to the model server.

One local runtime with a gateway, one deployment of the example cc-fraud model routed
behind ``/models/cc-fraud``, and ``wrk`` posting one record per request alternately to the
model server's own endpoint and to the stable endpoint, in the same run, so both see the
same machine. The gateway (two nginx tiers, see :mod:`activities.runtimes.gateway`) should
cost under 10 % of throughput. Local model servers listen on a unix socket, which ``wrk``
cannot reach: then only the stable endpoint is measured (compare it with an earlier run).
With ``--shadow`` a second deployment receives a mirrored
copy of every request (the shadow strategy's cost).

    .venv/bin/python bench/bench_gateway.py --duration 10 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from activities.runtimes.base import CleanupRequest, OnlineDeployRequest  # noqa: E402 (after the path setup)
from activities.runtimes.local.driver import LocalDriver  # noqa: E402
from activities.runtimes.local.gateway import LocalGateway  # noqa: E402
from bench.bench_scoring import Load, ensure_wrk, wrk_run  # noqa: E402
from cli.examples import prepare_example_model  # noqa: E402
from mlc.artifacts import ArtifactStore, build_archive  # noqa: E402
from mlc.config import Settings  # noqa: E402
from mlc.domain import GatewaySettings, ModelSnapshot, Runtime, TrafficRoute  # noqa: E402
from mlc.manifest import load_manifest  # noqa: E402

RECORD = {
    "amount": 2450.0,
    "hour": 3,
    "merchant_risk": 0.85,
    "distance_from_home": 4200.0,
    "foreign": True,
    "card_present": False,
    "velocity_24h": 9,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _deploy(driver: LocalDriver, runtime: Runtime, snapshot: ModelSnapshot) -> tuple[str, str]:
    deployment_id = f"cc-fraud-v{snapshot.version}-{uuid.uuid4().hex[:8]}"
    result = await driver.deploy_online(
        OnlineDeployRequest(deployment_id=deployment_id, snapshot=snapshot, runtime=runtime, stage="DEV"),
        lambda _note: None,
    )
    return deployment_id, result.endpoint


async def run(args: argparse.Namespace) -> None:
    """Deploy, route, measure direct and through the gateway alternately, report."""
    wrk = ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="mlc-bench-gateway-"))
    settings = Settings.from_env(home=work / "home")
    runtime = Runtime(name="bench-gateway", stage="DEV", gateway=GatewaySettings(port=_free_port()))
    package = prepare_example_model()
    manifest = load_manifest(package)
    sha = ArtifactStore(settings.artifact_dir).put(build_archive(package))
    snapshots = [
        ModelSnapshot(
            model=manifest.name,
            version=v,
            sha256=sha,
            service_tags=manifest.service_tags,
            entry_module=manifest.entry_module,
            requirements=manifest.requirements,
        )
        for v in (1, 2)
    ]
    driver = LocalDriver(settings)
    body = work / "one.json"
    body.write_text(json.dumps(RECORD))
    try:
        primary, direct = await _deploy(driver, runtime, snapshots[0])
        routes = [TrafficRoute(deployment_id=primary, version=1)]
        if args.shadow:
            shadow, _ = await _deploy(driver, runtime, snapshots[1])
            routes.append(TrafficRoute(deployment_id=shadow, version=2, weight=0, shadow=True))
        routed = await driver.route(runtime, manifest.name, routes, lambda _note: None)
        targets = {"gateway": f"{routed.endpoint}/score"}
        if not direct.startswith("unix:"):  # wrk speaks TCP only: a local server's socket is not measured
            targets = {"direct": f"{direct}/score", **targets}
        results: dict[str, list[Load]] = {name: [] for name in targets}
        for _ in range(args.rounds):
            for name, url in targets.items():
                options = {"threads": args.threads, "connections": args.connections, "work": work}
                wrk_run(wrk, url, body, seconds=args.warmup, **options)
                results[name].append(wrk_run(wrk, url, body, seconds=args.duration, **options))
        report(results, args)
    finally:
        await driver.cleanup(CleanupRequest(runtime=runtime))
        await LocalGateway(settings, runtime).stop()


def report(results: dict[str, list[Load]], args: argparse.Namespace) -> None:
    """Median of the rounds per target, and the gateway's ratios to direct."""
    print(
        f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores; wrk -t{args.threads} "
        f"-c{args.connections} -d{args.duration}s x {args.rounds} rounds; 1 record per request"
        + ("; shadow mirrored" if args.shadow else "")
    )
    median: dict[str, tuple[float, float, int]] = {}
    for name, loads in results.items():
        median[name] = (
            statistics.median(x.rps for x in loads),
            statistics.median(x.p99_ms for x in loads),
            sum(x.errors for x in loads),
        )
        runs = ", ".join(f"{x.rps:.0f}" for x in loads)
        rps, p99, errors = median[name]
        print(f"{name:8} {rps:8.0f} req/s  p99 {p99:6.2f} ms  errors {errors}  (rounds: {runs})")
    if "direct" not in median:
        return
    (direct_rps, direct_p99, _), (gateway_rps, gateway_p99, _) = median["direct"], median["gateway"]
    print(
        f"gateway / direct: throughput {gateway_rps / direct_rps:.3f} "
        f"(cost {100 * (1 - gateway_rps / direct_rps):.1f} %), p99 {gateway_p99 / direct_p99:.2f}x"
    )


def main() -> None:
    """Parse the options and run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating direct/gateway measurements")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shadow", action="store_true", help="mirror every request to a second deployment")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
