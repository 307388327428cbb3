"""Children that die with their parent (``mlc.processes``), with real processes and signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mlc import processes
from tests.conftest import missing


@pytest.fixture(autouse=True)
def _linux() -> None:
    """Parent-death signals are Linux's: off Linux the tests skip (under CI=true they fail)."""
    if not sys.platform.startswith("linux"):
        missing("parent-death signals are Linux's")


PARENT = """
import os, signal, sys, time
from mlc import processes
mode = sys.argv[1]
if mode == "spawn":
    child = processes.spawn([sys.executable, "-c", "import time; time.sleep(60)"], log=subprocess_devnull)
    pid = child.pid
else:  # fork, then arm in the child (what a forkserver does)
    pid = os.fork()
    if pid == 0:
        processes.die_with_parent_now(signal.SIGTERM)
        time.sleep(60)
        os._exit(0)
print(pid, flush=True)
time.sleep(60)
"""


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while processes.alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("mode", ["spawn", "fork"])
def test_a_child_lives_with_its_parent_and_dies_with_it(mode: str, tmp_path: Path) -> None:
    script = "import subprocess\nsubprocess_devnull = subprocess.DEVNULL\n" + PARENT
    parent = subprocess.Popen(
        [sys.executable, "-c", script, mode], stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        time.sleep(0.5)
        assert processes.alive(child), "the child must live as long as its parent"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_gone(child), "the child must die with its parent, however the parent died"
    finally:
        parent.kill()
        parent.wait()


def test_alive_counts_zombies_vanished_and_foreign_processes_as_gone() -> None:
    marker = f"mlc-alive-{uuid.uuid4().hex}"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        deadline = time.monotonic() + 10
        while marker not in processes.command_line(child.pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert processes.alive(child.pid) and processes.alive(child.pid, marker=marker)
        assert not processes.alive(child.pid, marker="another-program"), "a reused pid is not ours"
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # a zombie until reaped
        assert not processes.alive(child.pid) and not processes.alive(child.pid, marker=marker)
    finally:
        child.kill()
        child.wait()
    assert not processes.alive(child.pid, marker=marker)


def test_processes_exiting_while_looked_at_are_gone_never_an_error() -> None:
    for _ in range(100):
        short = subprocess.Popen(["sleep", "0.01"])
        while processes.alive(short.pid, marker="sleep"):  # read while it exits: no exception
            pass
        processes.stop(short.pid, marker="sleep", timeout=1)
        short.wait()


async def test_waiting_for_a_file_lock_holds_no_thread(tmp_path: Path) -> None:
    """Waiters of a held file lock leave the loop's executor free: the holder's own work in
    a thread (``nginx -t`` of a gateway change) runs while three changes wait their turn."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
    lock = tmp_path / ".lock"
    order: list[str] = []

    async def wait_turn(name: str) -> None:
        async with processes.file_lock(lock):
            order.append(name)

    async with processes.file_lock(lock):
        waiters = [asyncio.create_task(wait_turn(f"w{i}")) for i in range(3)]
        await asyncio.sleep(0.2)
        assert await asyncio.wait_for(asyncio.to_thread(os.getpid), 5) == os.getpid()
        assert order == [], "nobody got the lock while it was held"
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert sorted(order) == ["w0", "w1", "w2"]
