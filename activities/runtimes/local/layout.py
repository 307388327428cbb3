"""Where a local runtime keeps things: its folders, files and records."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

from mlc import endpoints, isolation

HOST = "127.0.0.1"
HEALTH_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0
HEARTBEAT_INTERVAL_SECONDS = 1.0
LOG_TAIL_LINES = 20
OUTPUT_DRAIN_SECONDS = 5.0
"""After a batch job exits: how long its summary may take to arrive through a pipe that
something it left running (as the worker's own user) still holds open."""

SERVER_MARKER = "mlc.serving"
"""In every model server's command line: a recorded pid is ours only while it still says so."""
STATE_FILE = "deployment.json"
SERVER_LOG = "server.log"
BATCH_LOG = "batch.log"
BATCH_SUMMARY = "batch-summary.json"
"""A forked batch job's standard output (its summary line), in its deployment folder."""
PACKAGE_DIR = "package"
TMP_DIR = "tmp"
HOST_DIR = ".host"
LOCKS_DIR = "_locks"
"""``<runtime_dir>/_locks``: root's file locks (a runtime's shared host: one start or stop at a time)."""
STAGING_DIR = "_staging"
"""``<runtime_dir>/_staging``: root-only, where packages are unpacked before being renamed
into a deployment folder (no runtime can be named ``_staging``)."""
"""The runtime's shared model host, beside its deployment folders (not a deployment id)."""
HOST_STATE = "host.json"
HOST_SOCKET = "host.sock"
"""The shared host's unix socket, in its folder."""
SERVER_SOCKET = "server.sock"
"""A dedicated server's unix socket, in its deployment folder."""
HOST_LOG = "host.log"
MODELS_DIR = "models"


def read_state(workdir: Path, name: str = STATE_FILE) -> dict[str, Any] | None:
    """The runtime's record of the deployment (or, with ``HOST_STATE``, of the host), if
    this process's user wrote it (the model's user owns the folder and could leave a record
    of its own there)."""
    text = isolation.read_own_file(workdir / name)
    try:
        state = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return None
    if not isinstance(state, dict) or "pid" not in state or not ("port" in state or "socket" in state):
        return None
    return dict(state)


def endpoint_of(state: dict[str, Any]) -> str:
    """A recorded server's endpoint: its socket (or, recorded before sockets, its port) and
    the model's path in a shared host."""
    if "socket" in state:
        return endpoints.unix_endpoint(Path(state["socket"]), state.get("path", ""))
    return f"http://{HOST}:{int(state['port'])}{state.get('path', '')}"


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The log's last lines; never through a link or from anything but a plain file."""
    text = isolation.read_tail(path)
    if text is None:
        return "(no log written)" if not path.is_symlink() and not path.exists() else "(log not readable)"
    return "\n".join(deque(text.splitlines(), maxlen=lines)).rstrip()
