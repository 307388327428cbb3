"""``python -m mlc.streaming consume --package DIR``: one streaming consumer, until stopped.

Started by the local runtime (a child process) and as the command of streaming
containers; the configuration comes from ``MLC_STREAM_CONFIG`` (JSON). Failures print one
readable line to stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from mlc.errors import MLCError
from mlc.streaming.consumer import STREAM_CONFIG_ENV, serve
from mlc.streaming.settings import StreamConfig


def main(argv: list[str] | None = None) -> int:
    """Run the consumer; return the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m mlc.streaming", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    consume = commands.add_parser("consume", help="score the deployment's topics until stopped")
    consume.add_argument("--package", type=Path, required=True, help="model package directory")
    consume.add_argument(
        "--score-socket",
        type=Path,
        help="score through the model server on this unix socket instead of loading the model",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: one line per batch sent to the model server.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    raw = os.environ.get(STREAM_CONFIG_ENV)
    if not raw:
        print(
            f"mlc.streaming consume: {STREAM_CONFIG_ENV} is not set (the runtime driver sets it)",
            file=sys.stderr,
        )
        return 2
    try:
        config = StreamConfig.model_validate_json(raw)
        serve(args.package, config, score_socket=args.score_socket)
    except ValidationError as exc:
        print(
            f"mlc.streaming consume: {STREAM_CONFIG_ENV} is not a valid configuration: {exc}", file=sys.stderr
        )
        return 2
    except (MLCError, ValueError) as exc:
        print(f"mlc.streaming consume: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
