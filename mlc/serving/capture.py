"""Recording a model server's answers to requests the gateway marked, for shadow comparisons.

When a runtime's gateway mirrors live traffic to a shadow version, it sends the same
request to both versions with the same ``X-Request-ID`` and the ``X-MLC-Capture`` header
(set by the gateway only). Each server then appends ``{"t", "id", "out"}`` as one JSON
line to ``$TMPDIR/mlc-capture.jsonl``, its own temp folder (the deployment folder's
``tmp`` on a local runtime, the container's ``/tmp`` on a docker one), and the runtime
joins both versions' lines by request id. The file is bounded: past
:data:`CAPTURE_MAX_BYTES` it becomes ``mlc-capture.jsonl.1`` (replacing the older one)
and a new one starts, so capturing never fills a disk.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

CAPTURE_HEADER = "x-mlc-capture"
REQUEST_ID_HEADER = "x-request-id"
CAPTURE_FILE = "mlc-capture.jsonl"
CAPTURE_MAX_BYTES = 8 * 1024 * 1024
"""Size at which the capture file is rotated (two files at most: about 16 MiB)."""

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_log = logging.getLogger("mlc.serving")


def capture_path() -> Path:
    """Where this server records answers: ``$TMPDIR/mlc-capture.jsonl`` (``/tmp`` by default)."""
    return Path(os.environ.get("TMPDIR") or "/tmp") / CAPTURE_FILE


class AnswerCapture:
    """Appends answers to a bounded JSON-lines file; never fails the request it records."""

    def __init__(self, path: Path, *, max_bytes: int = CAPTURE_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._fd: int | None = None
        self._size = 0
        self._broken = False

    def record(self, request_id: str | None, output: Any) -> None:
        """Append ``output`` under ``request_id`` (ignored without a well-formed id)."""
        if self._broken or request_id is None or not _REQUEST_ID.match(request_id):
            return
        line = orjson.dumps(
            {"t": time.time(), "id": request_id, "out": output}, option=orjson.OPT_SERIALIZE_NUMPY
        )
        try:
            if self._fd is None or self._size >= self.max_bytes:
                self._open(rotate=self._fd is not None)
            assert self._fd is not None
            self._size += os.write(self._fd, line + b"\n")
        except OSError as exc:  # a read-only or full disk: stop capturing, keep scoring
            self._broken = True
            _log.warning("cannot record answers in %s (%s); shadow comparisons get none", self.path, exc)

    def _open(self, *, rotate: bool) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if rotate:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size


def read_answers(lines: Iterable[bytes | str], *, since: float = 0.0) -> dict[str, Any]:
    """Request id -> answer from capture lines recorded at or after ``since`` (epoch seconds)."""
    answers: dict[str, Any] = {}
    for line in lines:
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a line cut by rotation or still being written
        if not isinstance(entry, dict) or "id" not in entry:
            continue
        try:
            recorded = float(entry.get("t", 0))
        except (TypeError, ValueError):
            continue  # not a line a server wrote ("t" is the model's to forge): skipped, not fatal
        if recorded >= since:
            answers[str(entry["id"])] = entry.get("out")
    return answers
