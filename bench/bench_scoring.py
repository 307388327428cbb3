"""Online scoring throughput: our model server vs MLServer and ``mlflow models serve``, fairly.

Every server serves the same trained cc-fraud package (``examples/models/cc-fraud``) on
127.0.0.1 and does the same work per request. The fairness rules:

* **Same work.** Every request carries the raw transaction fields of the manifest's input
  schema (never precomputed features); every server computes the features with the
  package's own ``score.py``, calls the pipeline's ``predict_proba`` and answers with the
  probability and the 0/1 decision. Each peer gets its cheapest documented request format
  for those fields: MLServer one V2 FP64 tensor (a row per record, booleans as 0/1,
  ``NumpyCodec``) for a custom runtime (``bench/peers/mlserver_runtime.py``); mlflow
  ``{"inputs": [[...]]}`` checked against the model's tensor signature, for a pyfunc
  (``bench/peers/mlflow_model.py``). Both call ``score_columns``, the package's vectorised
  column path to the same features. Ours gets what its API takes, JSON records by field
  name, checks every field's name and type against the input schema, and runs
  ``score_batch``: more bytes to parse and more to check than the peers' matrices, so the
  differences favour the peers. Feeding ours feature rows would not be the product: callers
  have records, and validating them is part of our server's contract. Before any load,
  every server must return the package's own probabilities (1e-9), or the run stops.
* **Peers installed like ours.** Each peer's venv (``bench/.venvs/NAME``) is installed with
  ``pip --require-hashes`` from a committed lock of every transitive package
  (``bench/peers/NAME.lock``, written by ``bench/peers/lock.sh`` from ``NAME.in``, with
  scikit-learn, numpy, scipy and joblib at ``requirements.lock``'s versions); the venv is
  rebuilt whenever the lock's digest changes.
* **Peers tuned as their docs say a production deployment is.** MLServer 1.7.1 with
  uvloop and httptools installed, ``debug: false`` (no uvicorn access log), metrics off
  (``metrics_endpoint: null``, no Prometheus middleware), gzip off (no client here asks
  for it), measured with ``parallel_workers`` 0, 1 (its default) and 2 (one per core, as
  Seldon's tuning guide suggests); the best of those per size is its "tuned" figure. A
  further MLServer row has adaptive batching on (``parallel_workers`` 1, ``max_batch_size``
  = the connection count, ``max_batch_time`` 2 ms, our micro-batcher's delay). mlflow 3.17.2 runs its
  FastAPI app under uvicorn (uvloop and httptools installed), access log off
  (``UVICORN_ACCESS_LOG=false``), with 1 and 2 workers (``-w``); the best is "tuned".
  Ours is one process (``python -m mlc.serving serve``, uvicorn with uvloop/httptools, no
  access log), as the runtimes start it.
* **Interleaved and repeated.** All servers are started once, checked, and left running;
  then for each of ``--rounds`` rounds (default 3) and each size (1 and ``--batch``
  records per request) every server gets a warm-up and a measured ``wrk`` run in turn
  (ours, then each peer), so slow drifts in the shared machine's load hit all alike.
  The table shows the median and the spread (min–max) of req/s, p50 and p99 over rounds.
* **CPU per request** (user + system time of all the server's processes during a measured
  run, over its requests) is shown next to req/s: on a shared, busy machine the scheduler
  gives a server with more processes a bigger share of the cores, so req/s there measures
  process count as much as efficiency; CPU per request does not depend on that share
  (contention still inflates it for every server alike: compare ratios, not absolutes).
* **Errors fail the run.** Any non-2xx answer, socket error or timeout in a measured or
  warm-up run stops the benchmark with the server, size and counts.

The goal checked at the end: ours at least 2x the req/s of tuned MLServer, MLServer with
adaptive batching and tuned mlflow at each size, with a median p99 no worse than theirs.
``wrk`` (Debian package) generates the load on the same machine, one Lua script per body.

    .venv/bin/python bench/bench_scoring.py                      # all servers, 3 rounds
    .venv/bin/python bench/bench_scoring.py --servers ours,mlserver-pw0 --rounds 1 --duration 5
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import sklearn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.examples import prepare_example_model  # noqa: E402 (after the path setup)
from mlc.manifest import load_manifest  # noqa: E402

BENCH = Path(__file__).resolve().parent
VENVS = BENCH / ".venvs"
PEERS = BENCH / "peers"
MLFLOW_VERSION = "3.17.2"
MLSERVER_VERSION = "1.7.1"
BATCH_TIME_SECONDS = 0.002
"""MLServer's ``max_batch_time`` in the adaptive-batching row: our micro-batcher's delay."""
READY_TIMEOUT_SECONDS = 180.0
PIP_TIMEOUT_SECONDS = 900.0
WRK_SLACK_SECONDS = 30.0
"""wrk must finish within its duration plus this, or the benchmark stops."""
SERVERS = ("ours", "mlserver-pw0", "mlserver-pw1", "mlserver-pw2", "mlserver-batch", "mlflow-w1", "mlflow-w2")
TUNED = {
    "MLServer tuned": ("mlserver-pw0", "mlserver-pw1", "mlserver-pw2"),
    "MLServer adaptive batching": ("mlserver-batch",),
    "mlflow tuned": ("mlflow-w1", "mlflow-w2"),
}
"""Peers the goal is checked against: each is the best (by median req/s) of its rows."""

LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open("{body}", "rb"))
wrk.body = f:read("*a")
f:close()

function done(summary, latency, requests)
  io.write(string.format(
    "WRK_JSON {{\\"requests\\": %d, \\"duration_us\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d, "
    .. "\\"non2xx\\": %d, \\"connect\\": %d, \\"read\\": %d, \\"write\\": %d, \\"timeout\\": %d}}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout))
end
"""


@dataclass
class Load:
    """What one wrk run measured."""

    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float = 0.0
    """CPU time (user + system) the server's processes spent per request, in microseconds."""


@dataclass
class Server:
    """How to start one server and talk to it."""

    name: str
    """Short name (``--servers``)."""
    label: str
    style: str
    """Request and response format: ``ours``, ``v2`` or ``mlflow``."""
    command: list[str]
    port: int
    health_path: str
    score_path: str
    processes: str
    env: dict[str, str] | None = None
    cwd: Path | None = None
    group: int = 0
    """Process group of the running server (all its processes: workers included)."""
    loads: dict[int, list[Load]] = field(default_factory=dict)
    """Measured runs per records-per-request, one per round."""

    @property
    def base(self) -> str:
        """Where it listens."""
        return f"http://127.0.0.1:{self.port}"


# --- environments ----------------------------------------------------------------------


def _venv_python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def _venv_env(name: str, **extra: str) -> dict[str, str]:
    """Environment that puts a peer venv's ``bin`` first (mlflow execs ``uvicorn`` by name)."""
    return {
        "PATH": f"{VENVS / name / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(VENVS / name),
        **extra,
    }


def ensure_venv(name: str) -> Path:
    """``bench/.venvs/NAME`` installed from ``bench/peers/NAME.lock``, rebuilt when the lock changed.

    The lock pins every transitive package with hashes (``bench/peers/lock.sh``), like our
    own ``requirements.lock``; pip installs exactly it (``--require-hashes --no-deps``).
    The digest of the lock the venv was built from is kept next to it.
    """
    lock = PEERS / f"{name}.lock"
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    python = _venv_python(name)
    stamp = VENVS / f"{name}.lock-sha256"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return python
    print(f"installing {lock.relative_to(ROOT)} into {VENVS / name} (a few minutes, once)", flush=True)
    VENVS.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", VENVS / name], check=True, timeout=300)
    log = VENVS / f"{name}-pip.log"
    with log.open("w") as out:
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
            + ["--require-hashes", "--no-deps", "-r", str(lock)],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=PIP_TIMEOUT_SECONDS,
        )
    if done.returncode != 0:
        raise SystemExit(f"pip install of {lock} into {VENVS / name} failed; see {log}")
    stamp.write_text(digest + "\n")
    return python


def ensure_wrk() -> str:
    """Path of ``wrk``, installed from Debian when missing."""
    found = shutil.which("wrk")
    if found:
        return found
    print("installing wrk (apt-get)", flush=True)
    subprocess.run(["apt-get", "install", "-y", "wrk"], check=False, capture_output=True, timeout=600)
    found = shutil.which("wrk")
    if not found:
        subprocess.run(["apt-get", "update"], check=False, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, capture_output=True, timeout=600)
        found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is not installed and apt-get could not install it")
    return found


# --- model exports and request bodies --------------------------------------------------

MLFLOW_EXPORT = """
import json, sys
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import infer_signature

code, package, dest, example_json = sys.argv[1:]
example = json.loads(open(example_json).read())
outputs = pd.DataFrame({"probability": [0.5], "is_fraud": [0]})
mlflow.pyfunc.save_model(
    dest,
    python_model=code,
    artifacts={"package": package},
    model_config={"columns": example["columns"]},
    signature=infer_signature(np.asarray(example["rows"], dtype=np.float64), outputs),
)
"""


def read_records(package: Path, batch: int) -> list[dict[str, Any]]:
    """The first ``batch`` evaluation records of the package, without their label."""
    manifest = load_manifest(package)
    label = manifest.evaluation.label if manifest.evaluation else "is_fraud"
    lines = (package / "data" / "eval.jsonl").read_text().splitlines()[:batch]
    if len(lines) < batch:
        raise SystemExit(f"--batch {batch}: the package has only {len(lines)} evaluation records")
    return [{k: v for k, v in json.loads(line).items() if k != label} for line in lines]


def raw_matrix(package: Path, records: list[dict[str, Any]]) -> tuple[list[str], list[list[float]]]:
    """The input schema's field names and each record's raw fields as floats (booleans 0/1)."""
    columns = [spec.name for spec in load_manifest(package).input_schema]
    return columns, [[float(r[c]) for c in columns] for r in records]


def write_bodies(work: Path, package: Path, records: list[dict[str, Any]]) -> dict[str, dict[int, Path]]:
    """Request bodies per server style and records per request (1 and ``len(records)``)."""
    columns, rows = raw_matrix(package, records)
    bodies: dict[str, dict[int, Path]] = {"ours": {}, "mlflow": {}, "v2": {}}
    for size in (1, len(records)):
        docs = {
            "ours": records[0] if size == 1 else records[:size],
            "mlflow": {"inputs": rows[:size]},
            "v2": {
                "inputs": [
                    {
                        "name": "records",
                        "shape": [size, len(columns)],
                        "datatype": "FP64",
                        "data": [x for row in rows[:size] for x in row],
                    }
                ]
            },
        }
        for style, doc in docs.items():
            path = work / f"body-{style}-{size}.json"
            path.write_bytes(json.dumps(doc, separators=(",", ":")).encode())
            bodies[style][size] = path
    return bodies


def export_mlflow(python: Path, package: Path, dest: Path, records: list[dict[str, Any]]) -> Path:
    """The package as an mlflow pyfunc model with a signature, saved in the mlflow venv."""
    shutil.rmtree(dest, ignore_errors=True)
    example = dest.parent / "mlflow-signature-example.json"
    columns, rows = raw_matrix(package, records)
    example.write_text(json.dumps({"columns": columns, "rows": rows}))
    done = subprocess.run(
        [python, "-c", MLFLOW_EXPORT, PEERS / "mlflow_model.py", package, dest, example],
        timeout=300,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"saving the mlflow model failed:\n{done.stderr[-3000:]}")
    return dest


def export_mlserver(
    package: Path, root: Path, *, parallel_workers: int, batch_size: int | None, ports: tuple[int, int]
) -> Path:
    """An MLServer repository: tuned settings.json plus the package as a custom runtime."""
    model_dir = root / "cc-fraud"
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(PEERS / "mlserver_runtime.py", model_dir / "mlserver_runtime.py")
    model: dict[str, Any] = {
        "name": "cc-fraud",
        "implementation": "mlserver_runtime.CcFraudRuntime",
        "parameters": {"uri": str(package), "extra": {"columns": raw_matrix(package, [])[0]}},
    }
    if batch_size is not None:
        model |= {"max_batch_size": batch_size, "max_batch_time": BATCH_TIME_SECONDS}
    (model_dir / "model-settings.json").write_text(json.dumps(model))
    http, grpc = ports
    settings = {
        "host": "127.0.0.1",
        "http_port": http,
        "grpc_port": grpc,
        "parallel_workers": parallel_workers,
        "debug": False,
        "metrics_endpoint": None,
        "gzip_enabled": False,
    }
    (root / "settings.json").write_text(json.dumps(settings))
    return root


# --- running servers -------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def running(server: Server, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``server`` in its own process group, wait for health, stop the group after."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            server.command,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=server.cwd,
            env={**os.environ, **(server.env or {})},
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + READY_TIMEOUT_SECONDS
            with httpx.Client(base_url=server.base, timeout=2.0) as client:
                while True:
                    if proc.poll() is not None:
                        raise SystemExit(f"{server.label} exited with {proc.returncode}; see {log}")
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(server.health_path).status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise SystemExit(
                            f"{server.label} not ready in {READY_TIMEOUT_SECONDS:.0f} s; see {log}"
                        )
                    time.sleep(0.2)
            server.group = proc.pid
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def probabilities(style: str, body: Any) -> list[float]:
    """Fraud probabilities from a response body of each server style."""
    if style == "ours":
        items = body if isinstance(body, list) else [body]
        return [float(item["probability"]) for item in items]
    if style == "mlflow":
        return [float(row["probability"]) for row in body["predictions"]]
    outputs = {output["name"]: output for output in body["outputs"]}
    return [float(x) for x in outputs["probability"]["data"]]


def check_outputs(server: Server, body: Path, expected: list[float]) -> None:
    """The server must return the package's own probabilities for the batch body."""
    with httpx.Client(base_url=server.base, timeout=30.0) as client:
        response = client.post(
            server.score_path, content=body.read_bytes(), headers={"Content-Type": "application/json"}
        )
    if response.status_code != 200:
        raise SystemExit(f"{server.label}: {response.status_code} {response.text[:300]}")
    got = probabilities(server.style, response.json())
    if len(got) != len(expected):
        raise SystemExit(f"{server.label}: {len(got)} probabilities for {len(expected)} records")
    worst = max(abs(a - b) for a, b in zip(got, expected, strict=True))
    if worst > 1e-9:
        raise SystemExit(f"{server.label}: probabilities differ from the package's by up to {worst}")


_TICK = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(group: int) -> float:
    """User + system CPU of every live process in process group ``group``."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group:  # fields after the name: state, ppid, pgrp, ...
                total += int(fields[11]) + int(fields[12])
    return total / _TICK


def wrk_run(
    wrk: str, server: Server, body: Path, *, threads: int, connections: int, seconds: int, work: Path
) -> Load:
    """One bounded wrk run posting ``body`` to ``server``; any error stops the benchmark."""
    script = work / f"{body.stem}.lua"
    script.write_text(LUA.format(body=body))
    url = server.base + server.score_path
    command = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
    ]
    cpu_before = group_cpu_seconds(server.group)
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + WRK_SLACK_SECONDS)
    cpu = group_cpu_seconds(server.group) - cpu_before
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"wrk against {server.label} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    errors = {k: data[k] for k in ("non2xx", "connect", "read", "write", "timeout") if data[k]}
    if errors or not data["requests"]:
        raise SystemExit(
            f"{server.label}, {body.name}: {data['requests']} requests with errors "
            f"{errors or 'none, but no request completed'}; the run is void (see its log)"
        )
    return Load(
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        cpu_us=cpu / data["requests"] * 1e6,
    )


# --- main ------------------------------------------------------------------------------


def build_servers(
    wanted: list[str], package: Path, work: Path, records: list[dict[str, Any]], connections: int
) -> list[Server]:
    """The servers to measure, ours first, with their models exported and venvs ready."""
    servers: list[Server] = []
    if "ours" in wanted:
        port = free_port()
        cmd = [sys.executable, "-m", "mlc.serving", "serve", "--package", str(package)]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        servers.append(
            Server("ours", "ours (mlc.serving)", "ours", cmd, port, "/health", "/score", "1 process")
        )
    mlserver = [w for w in wanted if w.startswith("mlserver-")]
    if mlserver:
        ensure_venv("mlserver")
    for name in mlserver:
        batching = name == "mlserver-batch"
        workers = 1 if batching else int(name.removeprefix("mlserver-pw"))
        ports = (free_port(), free_port())
        repo = export_mlserver(
            package,
            work / name,
            parallel_workers=workers,
            batch_size=connections if batching else None,
            ports=ports,
        )
        label = f"MLServer pw={workers}" + (" batching" if batching else "")
        described = "1 process" if workers == 0 else f"REST + {workers} inference worker{'s' * (workers > 1)}"
        servers.append(
            Server(
                name,
                label,
                "v2",
                [str(VENVS / "mlserver" / "bin" / "mlserver"), "start", str(repo)],
                ports[0],
                "/v2/health/ready",
                "/v2/models/cc-fraud/infer",
                described,
                env=_venv_env("mlserver"),
                cwd=repo,
            )
        )
    mlflow = [w for w in wanted if w.startswith("mlflow-")]
    if mlflow:
        python = ensure_venv("mlflow")
        model = export_mlflow(python, package, work / "mlflow-model", records)
    for name in mlflow:
        workers = int(name.removeprefix("mlflow-w"))
        port = free_port()
        cmd = [str(VENVS / "mlflow" / "bin" / "mlflow"), "models", "serve", "-m", str(model)]
        cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]
        servers.append(
            Server(
                name,
                f"mlflow w={workers}",
                "mlflow",
                cmd,
                port,
                "/ping",
                "/invocations",
                f"{workers} uvicorn worker{'s' * (workers > 1)}",
                env=_venv_env(
                    "mlflow", MLFLOW_TRACKING_URI=f"file://{work}/mlruns", UVICORN_ACCESS_LOG="false"
                ),
            )
        )
    return servers


def main() -> None:
    """Prepare models and environments, start every server, measure them interleaved, report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of each measured run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each measured run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all servers")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100, help="records per batch request")
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help=f"comma-separated subset of {','.join(SERVERS)}"
    )
    parser.add_argument("--keep", type=Path, help="keep models, bodies and server logs in this folder")
    args = parser.parse_args()
    wanted = args.servers.split(",")
    unknown = sorted(set(wanted) - set(SERVERS))
    if unknown:
        raise SystemExit(f"unknown servers {unknown}; choose from {', '.join(SERVERS)}")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")

    # A plain kill must still stop every server: raise SystemExit, so the ExitStack unwinds.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wrk = ensure_wrk()
    with tempfile.TemporaryDirectory(prefix="mlc-bench-scoring-") as tmp, contextlib.ExitStack() as stack:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        package = prepare_example_model(work / "cc-fraud")
        records = read_records(package, args.batch)
        bodies = write_bodies(work, package, records)
        expected = _expected(package, records)
        servers = build_servers(wanted, package, work, records, args.connections)
        for server in servers:
            print(f"starting {server.label} ({server.processes}) on {server.base}", flush=True)
            stack.enter_context(running(server, work / f"{server.name}.log"))
            check_outputs(server, bodies[server.style][args.batch], expected)
        started = datetime.now(UTC)
        loads = [os.getloadavg()[0]]
        for round_no in range(1, args.rounds + 1):
            for size in (1, args.batch):
                for server in servers:
                    body = bodies[server.style][size]
                    options = {"threads": args.threads, "connections": args.connections, "work": work}
                    if args.warmup:
                        wrk_run(wrk, server, body, seconds=args.warmup, **options)
                    load = wrk_run(wrk, server, body, seconds=args.duration, **options)
                    server.loads.setdefault(size, []).append(load)
                    print(
                        f"round {round_no} {server.label:<24} {size:>4} records: {load.rps:8.0f} req/s "
                        f"p50 {load.p50_ms:6.2f} ms p99 {load.p99_ms:6.2f} ms, {load.cpu_us:6.0f} CPU-µs/req",
                        flush=True,
                    )
                loads.append(os.getloadavg()[0])
        report(servers, args, started, loads)


def _expected(package: Path, records: list[dict[str, Any]]) -> list[float]:
    """The package's own probabilities for ``records``, scored in this process."""
    from mlc.serving import load_model

    return [float(o["probability"]) for o in load_model(package).score_batch(records)]


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _cell(values: list[float], digits: int) -> str:
    return f"{_median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def report(servers: list[Server], args: argparse.Namespace, started: datetime, loads: list[float]) -> None:
    """One row per server and size (median and min–max over rounds), then the goal per tuned peer."""
    print()
    print(
        f"{started:%Y-%m-%d %H:%M}–{datetime.now(UTC):%H:%M} UTC; {os.cpu_count()} cores shared with wrk; "
        f"1-min load {min(loads):.1f}–{max(loads):.1f}; {args.rounds} interleaved rounds of "
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s (after {args.warmup} s warm-up); "
        f"scikit-learn {sklearn.__version__}"
    )
    print("median (min–max) over rounds; every server gets raw records and runs the package's score.py")
    print()
    print(
        f"{'server':<24} {'processes':<28} {'records':>7} {'req/s':>22} {'p50 ms':>20} {'p99 ms':>20} "
        f"{'CPU µs/req':>20}"
    )
    for server in servers:
        for size, runs in sorted(server.loads.items()):
            print(
                f"{server.label:<24} {server.processes:<28} {size:>7} {_cell([r.rps for r in runs], 0):>22} "
                f"{_cell([r.p50_ms for r in runs], 2):>20} {_cell([r.p99_ms for r in runs], 2):>20} "
                f"{_cell([r.cpu_us for r in runs], 0):>20}"
            )
    ours = next((s for s in servers if s.name == "ours"), None)
    if ours is None:
        return
    print()
    print("goal: ours >= 2x the req/s of each tuned peer, median p99 no worse")
    by_name = {s.name: s for s in servers}
    for peer, names in TUNED.items():
        rows = [by_name[n] for n in names if n in by_name]
        for size, runs in sorted(ours.loads.items()):
            if not rows:
                continue
            best = max(rows, key=lambda s: _median([r.rps for r in s.loads[size]]))
            theirs = best.loads[size]
            ratio = _median([r.rps for r in runs]) / _median([r.rps for r in theirs])
            p99, their_p99 = _median([r.p99_ms for r in runs]), _median([r.p99_ms for r in theirs])
            met = ratio >= 2.0 and p99 <= their_p99
            cpu_ratio = _median([r.cpu_us for r in theirs]) / _median([r.cpu_us for r in runs])
            print(
                f"  {peer:<28} ({best.label:<22}) {size:>4} records: {ratio:5.2f}x req/s, "
                f"p99 {p99:.2f} vs {their_p99:.2f} ms: {'met' if met else 'NOT met'} "
                f"(they use {cpu_ratio:.2f}x our CPU per request)"
            )


if __name__ == "__main__":
    main()
