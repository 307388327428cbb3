"""A cgroup per model user, so every process of a deployment is found and killed at once.

Killing by uid (:func:`mlc.isolation.kill_user`) finds a deployment's processes by scanning
``/proc``, which a process that keeps forking can stay ahead of for a while. A cgroup holds
every descendant of the processes put in it (a double-forked ``setsid`` daemon included), a
process cannot leave it without root, and the kernel freezes or kills the group as a whole.

What the host offers is detected at run time, never assumed:

- cgroup v2 (a ``cgroup2`` mount: the main hierarchy, or beside v1 on a hybrid host): the
  group is killed with ``cgroup.kill`` (Linux 5.14+), else frozen with ``cgroup.freeze``,
  its members killed, and thawed;
- cgroup v1 with a ``freezer`` hierarchy: ``freezer.state`` FROZEN, every member killed,
  THAWED (a frozen process dies once thawed), so nothing forks while it is killed;
- neither, or no right to make groups (not root, a read-only cgroup file system in a
  container): nothing here does anything, and the uid scan is what kills.

The main hierarchy is preferred: v2 mounted at ``/sys/fs/cgroup``, else v1's freezer,
else a v2 mounted beside it. A group is ``mlc/<uid>`` under the hierarchy's mount point
(one model user: a dedicated deployment, a batch job or a runtime's shared host), made by
the model's process itself while it is still root (:func:`join`, called by
:func:`mlc.isolation.enter`) and removed once empty (:func:`kill`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlc.errors import DeploymentFailedError

PARENT = "mlc"
"""The folder under a hierarchy's mount point holding one group per model user."""
MAIN_MOUNT = Path("/sys/fs/cgroup")
FREEZE_WAIT_SECONDS = 1.0
"""How long a freeze may take to settle (a member in uninterruptible sleep) before the
members are killed anyway; they die when thawed."""


@dataclass(frozen=True)
class Hierarchy:
    """One cgroup hierarchy model groups are made in, and how it freezes and kills them."""

    mount: Path
    version: int
    """1 (a v1 ``freezer`` hierarchy) or 2."""

    def group(self, uid: int) -> Path:
        """The folder of ``uid``'s group."""
        return self.mount / PARENT / str(uid)

    def usable(self) -> bool:
        """Whether groups can be made here and frozen or killed (root, a writable mount,
        a kernel with the files this needs)."""
        parent = self.mount / PARENT
        try:
            parent.mkdir(exist_ok=True)
        except OSError:
            return False
        needed = ("freezer.state",) if self.version == 1 else ("cgroup.kill", "cgroup.freeze")
        return any((parent / name).exists() for name in needed)

    def join(self, uid: int) -> None:
        """Put the calling process into ``uid``'s group, making the group when missing."""
        group = self.group(uid)
        group.mkdir(parents=True, exist_ok=True)
        (group / "cgroup.procs").write_text("0")  # 0: the process that writes

    def members(self, uid: int) -> list[int]:
        """Pids of the live processes in ``uid``'s group (exited ones are not listed)."""
        try:
            text = (self.group(uid) / "cgroup.procs").read_text()
        except OSError:  # no group (never made, or removed meanwhile)
            return []
        return [int(pid) for pid in text.split()]

    def kill(self, uid: int, *, timeout: float) -> None:
        """SIGKILL every process in ``uid``'s group, frozen first, until none is left; then
        remove the group.

        Raises:
            DeploymentFailedError: members were still there after ``timeout`` seconds.
        """
        group = self.group(uid)
        deadline = time.monotonic() + timeout
        while pids := self.members(uid):
            if time.monotonic() > deadline:
                raise DeploymentFailedError(f"processes {pids} in cgroup {group} do not die")
            if (group / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    (group / "cgroup.kill").write_text("1")
            else:
                with self._frozen(group):
                    for pid in self.members(uid):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        with contextlib.suppress(OSError):  # gone already, or someone joined meanwhile: next time
            group.rmdir()

    def kill_others(self, uid: int, spare: int, *, timeout: float) -> None:
        """SIGKILL every process in ``uid``'s group but ``spare``, the whole group frozen
        while they are killed (nothing forks meanwhile; ``spare`` only pauses), until no
        other is left; the group stays, ``spare`` in it.

        Raises:
            DeploymentFailedError: others were still there after ``timeout`` seconds.
        """
        group = self.group(uid)
        deadline = time.monotonic() + timeout
        while pids := [pid for pid in self.members(uid) if pid != spare]:
            if time.monotonic() > deadline:
                raise DeploymentFailedError(f"processes {pids} in cgroup {group} do not die")
            with self._frozen(group):
                for pid in self.members(uid):
                    if pid != spare:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    @contextlib.contextmanager
    def _frozen(self, group: Path) -> Iterator[None]:
        """Keep ``group`` frozen (no member runs, none forks) inside the block."""
        if self.version == 1:
            state, freeze, thaw, done = group / "freezer.state", "FROZEN", "THAWED", "FROZEN"
        else:
            state, freeze, thaw, done = group / "cgroup.freeze", "1", "0", "frozen 1"
        events = state if self.version == 1 else group / "cgroup.events"
        state.write_text(freeze)
        try:
            deadline = time.monotonic() + FREEZE_WAIT_SECONDS
            while done not in _read(events) and time.monotonic() < deadline:
                time.sleep(0.005)
            yield
        finally:
            with contextlib.suppress(OSError):
                state.write_text(thaw)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def candidates(mountinfo: str) -> list[Hierarchy]:
    """The writable cgroup hierarchies in ``/proc/self/mountinfo``'s text, preferred first:
    v2 at ``/sys/fs/cgroup``, v1's ``freezer``, v2 elsewhere (a hybrid host's ``unified``)."""
    main: list[Hierarchy] = []
    freezers: list[Hierarchy] = []
    others: list[Hierarchy] = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 6 or len(tail) < 3 or "ro" in fields[5].split(","):
            continue
        mount = Path(fields[4])
        if tail[0] == "cgroup2":
            (main if mount == MAIN_MOUNT else others).append(Hierarchy(mount, 2))
        elif tail[0] == "cgroup" and "freezer" in tail[2].split(","):
            freezers.append(Hierarchy(mount, 1))
    return [*main, *freezers, *others]


@functools.cache
def hierarchy() -> Hierarchy | None:
    """The hierarchy this host gives model groups in, or None (see the module's docstring)."""
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return None
    return next((h for h in candidates(mountinfo) if h.usable()), None)


def join(uid: int) -> None:
    """In a model's process, still root and before anything of the model runs: enter the
    group of ``uid``, so whatever it starts stays in it. A no-op where there are no groups.

    Raises:
        PermissionError: the host has groups but this process could not join (it must
            not run uncontained).
    """
    found = hierarchy()
    if found is None:
        return
    try:
        found.join(uid)
    except OSError as exc:
        raise PermissionError(f"could not join cgroup {found.group(uid)}: {exc}") from None


def kill(uid: int, *, timeout: float) -> None:
    """Kill every process in ``uid``'s group and remove it (see :meth:`Hierarchy.kill`)."""
    found = hierarchy()
    if found is not None:
        found.kill(uid, timeout=timeout)


def kill_others(uid: int, spare: int, *, timeout: float) -> None:
    """Kill every process in ``uid``'s group but ``spare`` (see :meth:`Hierarchy.kill_others`)."""
    found = hierarchy()
    if found is not None:
        found.kill_others(uid, spare, timeout=timeout)


def members(uid: int) -> list[int]:
    """Pids of the processes in ``uid``'s group ([] where there are no groups)."""
    found = hierarchy()
    return [] if found is None else found.members(uid)
