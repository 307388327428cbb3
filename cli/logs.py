"""Where the log of a worker that the CLI runs goes: a sentence in the terminal, the whole
record (tracebacks included) in a file under ``MLC_HOME``.

Nothing configured logging before, so Python's last-resort handler printed every warning
with its traceback into the terminal: each failed activity attempt (Temporal's worker logs
"Completing activity as failed" with the exception) put a page of frames above the one
line ``mlc demo`` prints about the run. People read the line; the frames are for whoever
debugs, so they go to :data:`LOG_FILE` and, with ``--debug``, to the terminal as well.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cli.context import err_console

LOG_FILE = "worker.log"
"""The worker's log under ``MLC_HOME`` (``mlc dev``, ``mlc demo``, ``mlc worker`` in a terminal)."""
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET = ("httpx", "httpcore")
"""Loggers whose INFO lines (one per HTTP request: health probes, gateway checks) drown the rest."""


def worker_logging(home: Path, *, debug: bool) -> Path:
    """Send the process's log records to ``home``/:data:`LOG_FILE` (INFO and up, with
    tracebacks) and warnings to the terminal as one line each (whole, with ``debug``).

    Returns:
        The log file's path, for the output to name.
    """
    path = home / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(FILE_FORMAT))
    to_terminal = _Terminal()
    to_terminal.setLevel(logging.WARNING)
    to_terminal.setFormatter(logging.Formatter(FILE_FORMAT) if debug else _OneLine(path))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(to_file)
    root.addHandler(to_terminal)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    return path


def service_logging() -> None:
    """A worker whose stderr is no terminal (a container, a service manager): whole records
    to stderr, which is where those keep logs."""
    logging.basicConfig(level=logging.WARNING, format=FILE_FORMAT)


class _Terminal(logging.Handler):
    """Prints through the CLI's error console, so a spinner on the screen stays intact."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            err_console.print(self.format(record), markup=False, highlight=False)
        except Exception:  # a log call must never break the worker
            self.handleError(record)


class _OneLine(logging.Formatter):
    """One sentence per record: what failed, for which run, and why; where the rest is."""

    def __init__(self, log_path: Path) -> None:
        super().__init__()
        self.log_path = log_path

    def format(self, record: logging.LogRecord) -> str:
        reason = _reason(record)
        where = f" (traceback in {self.log_path})" if reason else ""
        activity: dict[str, Any] | None = getattr(record, "temporal_activity", None)
        workflow: dict[str, Any] | None = getattr(record, "temporal_workflow", None)
        if activity and reason:
            return (
                f"run {activity.get('workflow_id')}: activity {activity.get('activity_type')} failed "
                f"(attempt {activity.get('attempt')}): {reason}{where}"
            )
        # Temporal's adapters append their context as " ({...})": the run says it shorter
        headline = (record.getMessage().splitlines() or [record.name])[0].split(" ({")[0]
        run = f"run {workflow.get('workflow_id')}: " if workflow else ""
        return f"{run}{record.levelname.lower()}: {headline}{f': {reason}' if reason else ''}{where}"


def _reason(record: logging.LogRecord) -> str:
    """The message of the record's exception on one line ("" when it carries none)."""
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None:
        return ""
    return " ".join(str(exc).split()) or type(exc).__name__
