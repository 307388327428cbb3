"""Batch job throughput per file format against the model's in-process limit.

The cc-fraud example model scores N records (evaluation rows repeated, label dropped). Each
job runs the way the local runtime runs it: ``python -m mlc.serving batch --package P
--input IN --output OUT`` in a fresh process. The job's own time (read, check, score,
write; loading the model and importing pyarrow excluded) and the whole process's wall time
(interpreter start, imports and model load included) are both reported, and each job's
rate is set against the 1 M records/s target. The in-process limit is the model alone on
data already in memory: ``score_columns`` on numpy columns and ``score_batch`` on dicts.
The record engine (orjson line by line; what runs where pyarrow is absent) is timed
in-process for comparison.

With ``--runtime``, each input format is also scored through the local runtime's driver
(``LocalDriver.run_batch``, what a lifecycle's batch stage calls; its output is JSON lines),
end to end: deployment folder, unpack, job, clean-up. Jobs forked from the warm forkserver
(the default) and spawned as fresh interpreters (``MLC_LOCAL_FORKSERVER=0``) alternate.

    .venv/bin/python bench/bench_batch.py --records 1000000
    .venv/bin/python bench/bench_batch.py --records 1000000 --runs 2 --runtime
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


def write_inputs(package: Path, work: Path, count: int) -> dict[str, Path]:
    """The same ``count`` records as JSON lines, Parquet and CSV."""
    lines = (package / "data" / "eval.jsonl").read_bytes().splitlines()
    rows = [orjson.dumps({k: v for k, v in orjson.loads(x).items() if k != "is_fraud"}) for x in lines]
    jsonl = work / "in.jsonl"
    jsonl.write_bytes(b"\n".join(rows[i % len(rows)] for i in range(count)) + b"\n")
    table = pa.Table.from_pylist([orjson.loads(r) for r in rows])
    table = pa.concat_tables([table] * (count // table.num_rows + 1)).slice(0, count)
    pq.write_table(table, work / "in.parquet")
    pcsv.write_csv(table, work / "in.csv")
    return {"jsonl": jsonl, "parquet": work / "in.parquet", "csv": work / "in.csv"}


def in_process(package: Path, source: Path, count: int, runs: int) -> tuple[float, float]:
    """Best records/s of ``score_columns`` and of ``score_batch`` (chunks of 65 536) in memory."""
    model = load_model(package)
    assert model.score_columns is not None
    table = pq.read_table(source)
    columns = {name: table.column(name).to_numpy() for name in table.column_names}
    records = table.slice(0, min(count, 200_000)).to_pylist()
    by_columns = by_records = 0.0
    for _ in range(runs):
        started = time.perf_counter()
        for start in range(0, count, 65_536):
            model.score_columns({k: v[start : start + 65_536] for k, v in columns.items()})
        by_columns = max(by_columns, count / (time.perf_counter() - started))
        started = time.perf_counter()
        for start in range(0, len(records), 65_536):
            model.score_batch(records[start : start + 65_536])
        by_records = max(by_records, len(records) / (time.perf_counter() - started))
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
    print(f"through the local runtime (run_batch, output JSON lines), best of {runs}:")
    print(f"{'input':<10} {'forked rec/s':>18} {'spawned rec/s':>19} {'forked s':>9} {'spawned s':>10}")
    for source in ("jsonl", "parquet", "csv"):
        best = {"1": float("inf"), "0": float("inf")}
        for _ in range(runs):
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
                best[mode] = min(best[mode], time.perf_counter() - started)
                assert result.records == count, result
                Path(result.output_path).unlink()
        os.environ.pop(FORKSERVER_ENV, None)
        print(
            f"{source:<10} {count / best['1']:>18,.0f} {count / best['0']:>19,.0f} "
            f"{best['1']:>9.2f} {best['0']:>10.2f}"
        )


def main() -> None:
    """Write the inputs, time the in-process limit, every format pair and the record engine."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3, help="runs per format pair (best is reported)")
    parser.add_argument("--runtime", action="store_true", help="also through the local runtime's driver")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlc-bench-batch-") as tmp:
        work = Path(tmp)
        package = prepare_example_model(work / "cc-fraud")
        inputs = write_inputs(package, work, args.records)
        limit_columns, limit_records = in_process(package, inputs["parquet"], args.records, args.runs)
        print(
            f"{args.records:,} records; {os.cpu_count()} cores; load average "
            f"{os.getloadavg()[0]:.1f}; pyarrow {pa.__version__}, numpy {np.__version__}"
        )
        print(f"in-process limit: score_columns {limit_columns:>12,.0f} records/s")
        print(f"                  score_batch   {limit_records:>12,.0f} records/s (dicts, 65 536 per call)")
        print()
        print(
            f"{'input -> output':<20} {'job rec/s':>12} {'process rec/s':>14} {'job s':>7} "
            f"{'load s':>7} {'wall s':>7} {'of limit':>9}  {'job >= 1 M/s':>12}"
        )
        for source, target in PAIRS:
            best: tuple[float, dict[str, object]] | None = None
            for _ in range(args.runs):
                wall, summary = run_job(package, inputs[source], work / f"out.{target}")
                if best is None or float(str(summary["seconds"])) < float(str(best[1]["seconds"])):
                    best = (wall, summary)
            assert best is not None
            wall, summary = best
            assert summary["records"] == args.records, summary
            job = float(str(summary["seconds"]))
            met = "yes" if args.records / job >= TARGET else "no"
            print(
                f"{source + ' -> ' + target:<20} {args.records / job:>12,.0f} {args.records / wall:>14,.0f} "
                f"{job:>7.2f} {float(str(summary['load_seconds'])):>7.2f} {wall:>7.2f} "
                f"{args.records / job / limit_columns:>8.0%}  {met:>12}"
            )
        model = load_model(package)
        started = time.perf_counter()
        _records(model, inputs["jsonl"], work / "records.jsonl", "jsonl", 65_536)
        seconds = time.perf_counter() - started
        print(
            f"{'jsonl (record engine)':<20} {args.records / seconds:>12,.0f} {'':>14} "
            f"{seconds:>7.2f} {'':>7} {'':>7} {args.records / seconds / limit_columns:>8.0%}"
        )
        if args.runtime:
            print()
            asyncio.run(through_runtime(package, inputs, work, args.records, args.runs))


if __name__ == "__main__":
    main()
