"""Batch job throughput per file format against the model's in-process limit.

The cc-fraud example model scores N records. Each job runs the way the local runtime runs
it: ``python -m mlc.serving batch --package P --input IN --output OUT`` in a fresh process.
The job's own time (read, check, score, write; loading the model and importing pyarrow
excluded) and the whole process's wall time (interpreter start, imports and model load
included) are both reported, and each job's rate is set against the 1 M records/s target.
The in-process limit is the model alone on data already in memory: ``score_columns`` on
numpy columns and ``score_batch`` on dicts. The record engine (orjson line by line; what
runs where pyarrow is absent) is timed in-process for comparison.

Fairness rules:

* **Realistic, non-repeating input.** Rows are drawn from a seeded generator with the
  example's own distributions (``examples/models/cc-fraud/generate_data.py``: log-normal
  amounts and distances, daytime-heavy hours, ...), and every row is distinct (duplicates
  are drawn again), so no format gains from repeated rows (repeating a few thousand rows
  would flatter Parquet's dictionary encoding and any compression). The same rows are
  written as JSON lines, Parquet and CSV.
* **Median and spread, not the best.** Every figure is the median (min-max) of ``--runs``
  runs; the format pairs are interleaved within each run (pair A, B, C, D, then again),
  so a busy moment of a shared machine falls on all of them. The load average is printed.
* **Errors fail the run**: a job that exits non-zero or reports a different record count,
  or an output with a different number of rows, stops the bench.

With ``--runtime``, each input format is also scored through the local runtime's driver
(``LocalDriver.run_batch``, what a lifecycle's batch stage calls; its output is JSON lines),
end to end: deployment folder, unpack, job, clean-up. Jobs forked from the warm forkserver
(the default) and spawned as fresh interpreters (``MLC_LOCAL_FORKSERVER=0``) alternate.

    .venv/bin/python bench/bench_batch.py --records 1000000 --runs 5
    .venv/bin/python bench/bench_batch.py --records 1000000 --runs 3 --runtime
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.examples import prepare_example_model  # noqa: E402 (after the path setup)
from mlc.serving import load_model  # noqa: E402
from mlc.serving.batch import _records  # noqa: E402

TARGET = 1_000_000
"""Records per second a batch job should reach end to end (issue 13)."""
PAIRS = [("jsonl", "jsonl"), ("parquet", "parquet"), ("csv", "csv"), ("parquet", "jsonl")]


SEED = 20261207


def generate_table(count: int, seed: int = SEED) -> pa.Table:
    """``count`` distinct transactions drawn like the example's own data (without labels).

    Columns are drawn with numpy (1 M rows in well under a second); rows that repeat an
    earlier one are drawn again until none does."""
    rng = np.random.default_rng(seed)
    hours = np.array([1, 1, 1, 1, 1, 2, 3, 5, 7, 8, 8, 9, 10, 9, 8, 8, 8, 9, 9, 8, 6, 4, 3, 2], dtype=float)

    def draw(rows: int) -> dict[str, np.ndarray]:
        return {
            "amount": np.round(rng.lognormal(mean=3.6, sigma=1.0, size=rows), 2),
            "hour": rng.choice(24, size=rows, p=hours / hours.sum()).astype(np.int64),
            "merchant_risk": np.round(rng.beta(2.0, 8.0, size=rows), 4),
            "distance_from_home": np.round(rng.lognormal(mean=1.8, sigma=1.2, size=rows), 2),
            "foreign": rng.random(rows) < 0.07,
            "card_present": rng.random(rows) < 0.65,
            "velocity_24h": rng.poisson(2.0, size=rows).astype(np.int64),
        }

    columns = draw(count)
    while True:
        matrix = np.column_stack([c.astype(np.float64) for c in columns.values()])
        _, first = np.unique(matrix, axis=0, return_index=True)
        repeated = np.setdiff1d(np.arange(count), first)
        if not len(repeated):
            return pa.table(columns)
        for name, values in draw(len(repeated)).items():
            columns[name][repeated] = values


def write_inputs(work: Path, count: int) -> dict[str, Path]:
    """The same ``count`` distinct records as JSON lines, Parquet and CSV."""
    table = generate_table(count)
    jsonl = work / "in.jsonl"
    with jsonl.open("wb") as out:
        for start in range(0, count, 65_536):
            rows = table.slice(start, 65_536).to_pylist()
            out.write(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    pq.write_table(table, work / "in.parquet")
    pcsv.write_csv(table, work / "in.csv")
    return {"jsonl": jsonl, "parquet": work / "in.parquet", "csv": work / "in.csv"}


def spread(values: list[float], fmt: str = ",.0f") -> str:
    """Median (min-max)."""
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def rows_in(path: Path) -> int:
    """Rows of a job's output file, counted independently of the job's own summary."""
    if path.suffix == ".parquet":
        return int(pq.ParquetFile(path).metadata.num_rows)
    if path.suffix == ".csv":
        return int(pcsv.read_csv(path).num_rows)
    with path.open("rb") as lines:
        return sum(1 for line in lines if line.strip())


def in_process(package: Path, source: Path, count: int, runs: int) -> tuple[list[float], list[float]]:
    """Records/s of ``score_columns`` and of ``score_batch`` (chunks of 65 536) in memory, per run."""
    model = load_model(package)
    assert model.score_columns is not None
    table = pq.read_table(source)
    columns = {name: table.column(name).to_numpy() for name in table.column_names}
    records = table.slice(0, min(count, 200_000)).to_pylist()
    by_columns: list[float] = []
    by_records: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        for start in range(0, count, 65_536):
            model.score_columns({k: v[start : start + 65_536] for k, v in columns.items()})
        by_columns.append(count / (time.perf_counter() - started))
        started = time.perf_counter()
        for start in range(0, len(records), 65_536):
            model.score_batch(records[start : start + 65_536])
        by_records.append(len(records) / (time.perf_counter() - started))
    return by_columns, by_records


def run_job(package: Path, source: Path, target: Path) -> tuple[float, dict[str, object]]:
    """Wall seconds of one ``python -m mlc.serving batch`` process, and its summary."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mlc.serving", "batch", "--package", str(package)]
        + ["--input", str(source), "--output", str(target)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=600,
    )
    wall = time.perf_counter() - started
    summary: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return wall, summary


async def through_runtime(package: Path, inputs: dict[str, Path], work: Path, count: int, runs: int) -> None:
    """``LocalDriver.run_batch`` per input format, forked and spawned, alternating; print both."""
    from activities.runtimes.base import BatchJobRequest
    from activities.runtimes.local.driver import LocalDriver
    from activities.runtimes.local.servers import FORKSERVER_ENV
    from activities.runtimes.local.servers import fork_client as _fork_client
    from mlc.artifacts import ArtifactStore, build_archive
    from mlc.config import Settings
    from mlc.domain import ModelSnapshot, Runtime
    from mlc.manifest import load_manifest

    work.chmod(0o755)  # inputs readable by the job's user: no copy into its folder
    settings = Settings.from_env(home=work / "home")
    manifest = load_manifest(package)
    snapshot = ModelSnapshot(
        model=manifest.name,
        version=1,
        sha256=ArtifactStore(settings.artifact_dir).put(build_archive(package)),
        service_tags=manifest.service_tags,
        entry_module=manifest.entry_module,
        requirements=manifest.requirements,
    )
    driver, runtime = LocalDriver(settings), Runtime(name="bench-batch", stage="DEV")
    _fork_client(settings.home)  # starts it in the background
    for _ in range(600):
        if _fork_client(settings.home) is not None:
            break
        await asyncio.sleep(0.05)
    print(f"through the local runtime (run_batch, output JSON lines), median (min-max) of {runs}:")
    print(f"{'input':<10} {'forked rec/s':>30} {'spawned rec/s':>30}")
    seconds: dict[tuple[str, str], list[float]] = {}
    for _ in range(runs):
        for source in ("jsonl", "parquet", "csv"):
            for mode in ("1", "0"):
                os.environ[FORKSERVER_ENV] = mode
                started = time.perf_counter()
                result = await driver.run_batch(
                    BatchJobRequest(
                        deployment_id=f"bench-batch-{uuid.uuid4().hex[:8]}",
                        snapshot=snapshot,
                        runtime=runtime,
                        stage="DEV",
                        input_path=str(inputs[source]),
                    ),
                    lambda note: None,
                )
                seconds.setdefault((source, mode), []).append(time.perf_counter() - started)
                if result.records != count or rows_in(Path(result.output_path)) != count:
                    raise SystemExit(f"run failed: {source} through the runtime: {result}")
                Path(result.output_path).unlink()
    os.environ.pop(FORKSERVER_ENV, None)
    for source in ("jsonl", "parquet", "csv"):
        forked = [count / s for s in seconds[(source, "1")]]
        spawned = [count / s for s in seconds[(source, "0")]]
        print(f"{source:<10} {spread(forked):>30} {spread(spawned):>30}")


def main() -> None:
    """Write the inputs, time the in-process limit, every format pair and the record engine."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5, help="runs of every format pair (median reported)")
    parser.add_argument("--runtime", action="store_true", help="also through the local runtime's driver")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlc-bench-batch-") as tmp:
        work = Path(tmp)
        package = prepare_example_model(work / "cc-fraud")
        inputs = write_inputs(work, args.records)
        limit_columns, limit_records = in_process(package, inputs["parquet"], args.records, args.runs)
        load = [os.getloadavg()[0]]
        jobs: dict[tuple[str, str], list[tuple[float, dict[str, object]]]] = {}
        for _ in range(args.runs):
            for source, target in PAIRS:
                output = work / f"out.{target}"
                wall, summary = run_job(package, inputs[source], output)
                if summary["records"] != args.records or rows_in(output) != args.records:
                    raise SystemExit(f"run failed: {source} -> {target}: {summary}")
                jobs.setdefault((source, target), []).append((wall, summary))
            load.append(os.getloadavg()[0])
        print(
            f"{args.records:,} distinct records; {os.cpu_count()} cores; load average "
            f"{spread(load, '.1f')}; pyarrow {pa.__version__}, numpy {np.__version__}; "
            f"median (min-max) of {args.runs} runs"
        )
        print(f"in-process limit: score_columns {spread(limit_columns):>36} records/s")
        print(
            f"                  score_batch   {spread(limit_records):>36} records/s (dicts, 65 536 per call)"
        )
        print()
        print(
            f"{'input -> output':<18} {'job rec/s':>32} {'process rec/s':>30} {'job s':>6} "
            f"{'load s':>6} {'of limit':>8} {'job >= 1 M/s':>12}"
        )
        median_limit = statistics.median(limit_columns)
        for (source, target), runs in jobs.items():
            job_rates = [args.records / float(str(summary["seconds"])) for _, summary in runs]
            process_rates = [args.records / wall for wall, _ in runs]
            job = statistics.median(float(str(summary["seconds"])) for _, summary in runs)
            load_s = statistics.median(float(str(summary["load_seconds"])) for _, summary in runs)
            rate = statistics.median(job_rates)
            met = "yes" if rate >= TARGET else "no"
            print(
                f"{source + ' -> ' + target:<18} {spread(job_rates):>32} {spread(process_rates):>30} "
                f"{job:>6.2f} {load_s:>6.2f} {rate / median_limit:>8.0%} {met:>12}"
            )
        model = load_model(package)
        engine: list[float] = []
        for _ in range(args.runs):
            started = time.perf_counter()
            _records(model, inputs["jsonl"], work / "records.jsonl", "jsonl", 65_536)
            engine.append(args.records / (time.perf_counter() - started))
            if rows_in(work / "records.jsonl") != args.records:
                raise SystemExit("run failed: the record engine wrote a different number of rows")
        print(
            f"{'jsonl (record engine, in-process)':<34} {spread(engine):>32} "
            f"{statistics.median(engine) / median_limit:>47.0%}"
        )
        if args.runtime:
            print()
            asyncio.run(through_runtime(package, inputs, work, args.records, args.runs))


if __name__ == "__main__":
    main()
