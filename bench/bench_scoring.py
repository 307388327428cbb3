"""Online scoring throughput: our model server vs ``mlflow models serve`` and MLServer.

All servers serve the same trained cc-fraud scikit-learn pipeline (``model.joblib`` of
``examples/models/cc-fraud``), one at a time, on 127.0.0.1, each with one worker process:

* ours: ``python -m mlc.serving serve`` (one uvicorn process), JSON records as the
  manifest defines them (raw fields; the package's ``score.py`` computes the features);
* mlflow 3.17.2: ``mlflow.sklearn.save_model(..., pyfunc_predict_fn="predict_proba")``
  served by ``mlflow models serve -w 1 --env-manager local``, requests in its fastest
  ``{"inputs": [[...feature row...]]}`` form (features precomputed by the client);
* MLServer 1.7.1 with ``mlserver_sklearn.SKLearnModel`` (``predict_fn: predict_proba``),
  V2 inference protocol JSON (one FP64 tensor of feature rows), measured twice: with
  ``parallel_workers: 0`` (inference in the one server process) and with its default
  ``parallel_workers: 1`` (a REST process plus one inference worker process).

The peers run in their own virtual environments under ``bench/.venvs/`` (created on
first use, with the same scikit-learn version as this one), because MLServer pins
fastapi, starlette and protobuf versions the project does not use.

Load comes from ``wrk`` (Debian package) with a Lua script per request body: fixed
connections, threads and duration, for single-record and 100-record requests.

    .venv/bin/python bench/bench_scoring.py --duration 10
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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
MLFLOW_VERSION = "3.17.2"
"""3.18.0 is listed but its mlflow-skinny dependency is not served."""
MLSERVER_VERSION = "1.7.1"
UVLOOP_PIN = "uvloop<0.22"
"""The uvloop 0.23 that MLServer pulls in makes its worker die at start."""
READY_TIMEOUT_SECONDS = 120.0
PIP_TIMEOUT_SECONDS = 900.0
WRK_SLACK_SECONDS = 30.0
"""wrk must finish within its duration plus this, or the benchmark stops."""

LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open("{body}", "rb"))
wrk.body = f:read("*a")
f:close()

function done(summary, latency, requests)
  io.write(string.format(
    "WRK_JSON {{\\"requests\\": %d, \\"duration_us\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d, "
    .. "\\"mean_us\\": %f, \\"non2xx\\": %d, \\"connect\\": %d, \\"read\\": %d, \\"write\\": %d, "
    .. "\\"timeout\\": %d}}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout))
end
"""


@dataclass
class Load:
    """What one wrk run measured."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


@dataclass
class Server:
    """How to start one server and talk to it."""

    label: str
    command: list[str]
    health_path: str
    score_path: str
    bodies: dict[int, Path]
    """Request body file per records-per-request."""
    processes: str
    env: dict[str, str] | None = None
    cwd: Path | None = None


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


def ensure_venv(name: str, check: str, requirements: Sequence[str]) -> Path:
    """Create ``bench/.venvs/NAME`` with ``requirements`` unless ``check`` already imports."""
    python = _venv_python(name)
    if python.exists():
        probe = subprocess.run([python, "-c", check], capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            return python
    print(f"installing {' '.join(requirements)} into {VENVS / name} (a few minutes, once)", flush=True)
    VENVS.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", VENVS / name], check=True, timeout=300)
    log = VENVS / f"{name}-pip.log"
    with log.open("w") as out:
        done = subprocess.run(
            [python, "-m", "pip", "install", "--disable-pip-version-check", *requirements],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=PIP_TIMEOUT_SECONDS,
        )
    if done.returncode != 0:
        raise SystemExit(f"pip install into {VENVS / name} failed; see {log}")
    subprocess.run([python, "-c", check], check=True, timeout=120)
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
import sys, joblib, mlflow.sklearn
bundle = joblib.load(sys.argv[1])
mlflow.sklearn.save_model(bundle["pipeline"], sys.argv[2], pyfunc_predict_fn="predict_proba")
"""

MLSERVER_EXPORT = """
import sys, joblib
bundle = joblib.load(sys.argv[1])
joblib.dump(bundle["pipeline"], sys.argv[2])
"""


def feature_rows(package: Path, records: list[dict[str, Any]]) -> list[list[float]]:
    """The model's feature matrix for ``records``, from the package's own ``features``."""
    spec = importlib.util.spec_from_file_location("_bench_cc_fraud_score", package / "score.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows: list[list[float]] = module.features(records).tolist()
    return rows


def write_bodies(
    work: Path, package: Path, batch: int
) -> tuple[dict[str, dict[int, Path]], list[dict[str, Any]]]:
    """Request bodies per server style and size, and the records they carry."""
    manifest = load_manifest(package)
    label = manifest.evaluation.label if manifest.evaluation else "is_fraud"
    lines = (package / "data" / "eval.jsonl").read_text().splitlines()
    records = [{k: v for k, v in json.loads(line).items() if k != label} for line in lines[:batch]]
    rows = feature_rows(package, records)
    bodies: dict[str, dict[int, Path]] = {"ours": {}, "mlflow": {}, "v2": {}}
    for size in (1, batch):
        docs = {
            "ours": records[0] if size == 1 else records[:size],
            "mlflow": {"inputs": rows[:size]},
            "v2": {
                "inputs": [
                    {
                        "name": "input-0",
                        "shape": [size, len(rows[0])],
                        "datatype": "FP64",
                        "data": [x for row in rows[:size] for x in row],
                    }
                ]
            },
        }
        for style, doc in docs.items():
            path = work / f"body-{style}-{size}.json"
            path.write_text(json.dumps(doc, separators=(",", ":")))
            bodies[style][size] = path
    return bodies, records


def export_mlflow(python: Path, package: Path, dest: Path) -> Path:
    """``mlflow.sklearn.save_model`` of the trained pipeline, run in the mlflow venv."""
    shutil.rmtree(dest, ignore_errors=True)
    subprocess.run(
        [python, "-c", MLFLOW_EXPORT, package / "model.joblib", dest],
        check=True,
        timeout=300,
        capture_output=True,
    )
    return dest


def export_mlserver(package: Path, root: Path, *, parallel_workers: int, ports: tuple[int, int, int]) -> Path:
    """An MLServer repository: settings.json plus one SKLearnModel with its joblib file."""
    python = _venv_python("mlserver")
    model_dir = root / "cc-fraud"
    model_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [python, "-c", MLSERVER_EXPORT, package / "model.joblib", model_dir / "model.joblib"],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (model_dir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "cc-fraud",
                "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib", "extra": {"predict_fn": "predict_proba"}},
            }
        )
    )
    http, grpc, metrics = ports
    (root / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": http,
                "grpc_port": grpc,
                "metrics_port": metrics,
                "parallel_workers": parallel_workers,
            }
        )
    )
    return root


# --- running servers -------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def running(server: Server, base: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
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
            with httpx.Client(base_url=base, timeout=2.0) as client:
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
        return [float(row[1]) for row in body["predictions"]]
    data = body["outputs"][0]["data"]
    return [float(x) for x in data[1::2]]


def check_outputs(server: Server, style: str, base: str, expected: list[float]) -> None:
    """Every server must return the same probabilities for the batch body."""
    size = max(server.bodies)
    with httpx.Client(base_url=base, timeout=30.0) as client:
        response = client.post(
            server.score_path,
            content=server.bodies[size].read_bytes(),
            headers={"Content-Type": "application/json"},
        )
    if response.status_code != 200:
        raise SystemExit(f"{server.label}: {response.status_code} {response.text[:300]}")
    got = probabilities(style, response.json())
    worst = max(abs(a - b) for a, b in zip(got, expected[:size], strict=True))
    if worst > 1e-9:
        raise SystemExit(f"{server.label}: probabilities differ from ours by up to {worst}")


def wrk_run(
    wrk: str, url: str, body: Path, *, threads: int, connections: int, seconds: int, work: Path
) -> Load:
    """One bounded wrk run against ``url`` posting ``body``."""
    script = work / f"{body.stem}.lua"
    script.write_text(LUA.format(body=body))
    out = subprocess.run(
        [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + WRK_SLACK_SECONDS,
        check=True,
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    errors = sum(data[k] for k in ("non2xx", "connect", "read", "write", "timeout"))
    return Load(
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=errors,
    )


# --- main ------------------------------------------------------------------------------


def main() -> None:
    """Prepare models and environments, measure each server in turn, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each measurement")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100, help="records per batch request")
    parser.add_argument(
        "--servers",
        default="ours,mlflow,mlserver,mlserver-w1",
        help="comma-separated subset of ours,mlflow,mlserver,mlserver-w1",
    )
    parser.add_argument("--keep", type=Path, help="keep models, bodies and server logs in this folder")
    args = parser.parse_args()
    wanted = args.servers.split(",")

    wrk = ensure_wrk()
    sk = sklearn.__version__
    mlflow_python = (
        ensure_venv(
            "mlflow",
            f"import mlflow.sklearn, sklearn; assert sklearn.__version__ == {sk!r}",
            [f"mlflow=={MLFLOW_VERSION}", f"scikit-learn=={sk}"],
        )
        if "mlflow" in wanted
        else None
    )
    if any(w.startswith("mlserver") for w in wanted):
        ensure_venv(
            "mlserver",
            f"import mlserver_sklearn, sklearn; assert sklearn.__version__ == {sk!r}",
            [
                f"mlserver=={MLSERVER_VERSION}",
                f"mlserver-sklearn=={MLSERVER_VERSION}",
                UVLOOP_PIN,
                f"scikit-learn=={sk}",
            ],
        )

    with tempfile.TemporaryDirectory(prefix="mlc-bench-scoring-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        package = prepare_example_model(work / "cc-fraud")
        bodies, _records = write_bodies(work, package, args.batch)
        servers: list[tuple[str, Server, int]] = []
        if "ours" in wanted:
            port = free_port()
            cmd = [sys.executable, "-m", "mlc.serving", "serve", "--package", str(package)]
            cmd += ["--host", "127.0.0.1", "--port", str(port)]
            servers.append(
                (
                    "ours",
                    Server("ours (mlc.serving)", cmd, "/health", "/score", bodies["ours"], "1 process"),
                    port,
                )
            )
        if "mlflow" in wanted and mlflow_python is not None:
            model = export_mlflow(mlflow_python, package, work / "mlflow-model")
            port = free_port()
            cmd = [str(mlflow_python.parent / "mlflow"), "models", "serve", "-m", str(model)]
            cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
            servers.append(
                (
                    "mlflow",
                    Server(
                        f"mlflow {MLFLOW_VERSION}",
                        cmd,
                        "/ping",
                        "/invocations",
                        bodies["mlflow"],
                        "1 uvicorn worker",
                        env=_venv_env("mlflow", MLFLOW_TRACKING_URI=f"file://{work}/mlruns"),
                    ),
                    port,
                ),
            )
        for name, workers in (("mlserver", 0), ("mlserver-w1", 1)):
            if name not in wanted:
                continue
            ports = (free_port(), free_port(), free_port())
            repo = export_mlserver(package, work / name, parallel_workers=workers, ports=ports)
            cmd = [str(VENVS / "mlserver" / "bin" / "mlserver"), "start", str(repo)]
            described = "1 process" if workers == 0 else "REST process + 1 inference worker"
            servers.append(
                (
                    "v2",
                    Server(
                        f"MLServer {MLSERVER_VERSION} pw={workers}",
                        cmd,
                        "/v2/health/ready",
                        "/v2/models/cc-fraud/infer",
                        bodies["v2"],
                        described,
                        env=_venv_env("mlserver"),
                        cwd=repo,
                    ),
                    ports[0],
                )
            )

        expected = _expected(package, work, bodies["ours"][args.batch])
        results: dict[str, dict[int, Load]] = {}
        for style, server, port in servers:
            base = f"http://127.0.0.1:{port}"
            print(f"measuring {server.label} ({server.processes}) on {base}", flush=True)
            with running(server, base, work / f"{server.label.split()[0]}-{port}.log"):
                check_outputs(server, style, base, expected)
                results[server.label] = {}
                for size, body in sorted(server.bodies.items()):
                    url = base + server.score_path
                    if args.warmup:
                        wrk_run(
                            wrk,
                            url,
                            body,
                            threads=args.threads,
                            connections=args.connections,
                            seconds=args.warmup,
                            work=work,
                        )
                    results[server.label][size] = wrk_run(
                        wrk,
                        url,
                        body,
                        threads=args.threads,
                        connections=args.connections,
                        seconds=args.duration,
                        work=work,
                    )
        report(servers, results, args)


def _expected(package: Path, work: Path, body: Path) -> list[float]:
    """Our own probabilities for the batch body, from the package's score_batch in-process."""
    from mlc.serving import load_model

    records = json.loads(body.read_text())
    return [float(o["probability"]) for o in load_model(package).score_batch(records)]


def report(
    servers: list[tuple[str, Server, int]], results: dict[str, dict[int, Load]], args: argparse.Namespace
) -> None:
    """Print one row per server and size, and our ratio against each peer."""
    print()
    print(
        f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores; wrk -t{args.threads} "
        f"-c{args.connections} -d{args.duration}s (after {args.warmup} s warm-up); "
        f"scikit-learn {sklearn.__version__}"
    )
    print("every server runs ONE worker process serving the same pipeline (MLServer pw=1 adds one inference")
    print("worker process, its default); ours scores raw records and computes features in score.py,")
    print("the peers get precomputed feature rows in their fastest documented request format.")
    print()
    print(
        f"{'server':<24} {'processes':<34} {'records':>7} {'req/s':>9} {'rec/s':>10} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
    )
    for _, server, _ in servers:
        for size, load in sorted(results[server.label].items()):
            print(
                f"{server.label:<24} {server.processes:<34} {size:>7} {load.rps:>9.0f} "
                f"{load.rps * size:>10.0f} {load.p50_ms:>8.2f} {load.p99_ms:>8.2f} {load.errors:>6}"
            )
    peers = [s for style, s, _ in servers if style != "ours"]
    for _, mine, _ in [x for x in servers if x[0] == "ours"]:
        print()
        print(
            f"{mine.label + ' vs':<24} {'records':>7} {'req/s ratio':>12} {'p50 ratio':>10} {'p99 ratio':>10}"
        )
        for peer in peers:
            for size, load in sorted(results[peer.label].items()):
                ours = results[mine.label][size]
                print(
                    f"  {peer.label:<22} {size:>7} {ours.rps / load.rps:>11.2f}x "
                    f"{load.p50_ms / ours.p50_ms:>9.2f}x {load.p99_ms / ours.p99_ms:>9.2f}x"
                )
    print("(ratios > 1 favour ours: our req/s over theirs, their latency over ours)")


if __name__ == "__main__":
    main()
