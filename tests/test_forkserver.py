"""The forkserver: forked model servers take the runtime's environment, folder and log, and are reaped."""

from __future__ import annotations

import os
import signal
import socket
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
