"""``mlc worker`` checks what it needs from its host before it starts: a missing piece is one
line naming it and its fix, with an exit code per kind (workers/prerequisites.py); the
real CLI in a subprocess, against a real inventory and Temporal."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from mlc.domain import DockerSettings, Mode, Runtime, RuntimeKind
from mlc.kafka_settings import KafkaSettings
from mlc.store import runtimes
from tests.conftest import Stack, gateway_settings

ROOT = Path(__file__).resolve().parent.parent


async def _mlc(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m mlc ARGS``; a worker that passed its checks would run on, hence the timeout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlc", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(
            f"`mlc {' '.join(args)}` did not stop at its checks:\n{out.decode()}{err.decode()}"
        ) from None
    return subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())


def _closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_worker_without_nginx_for_a_gateway_says_so_in_one_line_exit_10(
    stack: Stack, tmp_path: Path
) -> None:
    await stack.add_runtime(
        Runtime(name="gw-dev", stage="DEV", task_queue=stack.task_queue, gateway=gateway_settings())
    )
    missing = tmp_path / "no-nginx"
    done = await _mlc({**stack.cli_env, "MLC_NGINX": str(missing)}, "worker")
    assert done.returncode == 10, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"error: runtime gw-dev's gateway (its stable endpoints) needs nginx, and MLC_NGINX={missing} is "
        "not a file: run scripts/system-deps.sh or apt-get install nginx-light (or set MLC_NGINX to an "
        "nginx binary)"
    ]


async def test_runtime_worker_without_its_docker_engine_exit_12(stack: Stack, tmp_path: Path) -> None:
    engine = f"unix://{tmp_path}/docker.sock"
    await stack.add_runtime(
        Runtime(
            name="far-engine",
            kind=RuntimeKind.DOCKER,
            stage="SIT",
            task_queue=f"{stack.task_queue}-far",
            docker=DockerSettings(base_url=engine),
        )
    )
    try:
        done = await _mlc(stack.cli_env, "worker", "--runtime", "far-engine")
    finally:  # the stack's teardown would clean it up through that engine
        await runtimes.delete_runtime(stack.pool, "far-engine")
    assert done.returncode == 12, done.stdout + done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: runtime far-engine: cannot reach the docker engine at {engine}"), line
    assert "Is dockerd running (scripts/docker-engine.sh starts one locally)" in line


async def test_worker_without_its_kafka_broker_exit_13(stack: Stack) -> None:
    bootstrap = f"127.0.0.1:{_closed_port()}"
    await stack.add_runtime(
        Runtime(
            name="stream-uat",
            stage="UAT",
            modes=(Mode.STREAMING,),
            task_queue=stack.task_queue,
            kafka=KafkaSettings(bootstrap_servers=bootstrap, input_topic="in", output_topic="out"),
        )
    )
    done = await _mlc(stack.cli_env, "worker")
    assert done.returncode == 13, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"error: runtime stream-uat streams through Kafka at {bootstrap}, and no broker answers there: start "
        "the broker, or point the runtime elsewhere (mlc runtime add ... --replace --kafka-bootstrap)"
    ]


async def test_lifecycle_worker_without_bubblewrap_exit_11(stack: Stack) -> None:
    no_bwrap = {**stack.cli_env, "PATH": str(Path(sys.executable).parent)}
    done = await _mlc(no_bwrap, "worker", "--lifecycles")
    assert done.returncode == 11, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        "error: uploaded lifecycles run only in a sandbox, and bubblewrap (bwrap) is not installed: run "
        "scripts/system-deps.sh or apt-get install bubblewrap"
    ]


def test_system_deps_for_a_user_names_a_program_that_cannot_run_and_the_docker_socket(
    tmp_path: Path,
) -> None:
    """As a user other than root with the engine running: a ``bwrap`` on PATH that is not
    executable is missing, and what docker lacks is access to the engine's socket."""
    tools = Path(tempfile.mkdtemp(prefix="mlc-system-deps-"))  # nobody reaches it: not in tmp_path
    try:
        tools.chmod(0o755)
        for name in ("bash", "dirname", "id", "stat", "docker", "apt-get"):
            found = shutil.which(name)
            assert found, name
            (tools / name).symlink_to(found)
        (tools / "bwrap").write_text("#!/bin/sh\n")  # there, but not a program anyone can run
        (tools / "bwrap").chmod(0o644)
        nobody = [str(shutil.which("setpriv")), "--reuid=65534", "--regid=65534", "--clear-groups"]
        result = subprocess.run(
            [*nobody, str(tools / "bash"), str(ROOT / "scripts" / "system-deps.sh"), "test"],
            env={"PATH": str(tools), "HOME": str(tools)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        shutil.rmtree(tools)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "missing bwrap (bubblewrap)" in result.stderr, result.stderr
    assert (
        "missing access to the Docker engine's socket /var/run/docker.sock (group docker) for nobody"
        in result.stderr
    ), result.stderr
    assert "docker-engine.sh" not in result.stderr, result.stderr
