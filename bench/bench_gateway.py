"""Cost of a runtime's gateway: requests/s and p99 through it vs straight to the model server.

One model server (the product's ``python -m mlc.serving serve``, this interpreter, the
example cc-fraud model), a local runtime's gateway (both nginx tiers, rendered and started
by the product code, see :mod:`activities.runtimes.gateway`) routing ``/models/cc-fraud``
to it, and ``wrk`` posting one record per request to the server itself (``direct``) and to
the stable endpoint (``gateway``). The goal is a gateway costing under 10 % of throughput.

Fairness rules (a flattering ratio is a bug):

- **Same server.** Both sides reach the *same* server process. Local deployments listen on
  a unix socket only, which ``wrk`` cannot reach, so this server listens on TCP
  (``--port``, the command a local deployment runs with ``--uds`` instead), and the
  gateway reaches it over TCP too: the server does exactly the same work for both sides,
  and the gateway side pays its whole extra path (edge, unix socket, routing tier, a TCP
  hop to the server). A deployed local server is reached over a unix socket, which costs
  nginx and the server a little less: this bench does not flatter the gateway by that.
- **Same request, same load.** The same body (one record), the same ``wrk`` threads,
  connections, duration and warm-up (discarded) for both sides.
- **Interleaved and repeated.** ``--rounds`` rounds; each round measures both sides back
  to back, the order alternating (direct first, then gateway first), so drift in the
  machine's load hits both. The report gives the median of the rounds, the spread
  (min-max) and each round's value, the load average before and after, the cores.
- **Errors fail the run.** Any non-2xx, connect, read, write error or timeout in any
  measurement makes the bench exit non-zero after printing what it measured.
- **Where the load generator runs.** By default ``wrk`` shares all cores with nginx and
  the server, as on a small host; then part of the "gateway cost" is ``wrk`` and nginx
  competing for the same cores. ``--pin LOAD:SERVER[:GATEWAY]`` runs ``wrk`` on the
  ``LOAD`` cores, the model server on the ``SERVER`` cores and both nginx tiers on the
  ``GATEWAY`` cores (default: the server's), for both sides alike: ``--pin 0:1`` is a
  machine where the load generator does not share the servers' cores and the gateway
  competes with the model server for its core (nginx's whole CPU cost shows as lost
  throughput); ``--pin 0:1:0`` gives the model server a core of its own, as on a host
  with a core to spare for the gateway (nginx then competes with ``wrk`` instead). Reports
  say which was used. Pinning means something only where nothing else runs on those cores:
  on a core shared with other work, the scheduler gives each runnable process its share,
  so the gateway side's three processes get more of the core than the direct side's one
  (on the shared machine of issue 20 the gateway side came out faster than direct).

Under each side's numbers the bench prints the CPU time (user + system, from ``/proc``) that
the model server and each nginx tier spent per request, medians of the rounds: where the
cost goes (nginx's own work, or the model server's, which merges fewer concurrent requests
into one call when they reach it through the gateway; see ``docs/gateway.md``).

With ``--shadow`` a second server receives a mirrored copy of every gateway request (the
shadow strategy's cost; the direct side still calls one server).

    .venv/bin/python bench/bench_gateway.py --duration 10 --rounds 5
    .venv/bin/python bench/bench_gateway.py --duration 10 --rounds 5 --pin 0:1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from activities.runtimes.base import CleanupRequest  # noqa: E402 (after the path setup)
from activities.runtimes.local.driver import LocalDriver  # noqa: E402
from activities.runtimes.local.gateway import LocalGateway  # noqa: E402
from bench.bench_scoring import LUA, ensure_wrk  # noqa: E402
from cli.examples import prepare_example_model  # noqa: E402
from mlc.config import Settings  # noqa: E402
from mlc.domain import GatewaySettings, Runtime, TrafficRoute  # noqa: E402
from mlc.serving.app import VERSION_ENV  # noqa: E402

RECORD = {
    "amount": 2450.0,
    "hour": 3,
    "merchant_risk": 0.85,
    "distance_from_home": 4200.0,
    "foreign": True,
    "card_present": False,
    "velocity_24h": 9,
}
MODEL = "cc-fraud"
WRK_SLACK_SECONDS = 30.0


@dataclass
class Load:
    """What one wrk run measured."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: dict[str, float] = field(default_factory=dict)
    """CPU time (user + system) per request of each serving process, in microseconds."""


_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """User + system CPU seconds so far of each named group of processes."""
    spent = {}
    for name, group in pids.items():
        total = 0
        for pid in group:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        spent[name] = total / _TICKS
    return spent


def _workers(master: int | None) -> list[int]:
    """The nginx worker processes of ``master``."""
    if master is None:
        return []
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [int(x) for x in children]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cores(text: str) -> set[int]:
    """``0-1,3`` as a set of core numbers."""
    cores: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cores.update(range(int(low), int(high or low) + 1))
    return cores


class ServersOnTcp(LocalDriver):
    """The local driver, locating the bench's TCP servers instead of deployed ones: the
    gateway's files, processes and reloads are the product's, only the backend differs."""

    def __init__(self, settings: Settings, servers: dict[str, str]) -> None:
        super().__init__(settings)
        self.servers = servers

    async def locate(self, runtime: Runtime, deployment_id: str) -> str:
        """The endpoint of the bench's server for ``deployment_id``."""
        return self.servers[deployment_id]


async def _start_server(
    pin: list[str], package: Path, version: int, work: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """The model server on a TCP port of its own, once it answers ``/health``."""
    port = _free_port()
    log = (work / f"server-{version}.log").open("wb")
    process = subprocess.Popen(
        [*pin, sys.executable, "-m", "mlc.serving", "serve", "--package", str(package), "--port", str(port)],
        env={**os.environ, VERSION_ENV: str(version), "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(trust_env=False) as http:
        for _ in range(600):
            if process.poll() is not None:
                raise SystemExit(
                    f"model server exited: {(work / f'server-{version}.log').read_text()[-2000:]}"
                )
            try:
                if (await http.get(f"{endpoint}/health")).status_code == 200:
                    return process, endpoint
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    process.kill()
    raise SystemExit("model server did not answer /health within 60 s")


def wrk_run(
    wrk: list[str],
    url: str,
    body: Path,
    args: argparse.Namespace,
    seconds: int,
    work: Path,
    pids: dict[str, list[int]] | None = None,
) -> Load:
    """One bounded wrk run against ``url`` posting ``body``, with the CPU time ``pids``
    spent per request meanwhile."""
    script = work / "post.lua"
    before = _cpu_seconds(pids or {})
    script.write_text(LUA.format(body=body))
    command = [*wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s", "--timeout", "5s"]
    out = subprocess.run(
        [*command, "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + WRK_SLACK_SECONDS,
        check=True,
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    after, requests = _cpu_seconds(pids or {}), max(1, data["requests"])
    return Load(
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=sum(data[k] for k in ("non2xx", "connect", "read", "write", "timeout")),
        cpu_us={name: 1e6 * (after[name] - before[name]) / requests for name in after},
    )


async def run(args: argparse.Namespace) -> int:
    """Start the server(s) and the gateway, measure both sides interleaved, report."""
    wrk = [ensure_wrk()]
    server_pin: list[str] = []
    if args.pin:
        load, server, *gateway = args.pin.split(":")
        wrk = ["taskset", "-c", ",".join(map(str, sorted(_cores(load)))), *wrk]
        server_pin = ["taskset", "-c", ",".join(map(str, sorted(_cores(server))))]
        os.sched_setaffinity(0, _cores(gateway[0] if gateway else server))  # nginx inherits it
    work = Path(tempfile.mkdtemp(prefix="mlc-bench-gateway-"))
    settings = Settings.from_env(home=work / "home")
    runtime = Runtime(name="bench-gateway", stage="DEV", gateway=GatewaySettings(port=_free_port()))
    package = prepare_example_model()
    body = work / "one.json"
    body.write_text(json.dumps(RECORD))
    processes: list[subprocess.Popen[bytes]] = []
    driver = ServersOnTcp(settings, {})
    load_before = os.getloadavg()
    try:
        for version in (1, 2) if args.shadow else (1,):
            process, endpoint = await _start_server(server_pin, package, version, work)
            processes.append(process)
            driver.servers[f"{MODEL}-v{version}"] = endpoint
        routes = [TrafficRoute(deployment_id=f"{MODEL}-v1", version=1)]
        if args.shadow:
            routes.append(TrafficRoute(deployment_id=f"{MODEL}-v2", version=2, weight=0, shadow=True))
        routed = await driver.route(runtime, MODEL, routes, lambda _note: None)
        targets = {"direct": f"{driver.servers[f'{MODEL}-v1']}/score", "gateway": f"{routed.endpoint}/score"}
        gateway = LocalGateway(settings, runtime)
        pids = {
            "server": [p.pid for p in processes],
            "edge": _workers(gateway._pid("edge")),
            "routing": _workers(gateway._pid("routes")),
        }
        results: dict[str, list[Load]] = {name: [] for name in targets}
        for round_ in range(args.rounds):
            order = list(targets) if round_ % 2 == 0 else list(reversed(targets))
            for name in order:
                wrk_run(wrk, targets[name], body, args, args.warmup, work)
                results[name].append(wrk_run(wrk, targets[name], body, args, args.duration, work, pids))
        return report(results, args, load_before)
    finally:
        await driver.cleanup(CleanupRequest(runtime=runtime))
        await LocalGateway(settings, runtime).stop()
        for process in processes:
            process.terminate()
            process.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict[str, list[Load]], args: argparse.Namespace, load_before: tuple[float, ...]) -> int:
    """Median, spread and rounds per side, the gateway's ratios; 1 when any run had errors."""
    where = "wrk, server and nginx sharing all cores"
    if args.pin:
        load, server, *gateway = args.pin.split(":")
        where = f"wrk on cores {load}, model server on {server}, nginx on {gateway[0] if gateway else server}"
    print(
        f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores ({where}); "
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s x {args.rounds} rounds, interleaved; "
        "1 record per request" + ("; shadow mirrored" if args.shadow else "")
    )
    print(
        "load average before {:.2f} {:.2f} {:.2f}, after {:.2f} {:.2f} {:.2f}".format(
            *load_before, *os.getloadavg()
        )
    )
    median: dict[str, tuple[float, float]] = {}
    errors = 0
    for name, loads in results.items():
        rps = [x.rps for x in loads]
        p99 = [x.p99_ms for x in loads]
        median[name] = (statistics.median(rps), statistics.median(p99))
        errors += sum(x.errors for x in loads)
        print(
            f"{name:8} {median[name][0]:8.0f} req/s (spread {min(rps):.0f}-{max(rps):.0f})  "
            f"p99 {median[name][1]:6.2f} ms (spread {min(p99):.2f}-{max(p99):.2f})  "
            f"errors {sum(x.errors for x in loads)}  rounds: {', '.join(f'{x:.0f}' for x in rps)}"
        )
        cpu = {k: statistics.median(x.cpu_us[k] for x in loads) for k in loads[0].cpu_us}
        print("         CPU per request (median): " + ", ".join(f"{k} {v:.0f} us" for k, v in cpu.items()))
    (direct_rps, direct_p99), (gateway_rps, gateway_p99) = median["direct"], median["gateway"]
    pairs = [g.rps / d.rps for d, g in zip(results["direct"], results["gateway"], strict=True)]
    print(
        f"gateway / direct: throughput {gateway_rps / direct_rps:.3f} "
        f"(cost {100 * (1 - gateway_rps / direct_rps):.1f} %; per round "
        f"{', '.join(f'{100 * (1 - x):.1f}' for x in pairs)} %), p99 {gateway_p99 / direct_p99:.2f}x"
    )
    if errors:
        print(f"FAILED: {errors} errors in the measurements", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    """Parse the options and run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved direct/gateway measurements")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--pin", metavar="LOAD:SERVER[:GATEWAY]", help="cores of wrk, the model server and nginx, e.g. 0:1"
    )
    parser.add_argument("--shadow", action="store_true", help="mirror every request to a second server")
    started = time.monotonic()
    code = asyncio.run(run(parser.parse_args()))
    print(f"({time.monotonic() - started:.0f} s)")
    raise SystemExit(code)


if __name__ == "__main__":
    main()
