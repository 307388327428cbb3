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

    .venv/bin/python bench/bench_batch.py --records 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlc.examples import prepare_example_model  # noqa: E402 (after the path setup)
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


def main() -> None:
    """Write the inputs, time the in-process limit, every format pair and the record engine."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3, help="runs per format pair (best is reported)")
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


if __name__ == "__main__":
    main()
