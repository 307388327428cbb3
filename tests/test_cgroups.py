"""A cgroup per model user (``mlc.cgroups``), with real processes in every hierarchy this
host offers: a process that keeps double-forking ``setsid`` daemons is killed with all of
them, and the group is gone afterwards.

Groups need root; under CI=true the tests fail without it, elsewhere they are skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mlc import cgroups, processes
from tests.conftest import missing

# A daemon that double-forks a fresh daemon every few milliseconds and ignores SIGTERM:
# a uid scan alone races it; a frozen group does not.
BREEDER = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", sys.argv[1], sys.argv[2]])
        os._exit(0)
    os.wait()
    time.sleep(0.02)
"""


@pytest.fixture
def as_root() -> None:
    if os.geteuid() == 0:
        return
    missing("cgroups are made by root")


def offered() -> list[cgroups.Hierarchy]:
    return [h for h in cgroups.candidates(Path("/proc/self/mountinfo").read_text()) if h.usable()]


def test_candidates_prefer_the_main_hierarchy() -> None:
    hybrid = (
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "36 31 0:33 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n"
        "37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    )
    assert [(str(h.mount), h.version) for h in cgroups.candidates(hybrid)] == [
        ("/sys/fs/cgroup/freezer", 1),
        ("/sys/fs/cgroup/unified", 2),
    ]
    pure = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    assert [(str(h.mount), h.version) for h in cgroups.candidates(pure)] == [("/sys/fs/cgroup", 2)]
    read_only = "29 23 0:26 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n"
    assert cgroups.candidates(read_only) == []


@pytest.mark.parametrize("version", [1, 2])
def test_a_group_is_killed_whole_with_every_daemon(as_root: None, version: int, tmp_path: Path) -> None:
    found = [h for h in offered() if h.version == version]
    if not found:
        missing(f"this host offers no usable cgroup v{version} hierarchy")
    hierarchy = found[0]
    uid = 1_999_999_990 + version  # below the model users: a group of its own, no process runs as it
    marker = f"mlc-cgroup-test-{uuid.uuid4().hex}"
    sleeper = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)"
    with (tmp_path / "breeder.log").open("ab") as log:
        breeder = subprocess.Popen(
            [sys.executable, "-c", BREEDER, sleeper, marker],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: hierarchy.join(uid),
        )
    try:
        deadline = time.monotonic() + 20
        while len(processes.find_processes(marker)) < 5:
            assert time.monotonic() < deadline, "the breeder started no daemons"
            time.sleep(0.05)
        members = hierarchy.members(uid)
        assert breeder.pid in members and set(processes.find_processes(marker)) <= set(members)
        hierarchy.kill(uid, timeout=10)
        breeder.wait(timeout=10)
        assert processes.find_processes(marker) == []
        assert not hierarchy.group(uid).exists()
    finally:
        breeder.kill()
        breeder.wait()
        for pid in processes.find_processes(marker):
            os.kill(pid, 9)


@pytest.mark.parametrize("version", [1, 2])
def test_every_process_but_the_spared_one_is_killed(as_root: None, version: int, tmp_path: Path) -> None:
    """What a shared host's user gets when a model leaves it: the host (spared) runs on,
    whatever breeds beside it ends."""
    found = [h for h in offered() if h.version == version]
    if not found:
        missing(f"this host offers no usable cgroup v{version} hierarchy")
    hierarchy = found[0]
    uid = 1_999_999_980 + version
    marker = f"mlc-cgroup-test-{uuid.uuid4().hex}"
    sleeper = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)"
    with (tmp_path / "breeder.log").open("ab") as log:
        spared = subprocess.Popen(
            [sys.executable, "-c", sleeper], preexec_fn=lambda: hierarchy.join(uid), stdout=log
        )
        breeder = subprocess.Popen(
            [sys.executable, "-c", BREEDER, sleeper, marker],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: hierarchy.join(uid),
        )
    try:
        deadline = time.monotonic() + 20
        while len(processes.find_processes(marker)) < 5:
            assert time.monotonic() < deadline, "the breeder started no daemons"
            time.sleep(0.05)
        hierarchy.kill_others(uid, spared.pid, timeout=10)
        breeder.wait(timeout=10)
        assert processes.find_processes(marker) == []
        assert spared.poll() is None and hierarchy.members(uid) == [spared.pid]
        hierarchy.kill(uid, timeout=10)
        spared.wait(timeout=10)
        assert not hierarchy.group(uid).exists()
    finally:
        for child in (breeder, spared):
            child.kill()
            child.wait()
        for pid in processes.find_processes(marker):
            os.kill(pid, 9)
