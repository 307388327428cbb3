"""The local gateway: both nginx tiers as detached processes on the worker's host."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from activities.runtimes.base import Heartbeat
from activities.runtimes.gateway.image import nginx_binary
from activities.runtimes.gateway.nginx import (
    ROUTES_SOCKET,
    NginxPaths,
)
from activities.runtimes.gateway.tier import (
    MAIN_FILES,
    STOP_TIMEOUT_SECONDS,
    TIERS,
    Gateway,
    Tier,
    listen_host,
)
from mlc import endpoints, isolation, processes
from mlc.errors import DeploymentFailedError

BACKENDS_DIR = "backends"
"""In a local gateway's scratch folder: links to the sockets of the servers it routes to."""


class LocalGateway(Gateway):
    """Both tiers as detached nginx processes of the worker's host."""

    def _state_path(self, tier: Tier) -> Path:
        return self.root / f"{tier}.json"

    def _service_user(self) -> isolation.ModelUser | None:
        """The installation's gateway user when the worker runs as root (see
        :func:`mlc.isolation.service_user`: not ``nobody``, which every local account
        falls back to, nor the Temporal proxy's), else None (workers run as the worker)."""
        return isolation.service_user(self.settings.home, "gateway") if os.geteuid() == 0 else None

    def worker_user(self) -> str | None:
        """``NAME NAME`` of the gateway user (see :meth:`_service_user`), or None."""
        user = self._service_user()
        return None if user is None else f"{isolation.service_name(user)} {isolation.service_name(user)}"

    def _names(self) -> list[str]:
        """The prefix nginx runs under so that it finds the gateway user by name (none
        when it runs as the worker's user)."""
        user = self._service_user()
        return [] if user is None else isolation.naming([user], self.root)

    def _scratch(self) -> Path:
        """Request-body buffers and the tier socket: ``root/run``, or a folder of root's with a
        random name in the system temp dir when workers drop to the gateway user (who may
        not traverse ``MLC_HOME``), recorded in ``root/scratch`` (see
        :func:`mlc.isolation.private_temp_folder`: nobody can take its name first)."""
        if self.worker_user() is None:
            return self.root / "run"
        return isolation.private_temp_folder(self.root / "scratch", prefix="mlc-gateway-")

    @property
    def paths(self) -> NginxPaths:
        """Host paths."""
        scratch = str(self._scratch())
        return NginxPaths(
            conf=str(self.conf), logs=str(self.logs), temp=scratch, pid=str(self.root), run=scratch
        )

    def edge_listen(self) -> str:
        """The gateway's address."""
        return f"{listen_host(self.config.host)}:{self.config.port}"

    def _prepare(self) -> None:
        super()._prepare()
        scratch = self._scratch()
        # A real folder of ours (checked), searchable by nginx's workers' group only: the
        # tier socket and the links to model sockets in it are no one else's way in (a
        # model could otherwise reach other models through them: unix sockets do not
        # depend on its network namespace).
        group = self._worker_gid()
        if group is None:  # nginx's workers are the worker's own user: the folder is theirs alone
            scratch.mkdir(mode=0o700, exist_ok=True)
            os.chmod(scratch, 0o700)
        else:
            os.chown(scratch, os.geteuid(), group)
            os.chmod(scratch, 0o710)

    def _pid(self, tier: Tier) -> int | None:
        """The tier's live master: the one recorded in its state file or, failing that, in
        nginx's own pid file (a worker killed between spawning a master and recording it
        leaves one that still holds the port: it is adopted, not started twice)."""
        for pid in (self._recorded_pid(tier), self._nginx_pid(tier)):
            command = processes.command_line(pid) if pid > 0 else ""
            if pid > 0 and processes.alive(pid) and str(self.conf / MAIN_FILES[tier]) in command:
                return pid
        return None

    def _recorded_pid(self, tier: Tier) -> int:
        try:
            return int(json.loads(self._state_path(tier).read_text()).get("pid", 0))
        except (FileNotFoundError, json.JSONDecodeError, ValueError, AttributeError):
            return 0

    def _nginx_pid(self, tier: Tier) -> int:
        try:
            return int((self.root / f"{tier}.pid").read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    async def running(self, tier: Tier) -> bool:
        """The recorded master is alive and runs this tier's file."""
        return self._pid(tier) is not None

    def backend_address(self, deployment_id: str, address: str) -> str:
        """``unix:LINK``: a hard link, in the gateway's scratch folder, to the server's socket.

        The socket sits in the deployment's folder (0700, the model user's), under folders
        nginx's workers (the gateway user) may not search, and its path may be longer than a
        socket address holds; a link to the same socket (a socket is found by its inode)
        in ``backends/`` (root's, searchable by the workers' group only, so no model
        reaches another's socket there) is neither. The link is made from the socket the
        driver checked (:meth:`LocalDriver.socket_user`), opened without following links;
        its name holds the socket's inode, so a server started again (a new socket) is a
        new address: the configuration is written again and reloaded (see :func:`route`).

        Raises:
            DeploymentFailedError: the socket is gone, or cannot be linked there.
        """
        if not address.startswith(endpoints.UNIX_PREFIX):
            return address
        sock = Path(address[len(endpoints.UNIX_PREFIX) :])
        folder = self._scratch() / BACKENDS_DIR
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
        group = self._worker_gid()
        os.chown(folder, os.geteuid(), os.getegid() if group is None else group, follow_symlinks=False)
        os.chmod(folder, 0o700 if group is None else 0o710)
        key = hashlib.sha256(deployment_id.encode()).hexdigest()[:16]
        try:
            fd = os.open(sock, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise DeploymentFailedError(
                f"deployment {deployment_id}: its socket {sock} is gone ({exc.strerror})"
            ) from None
        try:
            info = os.fstat(fd)
            link = folder / f"{key}-{info.st_ino}.sock"
            for old in folder.glob(f"{key}-*.sock"):
                if old != link:
                    old.unlink(missing_ok=True)
            if not _same_file(link, info):
                link.unlink(missing_ok=True)
                _link(fd, sock, link)
        finally:
            os.close(fd)
        return f"{endpoints.UNIX_PREFIX}{link}"

    def _worker_gid(self) -> int | None:
        """The group of nginx's workers when they are not the worker's own user."""
        user = self._service_user()
        return None if user is None else user.gid

    def _command(self, tier: Tier, *extra: str) -> list[str]:
        error_log = self.logs / ("error.log" if tier == "routes" else "edge.error.log")
        return [
            *self._names(), str(nginx_binary()), "-p", f"{self.root}/",
            "-c", str(self.conf / MAIN_FILES[tier]), "-e", str(error_log), *extra,
        ]  # fmt: skip

    async def start(self, tier: Tier, heartbeat: Heartbeat) -> None:
        """Spawn the master detached (its own session); it dies with the worker only when
        the settings say servers do (``mlc dev``)."""
        if tier == "routes":
            (self._scratch() / ROUTES_SOCKET).unlink(missing_ok=True)  # left by a killed master
        with (self.logs / f"{tier}.out").open("ab") as log:
            process = processes.spawn(
                self._command(tier),
                log=log,
                die_with_parent=self.settings.servers_die_with_worker,
                cwd=self.root,
            )
        _children[process.pid] = process
        state = {"pid": process.pid, "started_at": time.time()}
        self._write(self._state_path(tier), json.dumps(state))

    async def test(self, tier: Tier) -> str | None:
        """``nginx -t`` of the tier's files as written."""
        result = await asyncio.to_thread(
            subprocess.run, self._command(tier, "-t", "-q"), capture_output=True, text=True, check=False
        )
        return None if result.returncode == 0 else (result.stderr or result.stdout).strip()

    async def signal(self, tier: Tier, signum: signal.Signals) -> None:
        """Signal the tier's master; one that died meanwhile is an error quoting its log."""
        pid = self._pid(tier)
        if pid is None:
            raise DeploymentFailedError(
                f"the gateway of runtime {self.runtime.name} ({tier} tier) is not running; last "
                f"lines of its error logs:\n{self.error_tail()}"
            )
        os.kill(pid, signum)

    def details(self) -> dict[str, Any]:
        """Both masters' pids and the configuration folder."""
        return {
            "pid": self._pid("edge"),
            "routes_pid": self._pid("routes"),
            "config": str(self.conf),
            "logs": str(self.logs),
        }

    async def stop(self) -> None:
        """Stop both masters gracefully (QUIT: workers finish their requests)."""
        for tier in reversed(TIERS):
            pid = self._pid(tier)
            if pid is not None:
                await asyncio.to_thread(
                    processes.stop,
                    pid,
                    signum=signal.SIGQUIT,
                    timeout=STOP_TIMEOUT_SECONDS,
                    child=_children.pop(pid, None),
                )
            self._state_path(tier).unlink(missing_ok=True)


_children: dict[int, subprocess.Popen[bytes]] = {}
"""nginx masters this process started, kept so their exit is reaped."""


def _link(fd: int, sock: Path, link: Path) -> None:
    """Hard-link the socket opened as ``fd`` (found at ``sock``) to ``link``: from the handle
    as root; by its name otherwise (a worker that is not root gives models no user of their
    own: the socket is the worker's own).

    Raises:
        DeploymentFailedError: the two are on different filesystems, or the link failed.
    """
    try:
        if os.geteuid() == 0:
            isolation.link_fd(fd, link)
        else:
            os.link(sock, link, follow_symlinks=False)
    except OSError as exc:
        hint = (
            ": the gateway's scratch folder and MLC_HOME must be on one filesystem (set TMPDIR to a "
            "folder on MLC_HOME's)"
            if exc.errno == errno.EXDEV
            else ""
        )
        raise DeploymentFailedError(f"cannot link {sock} to {link} ({exc.strerror}){hint}") from None


def _same_file(path: Path, info: os.stat_result) -> bool:
    """Whether ``path`` (not followed) is the file ``info`` describes."""
    try:
        mine = os.lstat(path)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (info.st_dev, info.st_ino)
