"""Child processes that die with their parent, and stopping processes by pid.

``mlc dev`` starts servers (Temporal, PostgreSQL, model servers) that must not outlive it:
after a ``kill -9`` nobody is left to stop them, and the next start would find their
ports and files taken. On Linux the kernel can send a child a signal when its parent
dies (``PR_SET_PDEATHSIG``); elsewhere each child gets its own process group, so it can
at least be stopped as a whole by the next start (see :mod:`cli.stack.devstack`).

``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends, not the
process: spawn from a thread that lives as long as the process (the event loop's).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import IO, Any

_PR_SET_PDEATHSIG = 1
"""From <linux/prctl.h>."""


def parent_death_signal(signum: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to send ``signum`` to the child when its parent dies.

    Call it in the parent, before forking (it notes the parent's pid); in a child that is
    already forked, use :func:`die_with_parent_now`. Returns None where the OS has no such
    thing (the caller falls back to a process group).
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def arm() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signum)

    return arm


def die_with_parent_now(signum: int) -> None:
    """In a process just forked (not through :func:`spawn`): get ``signum`` when its
    current parent dies (Linux; a no-op elsewhere). Call it in the child, after the fork."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os.kill(os.getpid(), signum)


def spawn(
    args: Sequence[str],
    *,
    log: IO[bytes] | int,
    die_with_parent: bool = True,
    death_signal: int = signal.SIGTERM,
    setup: Callable[[], None] | None = None,
    **options: Any,
) -> subprocess.Popen[bytes]:
    """Start ``args`` in its own process group, stdin closed, output to ``log``.

    With ``die_with_parent`` the child gets ``death_signal`` when this process dies
    (Linux), whatever killed it; ``setup`` runs in the child before exec; ``options`` go
    to :class:`subprocess.Popen`.
    """
    death = parent_death_signal(death_signal) if die_with_parent else None
    steps = [step for step in (setup, death) if step is not None]

    def preexec() -> None:
        for step in steps:
            step()

    return subprocess.Popen(
        list(args),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=preexec if steps else None,
        **options,
    )


def alive(pid: int, *, marker: str | None = None) -> bool:
    """True when ``pid`` exists and is not a zombie; with ``marker``, only when it is also
    ours: a process this one may signal whose command line contains ``marker`` (a pid the
    kernel gave to something else since is not).

    ``/proc`` is read once per file and a process that vanishes meanwhile counts as gone,
    never as an error. Where there is no ``/proc``, existence is all it can tell.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        if marker is not None:
            return False  # another user's process under a reused pid
    if not os.path.exists("/proc/self/stat"):
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[-1].split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if marker is not None else b""
    except OSError:  # it exited between the signal and the read
        return False
    if not fields or fields[0] == b"Z":
        return False
    return marker is None or marker.encode() in cmdline


def command_line(pid: int) -> str:
    """The process's command line with spaces between arguments ("" when unknown)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def find_processes(marker: str) -> list[int]:
    """Pids whose command line contains ``marker`` (Linux; elsewhere none are found)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid != os.getpid() and marker in command_line(pid) and alive(pid):
            found.append(pid)
    return sorted(found)


def signal_group(pid: int, signum: int) -> None:
    """Send ``signum`` to ``pid``'s process group when it leads one, else to ``pid``; a
    process already gone is not an error."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        pass


def stop(
    pid: int,
    *,
    signum: int = signal.SIGTERM,
    timeout: float = 15.0,
    group: bool = True,
    child: subprocess.Popen[bytes] | None = None,
    marker: str | None = None,
) -> None:
    """Send ``signum`` to ``pid`` (its process group when it leads one), SIGKILL it after
    ``timeout`` seconds, and return once it is gone (reaping ``child`` if it is ours).
    With ``marker``, a pid that is no longer ours (see :func:`alive`) is left alone."""

    def send(sig: int) -> None:
        if group:
            signal_group(pid, sig)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def gone() -> bool:
        if child is not None:
            return child.poll() is not None
        return not alive(pid, marker=marker)

    if gone():
        return
    send(signum)
    deadline = time.monotonic() + timeout
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not gone():
        send(signal.SIGKILL)
        while not gone():
            time.sleep(0.05)


LOCK_POLL_SECONDS = 0.1
"""Longest pause between two tries of a :func:`file_lock` another process holds."""


@contextlib.asynccontextmanager
async def file_lock(path: Path) -> AsyncIterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600 if missing): one holder at a
    time across processes (two workers serving one runtime's queue on one host).

    Waiting never blocks a thread: a blocking ``flock`` in ``asyncio.to_thread`` holds one
    of the loop's few default executor threads (``min(32, cores + 4)``) until the lock
    frees, so a handful of waiters starve the holder of the thread it needs for its own
    work (``nginx -t``) and nobody moves until activities time out. Instead the lock is
    tried without blocking, and again after a short sleep.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        pause = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(pause)
                pause = min(pause * 2, LOCK_POLL_SECONDS)
        yield
    finally:
        os.close(fd)  # releases the lock


class Children:
    """Detached processes of one kind this process started (model servers, streaming
    consumers), kept so their exits are reaped: an exited child is a zombie that looks
    alive until reaped. A pid that is not one of them is ours only while its command line
    holds ``marker`` (see :func:`alive`)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self._started: dict[int, subprocess.Popen[bytes]] = {}

    def add(self, process: subprocess.Popen[bytes]) -> int:
        """Keep ``process`` (just started) and return its pid."""
        self._started[process.pid] = process
        return process.pid

    def alive(self, pid: int) -> bool:
        """True when ``pid`` runs (reaping it first if it is our exited child)."""
        child = self._started.get(pid)
        if child is not None:
            return child.poll() is None
        return alive(pid, marker=self.marker)

    def returncode(self, pid: int) -> int | None:
        """The exit code of our exited child ``pid`` (None: running, or not ours)."""
        child = self._started.get(pid)
        return None if child is None else child.returncode

    def started(self, pid: int) -> bool:
        """Whether ``pid`` is a child this process started (and has not stopped)."""
        return pid in self._started

    async def stop(self, pid: int, *, timeout: float) -> None:
        """SIGTERM ``pid``'s process group, SIGKILL it after ``timeout`` seconds (see
        :func:`stop`), and forget it."""
        if self.alive(pid):
            child = self._started.get(pid)
            await asyncio.to_thread(stop, pid, timeout=timeout, child=child, marker=self.marker)
        self._started.pop(pid, None)
