"""The team path: ``scripts/compose-smoke.sh`` on the local compose profile, in the suite.

The script builds every image (the worker's with nginx and bubblewrap), brings every service
up healthy (both workers and ``mlc server`` included), bootstraps trust, checks that the API
answers ``/healthz`` and a signed ``/v1/me`` (and refuses an unsigned one). Then a client on
the host with only ``MLC_API_URL``, a key and a fresh ``MLC_HOME`` (no DSN, no Temporal) adds
the runtimes, grants the approver role and signs the policies over the API, runs ``mlc demo
--yes`` through DEV..PROD with the runtimes' gateways, reads ``mlc status`` and verifies the
audit trail, and the stack is torn down. Here it runs on free loopback ports under a compose
project of its own, so it does not meet a stack someone keeps on the defaults. A few minutes
with warm build caches (the first build of the images takes a few more).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOKE_SECONDS = 1500


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports nothing listens on (held open together while picked)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@pytest.mark.timeout(SMOKE_SECONDS + 60)
def test_compose_smoke_reaches_prod_through_the_api_from_the_host(docker_engine: Any) -> None:
    assert shutil.which("docker-compose"), "no docker-compose: ./scripts/system-deps.sh test installs it"
    pg, temporal, ui, api = free_ports(4)
    env = {
        **os.environ,
        "MLC_SMOKE_PROJECT": f"mlc-smoke-{uuid.uuid4().hex[:8]}",
        "MLC_PG_PORT": str(pg),
        "MLC_TEMPORAL_PORT": str(temporal),
        "MLC_TEMPORAL_UI_PORT": str(ui),
        "MLC_API_PORT": str(api),
    }
    env.pop("KEEP", None)
    result = subprocess.run(
        [str(ROOT / "scripts" / "compose-smoke.sh")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=SMOKE_SECONDS,
    )
    timings = result.stdout[result.stdout.rfind("[compose-smoke] timings:") :]
    print(timings)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "serves in PROD at its stable endpoint http://" in result.stdout, result.stdout[-6000:]
    assert "audit trail verified" in result.stdout, result.stdout[-6000:]
    assert "signed /v1/me answers smoke-admin (admin)" in result.stdout, result.stdout[-6000:]
    assert "host client (MLC_API_URL and a key only)" in result.stdout, result.stdout[-6000:]
    assert "using the running stack's API at http://127.0.0.1:" in result.stdout, result.stdout[-6000:]
    assert re.search(r"mlc status \S+@\d+ \(API\): succeeded in PROD", result.stdout), result.stdout[-6000:]
    assert "[compose-smoke] OK" in result.stdout


def test_compose_smoke_logs_in_a_folder_of_its_own(tmp_path: Path) -> None:
    """Its logs (written as root) go to a fresh 0700 folder, never to a fixed name in the
    shared temp dir where another account could have left a link. A ``docker-compose`` that
    fails stops it at the build, whose log it names."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker-compose").write_text("#!/bin/sh\nexit 1\n")
    (fake / "docker-compose").chmod(0o755)
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "TMPDIR": str(temp), "MLC_HOME_PATH": ""}
    env.pop("KEEP", None)
    result = subprocess.run(
        [str(ROOT / "scripts" / "compose-smoke.sh")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stdout[-4000:]
    named = re.search(r"build failed \(log: (.+)\)", result.stdout)
    assert named, result.stdout[-4000:]
    log = Path(named.group(1))
    assert log.parent.parent == temp and log.name == "build.log", result.stdout[-4000:]
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700
