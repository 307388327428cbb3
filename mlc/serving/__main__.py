"""Command line of the model server: ``serve`` an endpoint or run one ``batch`` job.

Used by the local runtime (as a child process) and as the entry point of model
containers, so failures print one readable line to stderr and exit non-zero. Request
limits default to the ``MLC_SERVING_*`` variables (see :mod:`mlc.serving.limits`), so a
runtime sets them per deployment through the environment; the flags override them.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from mlc.errors import MLCError
from mlc.serving.app import create_app
from mlc.serving.batch import DEFAULT_CHUNK_SIZE, run_batch
from mlc.serving.limits import (
    LIMIT_CONCURRENCY_ENV,
    MAX_BODY_BYTES_ENV,
    MAX_RECORDS_ENV,
    ServingLimits,
)


def _positive(text: str) -> int:
    """argparse type: an integer above zero (a zero limit would refuse every request)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mlc.serving", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the model over HTTP until stopped")
    serve.add_argument("--package", type=Path, required=True, help="model package directory")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--uds", type=Path, help="serve on this unix socket instead of --host/--port")
    serve.add_argument(
        "--max-batch",
        type=_positive,
        help=f"largest /score and /metrics array (default ${MAX_RECORDS_ENV} or 10000)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=_positive,
        help=f"largest request body (default ${MAX_BODY_BYTES_ENV} or 10 MiB)",
    )
    serve.add_argument(
        "--limit-concurrency",
        type=_positive,
        help=f"connections and requests in flight before 503 (default ${LIMIT_CONCURRENCY_ENV} or 64)",
    )
    batch = commands.add_parser("batch", help="score a file of records and exit")
    batch.add_argument("--package", type=Path, required=True, help="model package directory")
    batch.add_argument("--input", type=Path, required=True, help="records: .parquet, .csv, else JSON lines")
    batch.add_argument(
        "--output",
        type=Path,
        required=True,
        help="outputs, record for record: .parquet, .csv, else JSON lines",
    )
    batch.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    many = commands.add_parser("serve-many", help="serve every package in a folder under /models/{id}/")
    many.add_argument("--models-dir", type=Path, required=True, help="one model package per sub-folder")
    many.add_argument("--host", default="127.0.0.1")
    many.add_argument("--port", type=int, default=8080)
    many.add_argument("--uds", type=Path, help="serve on this unix socket instead of --host/--port")
    many.add_argument("--memory-budget-mb", type=float, help="evict models above this RSS (default 4096)")
    forks = commands.add_parser("forkserver", help="import once, then fork model servers on request")
    forks.add_argument("--socket", type=Path, required=True, help="unix socket to listen on")
    forks.add_argument("--title-room", default="", help="padding: room for the children's command lines")
    return parser


SOCKET_PATH_MAX = 100
"""Longest socket path bound as given (``sun_path`` holds 108 bytes); a longer one is
bound by its name from its folder."""


def listen_on(args: argparse.Namespace) -> dict[str, Any]:
    """uvicorn's keywords for where to listen: ``--uds`` (a stale socket file of an earlier
    server removed first; a long path bound relative to its folder) or ``--host``/``--port``."""
    if args.uds is None:
        return {"host": args.host, "port": args.port}
    path = Path(args.uds)
    path.unlink(missing_ok=True)
    if len(str(path).encode()) > SOCKET_PATH_MAX:
        os.chdir(path.parent)
        return {"uds": path.name}
    return {"uds": str(path)}


def freeze_heap() -> None:
    """Hide everything loaded so far from the cyclic garbage collector.

    The interpreter, the libraries and the model live as long as the server. Left in
    the collector's view, each full collection walks them all (about 110 000 objects and
    60 ms with scikit-learn loaded, measured) while a request waits: that was the largest
    part of the server's p99. Frozen, a full collection only walks what requests made.

    There is no collection before the freeze: with scikit-learn and the example model
    loaded it found about 1 200 unreachable objects and freed no measurable memory, but
    took 60-100 ms of every start. Turns the collector back on if :func:`main` turned it
    off for the start.
    """
    gc.freeze()
    gc.enable()


def main(argv: list[str] | None = None) -> int:
    """Run the command; return the process exit code."""
    args = _parser().parse_args(argv)
    if args.command in ("serve", "serve-many"):
        # No cyclic collections while the libraries and the model are imported: they make
        # long-lived objects only, the collections found little and cost 10-20 % of a
        # container's start (measured). freeze_heap() collects once and turns it back on.
        gc.disable()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "forkserver":
            from mlc.serving.forkserver import preload_modules, serve_forks

            serve_forks(args.socket, preload_modules(), main)
            return 0
        if args.command == "serve-many":
            import uvicorn

            from mlc.serving.multi import ModelHost, create_host_app

            host = ModelHost(args.models_dir, memory_budget_mb=args.memory_budget_mb)
            freeze_heap()
            uvicorn.run(
                create_host_app(host),
                **listen_on(args),
                access_log=False,
                log_level="info",
                timeout_graceful_shutdown=5,
                limit_concurrency=host.limits.limit_concurrency,
            )
            return 0
        if args.command == "serve":
            limits = ServingLimits.from_env()
            if args.limit_concurrency is not None:
                limits = ServingLimits.model_validate(
                    {**limits.model_dump(), "limit_concurrency": args.limit_concurrency}
                )
            app = create_app(
                args.package, max_batch=args.max_batch, max_body_bytes=args.max_body_bytes, limits=limits
            )
            logging.getLogger("mlc.serving").info("model loaded from %s", args.package)
            import uvicorn

            freeze_heap()

            uvicorn.run(
                app,
                **listen_on(args),
                access_log=False,
                log_level="info",
                timeout_graceful_shutdown=5,
                limit_concurrency=limits.limit_concurrency,
            )
            return 0
        summary = run_batch(args.package, args.input, args.output, chunk_size=args.chunk_size)
    except MLCError as exc:
        print(f"mlc.serving {args.command}: {exc}", file=sys.stderr)
        return 1
    print(orjson.dumps(summary).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
