"""Children that die with their parent (``mlc.processes``), with real processes and signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlc import processes

# Off Linux there is no parent-death signal to test; under CI=true (always Linux here) the
# tests run, so a CI machine without it would fail instead of skipping.
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") and os.environ.get("CI", "").lower() != "true",
    reason="parent-death signals are Linux's",
)

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
