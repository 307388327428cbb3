"""The API under load: ``mlc server`` reads at 200 requests/s against the same queries run
directly with asyncpg, interleaved (issue 21's goal: read p99 < 20 ms, page p95 < 100 ms).

What runs:

* a fresh embedded PostgreSQL, seeded through the store (untimed): a trust root, four
  principals with keys of their own, 1,000 snapshots (100 models x 10 versions,
  ``mlc.store.snapshots.register_snapshot``) and a hash-chained audit trail of 10,000 entries
  (``mlc.store.trail.append``, the governance statements of the setup included);
* a real ``mlc server`` process (``python -m mlc server --port 0``) with the owner's DSN and
  its own pool (``server.app.POOL_SIZE``), default rate limits on;
* the load generator, a process of its own (``bench_api.py --generate``), open loop: request
  *i* is scheduled at ``start + i / rate`` whatever came back before, and its latency runs
  from that scheduled time (a stalled server is charged for the requests queued behind it);
  the four principals take turns, 50 requests/s each at 200/s (under the per-principal read
  limit of 50/s, burst 100);
* the reads: ``GET /v1/snapshots?limit=50`` and, when the server has it,
  ``GET /v1/audit/entries?limit=50`` alternate; the direct side runs the same store function
  the route runs (``read_snapshots(limit=51)``, ``read_entries(limit=51)``: one more row tells
  the route whether there is a next page), rows parsed into the same pydantic models (trail
  entries turned into the JSON dicts the route lists), from a pool of the server's size in
  the generator process.

Fairness rules:

* same work and same client process: both sides are driven by the same generator at the same
  rate and schedule; the API side pays HTTP, authentication (an RFC 9421 signature checked,
  its nonce stored) and JSON on top of the query, which is what is measured; the generator
  sends requests serialised beforehand on 64 kept-alive connections (``RawHttp``), so its
  own CPU, taken from the same two cores, stays small;
* signing is not timed: each phase's requests are signed just before it (a batch well
  inside their 60 s validity), each with a fresh nonce, as a client that signs before sending;
* interleaved and repeated: ``--rounds`` rounds of API then direct (direct first in odd
  rounds), each phase ``--warmup`` seconds (dropped) then ``--duration`` seconds measured;
  the report gives each round's p50/p99 per read and side, their median and spread
  (min-max), and the load (``uptime``) before and after;
* errors fail the run: any non-2xx answer, socket error or query error, and any request the
  generator could not send within a second of its scheduled time (the generator, not the
  server, would be what is measured) exits 1.

The inventory page (``GET /``, when the server serves the web page): a session is opened as
a person does (signed ``POST /v1/web-sessions``, then its single-use link), and the page is
read at ``--page-rate`` against its own queries run directly (``server.web.inventory.build``),
interleaved the same way; its p95 is reported. Without the web page the bench says so.

    .venv/bin/python bench/bench_api.py                     # 200 req/s, 5 rounds of 5 s + 20 s
    .venv/bin/python bench/bench_api.py --rate 400 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli import admin  # noqa: E402
from cli.stack.dev_postgres import DevPostgres  # noqa: E402
from mlc import processes  # noqa: E402
from mlc.config import Settings  # noqa: E402
from mlc.manifest import load_manifest  # noqa: E402
from mlc.store import connect, snapshots, trail  # noqa: E402
from mlc.trust.keys import create_key, load_private_key, public_text  # noqa: E402
from mlc.trust.requests import MAX_AGE, sign_request  # noqa: E402
from mlc.trust.signer import Signer  # noqa: E402
from server.app import POOL_SIZE  # noqa: E402

MODEL = ROOT / "tests" / "fixtures" / "models" / "weak-model"
MODELS, VERSIONS, TRAIL_ENTRIES = 100, 10, 10_000
PRINCIPALS = 4
PAGE = 50
CONNECTIONS = 64
"""The generator's kept-alive connections to the server (an open loop needs spare ones)."""
LATE_SECONDS = 1.0
"""A request the generator sends later than this after its scheduled time fails the run."""
READ_P99_GOAL_MS, PAGE_P95_GOAL_MS = 20.0, 100.0


# --- setup (main process) ---------------------------------------------------------------


async def seed(work: Path, dsn: str) -> Settings:
    """Trust root, four principals, 1,000 snapshots and a 10,000-entry trail (untimed)."""
    settings = replace(Settings.from_env(home=work / "home"), database_url=dsn)
    pool = await connect(dsn, max_size=4)
    try:
        keys = work / "keys"
        root_key = create_key(keys / "admin.pem")
        settings = replace(
            settings, trust_root=await admin.init_admin(pool, settings, "bench-admin", root_key)
        )
        root = Signer("bench-admin", root_key)
        for index in range(PRINCIPALS):
            key = create_key(keys / f"reader-{index}.pem")
            await admin.add_key(pool, settings, root, f"reader-{index}", public_text(key.public_key()))
        manifest = load_manifest(MODEL)
        for model in range(MODELS):
            named = manifest.model_copy(update={"name": f"bench-model-{model:03d}"})
            for version in range(VERSIONS):
                sha = hashlib.sha256(f"{model}/{version}".encode()).hexdigest()
                await snapshots.register_snapshot(pool, named, sha, registered_by="bench-admin")
        present = int(await pool.fetchval("SELECT count(*) FROM audit_log"))
        for index in range(present, TRAIL_ENTRIES):
            model = index % MODELS
            body = {"note": "bench seed", "index": index}
            await trail.append(pool, "bench.seed", body, model=f"bench-model-{model:03d}", version=1)
    finally:
        await pool.close()
    return settings


def start_server(work: Path, settings: Settings) -> tuple[subprocess.Popen[bytes], str]:
    """``mlc server`` on a free loopback port; returns the process and its URL once it serves."""
    port_file = work / "server.port"
    env = {
        **{k: v for k, v in os.environ.items() if k != "MLC_API_URL"},
        "MLC_HOME": str(settings.home),
        "MLC_DATABASE_URL": settings.database_url or "",
        "MLC_TRUST_ROOT": settings.trust_root or "",
        "PYTHONPATH": str(ROOT),
    }
    args = [sys.executable, "-m", "mlc", "server", "--port", "0", "--port-file", str(port_file)]
    with (work / "server.log").open("ab") as log:
        child = processes.spawn(args, log=log, env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mlc server did not serve: {(work / 'server.log').read_text()[-3000:]}")
        time.sleep(0.1)
    return child, f"http://127.0.0.1:{int(port_file.read_text())}"


# --- the generator (its own process) ----------------------------------------------------


Job = Callable[[], Awaitable[None]]
"""One request (or direct query), ready to run at its scheduled time."""


class Failed(Exception):
    """A request failed: the run fails."""


async def open_loop(jobs: list[Job], rate: float) -> list[float]:
    """Run ``jobs[i]`` at ``start + i / rate``; each one's latency in seconds from that time."""
    start = time.perf_counter() + 0.05
    latencies: list[float] = [0.0] * len(jobs)

    async def timed(index: int, at: float) -> None:
        if time.perf_counter() - at > LATE_SECONDS:
            raise Failed(f"the generator sent request {index} over {LATE_SECONDS} s late: it is overloaded")
        await jobs[index]()
        latencies[index] = time.perf_counter() - at

    tasks = []
    for index in range(len(jobs)):
        at = start + index / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(timed(index, at)))
    await asyncio.gather(*tasks)
    return latencies


class RawHttp:
    """Kept-alive HTTP/1.1 connections sending requests serialised beforehand: the generator's
    own cost per request stays small (httpx spends about a millisecond of CPU on each, which on
    two shared cores is taken from the server under test and added to every latency)."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port, self.size = host, port, size
        self.opened = 0
        self.free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    @staticmethod
    def serialise(request: httpx.Request) -> bytes:
        """``request`` (signed, headers final) as the bytes sent on the wire."""
        head = [request.method.encode() + b" " + request.url.raw_path + b" HTTP/1.1"]
        head += [name + b": " + value for name, value in request.headers.raw]
        return b"\r\n".join(head) + b"\r\n\r\n" + request.content

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        """Send ``raw`` on a free connection (a new one while fewer than ``size`` are open,
        else wait for one: that wait is part of the latency); the status and body."""
        if self.free.empty() and self.opened < self.size:
            self.opened += 1
            try:
                connection = await asyncio.open_connection(self.host, self.port)
            except OSError:
                self.opened -= 1
                raise
        else:
            connection = await self.free.get()
        reader, writer = connection
        try:
            writer.write(raw)
            line = await reader.readline()
            if not line:
                raise Failed("the server closed a kept-alive connection without answering")
            status = int(line.split()[1])
            length, close = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    raise Failed(f"an answer came {value.strip().decode()}: only Content-Length is read")
                elif name == b"connection" and b"close" in value.lower():
                    close = True
            body = await reader.readexactly(length)
        except BaseException:
            writer.close()
            self.opened -= 1
            raise
        if close:
            writer.close()
            self.opened -= 1
        else:
            self.free.put_nowait(connection)
        return status, body

    async def close(self) -> None:
        """Close the idle connections (all of them between phases: the server closes a
        connection idle for 5 s, and a phase must not meet one it closed)."""
        while not self.free.empty():
            _, writer = self.free.get_nowait()
            writer.close()
            self.opened -= 1


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Generator:
    """Both sides' requests, driven by one open loop."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.url: str = config["url"]
        self.keys = [load_private_key(Path(p)) for p in config["keys"]]
        self.reads: list[str] = config["reads"]
        self.http = httpx.AsyncClient(timeout=10.0)
        """For opening the browser sessions; the measured requests go through :attr:`raw`."""
        where = httpx.URL(self.url)
        self.raw = RawHttp(where.host, where.port or 80, CONNECTIONS)
        self.pool: Any = None
        self.page_ctx: Any = None
        self.cookies: list[httpx.Cookies] = []
        self.server_cpu_ms = 0.0

    async def open(self) -> None:
        import asyncpg

        self.pool = await asyncpg.create_pool(self.config["dsn"], min_size=POOL_SIZE, max_size=POOL_SIZE)
        if self.config["page"]:
            await self._open_page()

    async def _open_page(self) -> None:
        """A browser session per principal, opened as a person does; the direct side's context."""
        from server.config import ServerConfig
        from server.context import ServerContext

        for key in self.keys:
            request = self.http.build_request("POST", f"{self.url}/v1/web-sessions", json={})
            sign_request(request, key)
            link = (await self._ok(self.http.send(request))).json()["url"]
            opened = await self.http.get(link, follow_redirects=False)
            if opened.status_code >= 400 or not opened.cookies:
                raise Failed(f"the session link answered {opened.status_code} without a cookie")
            self.cookies.append(opened.cookies)
        settings = replace(Settings.from_env(), database_url=self.config["dsn"])
        self.page_ctx = ServerContext(ServerConfig(settings=settings, public_url=self.url), self.pool)

    async def _ok(self, sent: Awaitable[httpx.Response]) -> httpx.Response:
        try:
            response = await sent
        except httpx.HTTPError as exc:
            raise Failed(f"socket error: {exc!r}") from exc
        if not response.is_success:
            request = response.request
            raise Failed(
                f"{request.method} {request.url.path} answered {response.status_code}: {response.text[:300]}"
                " (401 `stale`: it waited over a minute after it was signed, the server fell behind)"
            )
        return response

    async def _send(self, what: str, raw: bytes) -> None:
        """One measured request: any answer but 2xx, or a socket error, fails the run."""
        try:
            status, body = await self.raw.send(raw)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            raise Failed(f"{what}: socket error {exc!r}") from exc
        if not 200 <= status < 300:
            raise Failed(
                f"{what} answered {status}: {body[:300].decode(errors='replace')}"
                " (401 `stale`: it waited over a minute after it was signed, the server fell behind)"
            )

    def api_jobs(self, count: int) -> tuple[list[Job], list[str]]:
        """``count`` signed requests (fresh nonces), principals and reads in turn."""
        jobs: list[Job] = []
        names: list[str] = []
        for index in range(count):
            read = self.reads[index % len(self.reads)]
            request = self.http.build_request("GET", f"{self.url}{read}", params={"limit": PAGE})
            sign_request(request, self.keys[index % len(self.keys)])
            jobs.append(functools.partial(self._send, read, RawHttp.serialise(request)))
            names.append(read)
        return jobs, names

    def direct_jobs(self, count: int) -> tuple[list[Job], list[str]]:
        """The same reads as the store functions the routes call, on a pool of the server's size."""

        async def entries() -> list[dict[str, Any]]:
            rows = await trail.read_entries(self.pool, after=0, limit=PAGE + 1)
            return [row.to_json() for row in rows]  # as the route lists them

        queries: dict[str, Callable[[], Awaitable[Any]]] = {
            "/v1/snapshots": lambda: snapshots.read_snapshots(self.pool, None, after=None, limit=PAGE + 1),
            "/v1/audit/entries": entries,
        }
        jobs: list[Job] = []
        names: list[str] = []
        for index in range(count):
            read = self.reads[index % len(self.reads)]
            query = queries[read]

            async def run(query: Callable[[], Awaitable[Any]]) -> None:
                try:
                    await query()
                except Exception as exc:
                    raise Failed(f"direct query failed: {exc!r}") from exc

            jobs.append(functools.partial(run, query))
            names.append(read)
        return jobs, names

    def page_jobs(self, count: int, *, api: bool) -> tuple[list[Job], list[str]]:
        from server.web import inventory

        jobs: list[Job] = []
        for index in range(count):
            if api:
                cookies = self.cookies[index % len(self.cookies)]
                request = self.http.build_request("GET", f"{self.url}/", cookies=cookies)
                jobs.append(functools.partial(self._send, "GET /", RawHttp.serialise(request)))
            else:

                async def build() -> None:
                    await inventory.build(self.page_ctx, model=None, after=None)

                jobs.append(build)
        return jobs, ["GET /"] * count

    async def phase(self, side: str, *, page: bool) -> dict[str, list[float]]:
        """One warm-up plus measured phase of ``side``; latencies (ms) per read, warm-up dropped."""
        rate = self.config["page_rate"] if page else self.config["rate"]
        warm = int(self.config["warmup"] * rate)
        count = warm + int(self.config["duration"] * rate)
        if page:
            jobs, names = self.page_jobs(count, api=side == "api")
        else:
            jobs, names = self.api_jobs(count) if side == "api" else self.direct_jobs(count)
        cpu = cpu_seconds(self.config["server_pid"])
        latencies = await open_loop(jobs, rate)
        await self.raw.close()
        self.server_cpu_ms = (cpu_seconds(self.config["server_pid"]) - cpu) * 1000 / count
        found: dict[str, list[float]] = {}
        for name, latency in list(zip(names, latencies, strict=True))[warm:]:
            found.setdefault(name, []).append(latency * 1000)
        return found

    async def run(self) -> dict[str, Any]:
        await self.open()
        rounds: list[dict[str, Any]] = []
        for number in range(self.config["rounds"]):
            order = ["api", "direct"] if number % 2 == 0 else ["direct", "api"]
            result: dict[str, Any] = {}
            for side in order:
                for name, values in (await self.phase(side, page=False)).items():
                    result[f"{side} {name}"] = _summary(values)
                if side == "api":
                    result["server cpu ms/request"] = self.server_cpu_ms
                if self.config["page"]:
                    for name, values in (await self.phase(side, page=True)).items():
                        result[f"{side} {name}"] = _summary(values)
            shown = ", ".join(f"{k} p99 {v['p99']:.1f} ms" for k, v in result.items() if isinstance(v, dict))
            print(f"round {number + 1}: {shown}", file=sys.stderr, flush=True)
            rounds.append(result)
        await self.http.aclose()
        await self.raw.close()
        await self.pool.close()
        return {"rounds": rounds}


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 0.50),
        "p95": percentile(values, 0.95),
        "p99": percentile(values, 0.99),
        "max": max(values),
    }


def generate(config_path: Path) -> None:
    """The generator process: run every phase, print the results as one JSON line."""
    config = json.loads(config_path.read_text())
    phase_seconds = config["warmup"] + config["duration"]
    if phase_seconds > MAX_AGE.total_seconds() - 15:
        raise SystemExit(f"--warmup + --duration must stay under {MAX_AGE.total_seconds() - 15:.0f} s")
    try:
        print(json.dumps(asyncio.run(Generator(config).run())), flush=True)
    except Failed as exc:
        print(f"FAILED: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


# --- report (main process) --------------------------------------------------------------


def report(rounds: list[dict[str, Any]], reads: list[str], page: bool) -> bool:
    """Print the medians and spreads side by side; True when the goals are met."""
    met = True
    print(f"\n{'read':<24} {'side':<7} {'p50 ms':>16} {'p95 ms':>16} {'p99 ms':>16}")
    for name in [*reads, *(["GET /"] if page else [])]:
        for side in ("api", "direct"):
            key = f"{side} {name}"
            cells = []
            for q in ("p50", "p95", "p99"):
                values = [r[key][q] for r in rounds]
                cells.append(f"{statistics.median(values):6.2f} ({min(values):.1f}-{max(values):.1f})")
            print(f"{name:<24} {side:<7} " + " ".join(f"{c:>16}" for c in cells))
        api = [r[f"api {name}"] for r in rounds]
        if name == "GET /":
            value, goal, q = statistics.median(x["p95"] for x in api), PAGE_P95_GOAL_MS, "p95"
        else:
            value, goal, q = statistics.median(x["p99"] for x in api), READ_P99_GOAL_MS, "p99"
        ok = value < goal
        met &= ok
        print(f"  goal: API {name} {q} {value:.2f} ms < {goal:.0f} ms: {'met' if ok else 'NOT MET'}")
    cpu = [r["server cpu ms/request"] for r in rounds]
    print(f"server CPU per API read: {statistics.median(cpu):.2f} ms ({min(cpu):.2f}-{max(cpu):.2f})")
    return met


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def served_reads(url: str) -> tuple[list[str], bool]:
    """The reads this server has (``/v1/audit/entries`` comes with the read routes) and whether
    it serves the web page (``/v1/web-sessions`` comes with it)."""
    paths = httpx.get(f"{url}/v1/openapi.json", timeout=10).json()["paths"]
    reads = ["/v1/snapshots"]
    if "/v1/audit/entries" in paths:
        reads.append("/v1/audit/entries")
    else:
        print("no GET /v1/audit/entries on this server: snapshots only")
    page = "/v1/web-sessions" in paths
    if not page:
        print("no web page on this server: GET / not measured")
    return reads, page


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s of each read phase")
    parser.add_argument("--page-rate", type=float, default=20.0, help="requests/s of each page phase")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds dropped at each phase's start")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per phase")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, database)")
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(args.generate)
        return 0
    (ROOT / "bench" / ".work").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="api-", dir=ROOT / "bench" / ".work"))
    postgres = DevPostgres(work / "pg", work / "pg.log")
    server: subprocess.Popen[bytes] | None = None
    try:
        started = time.perf_counter()
        settings = asyncio.run(seed(work, postgres.start()))
        print(
            f"setup: {MODELS * VERSIONS} snapshots, {TRAIL_ENTRIES} trail entries, {PRINCIPALS} principals "
            f"in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        server, url = start_server(work, settings)
        reads, page = served_reads(url)
        config = {
            "url": url,
            "server_pid": server.pid,
            "dsn": settings.database_url,
            "keys": [str(work / "keys" / f"reader-{i}.pem") for i in range(PRINCIPALS)],
            "reads": reads,
            "page": page,
            "rate": args.rate,
            "page_rate": args.page_rate,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "duration": args.duration,
        }
        (work / "generator.json").write_text(json.dumps(config))
        print(f"load before: {uptime()}", flush=True)
        print(
            f"{args.rounds} rounds x (API, direct) x ({args.warmup:.0f} s warm-up + {args.duration:.0f} s) "
            f"at {args.rate:.0f} req/s, {PRINCIPALS} principals, pool {POOL_SIZE}",
            flush=True,
        )
        done = subprocess.run(
            [sys.executable, __file__, "--generate", str(work / "generator.json")],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            check=False,
        )
        print(f"load after: {uptime()}", flush=True)
        if done.returncode != 0:
            print(f"the run failed; server log: {(work / 'server.log').read_text()[-2000:]}", flush=True)
            return 1
        rounds = json.loads(done.stdout.strip().splitlines()[-1])["rounds"]
        met = report(rounds, reads, page)
        print("all requests 2xx; goals " + ("met" if met else "NOT met"))
        return 0
    finally:
        if server is not None:
            processes.stop(server.pid, child=server)
        postgres.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    sys.exit(main())
