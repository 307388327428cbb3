"""The forkserver: forked model servers take the runtime's environment, folder and log, and are reaped."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mlc import processes
from mlc.serving.forkserver import ForkClient


@pytest.fixture
def forkserver(tmp_path: Path) -> Iterator[ForkClient]:
    path = tmp_path / "fs.sock"
    env = {"PATH": os.environ.get("PATH", ""), "MLC_FORKSERVER_PRELOAD": "json", "SECRET_OF_WORKER": "x"}
    with (tmp_path / "fs.log").open("ab") as log:
        proc = processes.spawn(
            [sys.executable, "-m", "mlc.serving", "forkserver", "--socket", str(path)]
            + ["--title-room", "." * 512],
            log=log,
            env=env,
        )
    client = ForkClient(path)
    deadline = time.monotonic() + 60
    while not client.ready():
        assert proc.poll() is None, (tmp_path / "fs.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield client
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_a_forked_server_serves_with_the_given_environment_and_is_reaped(
    forkserver: ForkClient, tmp_path: Path
) -> None:
    package = tmp_path / "tiny"
    package.mkdir()
    (package / "manifest.yaml").write_text(
        "name: tiny\nservice_tags: [tiny]\nrequirements: []\ninput_schema:\n  - {name: x, type: number}\n"
    )
    (package / "score.py").write_text(
        "import os\ndef score(record):\n"
        "    return {'secret': os.environ.get('SECRET_OF_WORKER'), 'cwd': os.getcwd()}\n"
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    port = free_port()
    pid = forkserver.fork(
        ["serve", "--package", str(package), "--port", str(port)],
        cwd=workdir,
        env={"PATH": os.environ.get("PATH", ""), "MLC_MODEL_VERSION": "3"},
        log=workdir / "server.log",
        die_with_parent=False,
    )
    assert pid is not None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, (workdir / "server.log").read_text()
                time.sleep(0.05)
        assert health.json()["version"] == "3"
        scored = httpx.post(f"http://127.0.0.1:{port}/score", json={"x": 1}, timeout=5).json()
        assert scored == {"secret": None, "cwd": str(workdir)}
        assert os.getpgid(pid) == pid, "each server leads its own process group"
        assert f"mlc.serving serve --package {package} --port {port}" in processes.command_line(pid)
        assert "model loaded" in (workdir / "server.log").read_text()
    finally:
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while processes.alive(pid):
        assert time.monotonic() < deadline, "the forkserver reaps its exited children"
        time.sleep(0.05)


_WARM = """
import sys, time
from pathlib import Path
from activities.runtimes.local.servers import fork_client
home = Path(sys.argv[1])
deadline = time.monotonic() + 60
while (client := fork_client(home)) is None:
    assert time.monotonic() < deadline, "the forkserver did not get ready"
    time.sleep(0.05)
print(client.socket_path.parent)
"""


def test_a_worker_started_again_on_its_home_reuses_its_forkserver_folder(tmp_path: Path) -> None:
    """One folder per home, at a random name, instead of one more per start left in /tmp."""
    home, temp = tmp_path / "home", tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "MLC_FORKSERVER_PRELOAD": "json"}

    def worker() -> Path:
        done = subprocess.run(
            [sys.executable, "-c", _WARM, str(home)],
            cwd=Path(__file__).parent.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return Path(done.stdout.strip())

    first = worker()
    second = worker()  # its forkserver ended with the first worker
    assert second == first and first.parent == temp and first.name.startswith("mlc-forkserver-")
    assert stat.S_IMODE(first.stat().st_mode) == 0o700
    assert (home / "forkserver-folder").read_text() == str(first)
    assert list(temp.iterdir()) == [first]


def test_fifos_left_at_a_forked_servers_log_and_output_are_replaced(
    forkserver: ForkClient, tmp_path: Path
) -> None:
    """Opening either would block the child before it runs (no reader): both are replaced."""
    package = tmp_path / "tiny"
    package.mkdir()
    (package / "manifest.yaml").write_text(
        "name: tiny\nservice_tags: [tiny]\nrequirements: []\ninput_schema:\n  - {name: x, type: number}\n"
    )
    (package / "score.py").write_text("def score(record):\n    return {'y': 1}\n")
    log, out = tmp_path / "server.log", tmp_path / "server.out"
    os.mkfifo(log)
    os.mkfifo(out)
    port = free_port()
    pid = forkserver.fork(
        ["serve", "--package", str(package), "--port", str(port)],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "")},
        log=log,
        die_with_parent=False,
        stdout=out,
    )
    assert pid is not None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the forked server never started"
                time.sleep(0.05)
        assert stat.S_ISREG(log.lstat().st_mode) and stat.S_ISREG(out.lstat().st_mode)
        assert "model loaded" in log.read_text()
    finally:
        os.killpg(pid, signal.SIGTERM)
