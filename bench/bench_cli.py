"""Wall time of ``mlc status`` and ``mlc deployments``: whole processes, repeated (hyperfine-style).

Each run is a fresh ``python -m mlc ...`` process against an embedded PostgreSQL holding
the migrated inventory (empty tables: the time is the interpreter, imports, connecting
and one query; rendering a few rows adds little). With ``--before DIR`` (a copy of an
older ``mlc`` package, e.g. ``git archive HEAD~5 mlc | tar -x -C DIR``) the same commands
run from that code too, interleaved with ours so both see the same machine load.

    .venv/bin/python bench/bench_cli.py --runs 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.stack.dev_postgres import DevPostgres  # noqa: E402 (after the path setup)

COMMANDS = (["status"], ["deployments"], ["--help"])


def timed(args: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one whole CLI process; it must exit 0.

    It runs in ``/`` so that ``python -m`` does not import the ``mlc`` of the current folder
    instead of the one ``PYTHONPATH`` names.
    """
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "mlc", *args], env=env, check=True, capture_output=True, timeout=60, cwd="/"
    )
    return time.perf_counter() - started


def main() -> None:
    """Start PostgreSQL, migrate once, then time each command ``--runs`` times per code version."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--before", type=Path, help="folder holding an older mlc package to compare with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlc-bench-cli-") as tmp:
        work = Path(tmp)
        postgres = DevPostgres(work / "pg", work / "pg.log")
        url = postgres.start()
        try:
            base = {**os.environ, "MLC_HOME": str(work / "home"), "MLC_DATABASE_URL": url}
            versions = {"ours": {**base, "PYTHONPATH": str(ROOT)}}
            if args.before:
                versions["before"] = {**base, "PYTHONPATH": str(args.before.resolve())}
            for env in versions.values():
                timed(["status"], env)  # the first command migrates the inventory
            times: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.warmup):
                for env in versions.values():
                    for command in COMMANDS:
                        timed(command, env)
            for _ in range(args.runs):
                for label, env in versions.items():
                    for command in COMMANDS:
                        times.setdefault((label, " ".join(command)), []).append(timed(command, env))
        finally:
            postgres.stop()
    print(
        f"{args.runs} runs each after {args.warmup} warm-up rounds, interleaved; {os.cpu_count()} cores; "
        f"load average {os.getloadavg()[0]:.1f}; an empty `python -c pass` is the floor"
    )
    floor = []
    for _ in range(args.runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        floor.append(time.perf_counter() - started)
    print(f"{'code':<8} {'command':<14} {'min ms':>8} {'median ms':>10} {'mean ms':>8} {'max ms':>8}")
    for (label, command), values in times.items():
        print(
            f"{label:<8} {command:<14} {min(values) * 1000:>8.0f} {statistics.median(values) * 1000:>10.0f} "
            f"{statistics.fmean(values) * 1000:>8.0f} {max(values) * 1000:>8.0f}"
        )
    print(f"{'python':<8} {'-c pass':<14} {min(floor) * 1000:>8.0f} {statistics.median(floor) * 1000:>10.0f}")


if __name__ == "__main__":
    main()
