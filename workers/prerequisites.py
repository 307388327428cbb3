"""What a worker needs from its host, checked when ``mlc dev`` or ``mlc worker`` starts.

A missing piece found halfway through a lifecycle fails a run minutes in, after a
deployment and an approval; found at start it is one line naming the piece and its fix,
with an exit code of its own (see :mod:`mlc.errors`): 10 nginx (gateways of runtimes
with stable endpoints), 11 bubblewrap (the sandbox of uploaded lifecycles), 12 a docker
runtime's engine, 13 a streaming runtime's Kafka broker. One function per prerequisite;
:func:`check_runtimes` asks the ones the runtimes a worker serves need.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from activities.runtimes.gateway.image import NGINX_ENV, nginx_binary
from mlc.domain import Mode, Runtime, RuntimeKind
from mlc.errors import (
    BubblewrapMissingError,
    DeploymentFailedError,
    DockerEngineUnreachableError,
    KafkaBrokerUnreachableError,
    MLCError,
    NginxMissingError,
    RuntimeUnavailableError,
)

INSTALL = "run scripts/system-deps.sh or apt-get install {package}"
"""The fix for a missing system package (the script installs every one the stack needs)."""
CHECK_TIMEOUT_SECONDS = 10.0
"""How long one check may take (an engine or broker that does not answer by then is down)."""


def nginx(needed_by: str) -> Path:
    """The nginx binary ``needed_by`` (a runtime's gateway) runs, once it answers ``nginx -v``.

    Raises:
        NginxMissingError: none is installed, ``MLC_NGINX`` names no file, or it does not run.
    """
    fix = f"{INSTALL.format(package='nginx-light')} (or set {NGINX_ENV} to an nginx binary)"
    try:
        found = nginx_binary()
    except DeploymentFailedError:
        configured = os.environ.get(NGINX_ENV)
        what = f"{NGINX_ENV}={configured} is not a file" if configured else "it is not installed"
        raise NginxMissingError(f"{needed_by} needs nginx, and {what}: {fix}") from None
    problem = _fails([str(found), "-v"])
    if problem:
        raise NginxMissingError(f"{needed_by} needs nginx, and {found} does not run ({problem}): {fix}")
    return found


def bubblewrap() -> str:
    """The ``bwrap`` binary, once it has made a sandbox here (user namespaces may be off).

    Raises:
        BubblewrapMissingError: it is missing, or cannot make a sandbox on this host.
    """
    from workers.sandbox import bwrap_path

    fix = INSTALL.format(package="bubblewrap")
    try:
        found = bwrap_path()
    except RuntimeUnavailableError:
        raise BubblewrapMissingError(
            f"uploaded lifecycles run only in a sandbox, and bubblewrap (bwrap) is not installed: {fix}"
        ) from None
    problem = _fails(
        [found, "--unshare-all", "--share-net", "--die-with-parent", "--ro-bind", "/", "/", "true"]
    )
    if problem:
        raise BubblewrapMissingError(
            f"uploaded lifecycles run only in a sandbox, and {found} cannot make one here ({problem}): "
            "allow unprivileged user namespaces, or run `mlc worker --lifecycles --no-sandbox` in a "
            "container restricted like docker-compose.yml's lifecycle-worker service"
        )
    return found


def _fails(argv: list[str]) -> str | None:
    """Why ``argv`` failed (its last line of errors), or None when it exited 0."""
    try:
        ran = subprocess.run(argv, capture_output=True, text=True, timeout=CHECK_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if ran.returncode == 0:
        return None
    return (ran.stderr.strip().splitlines() or [f"exit code {ran.returncode}"])[-1]


async def docker_engine(runtime: Runtime) -> None:
    """The engine of docker runtime ``runtime`` answers.

    Raises:
        DockerEngineUnreachableError: it does not (its address, and how to start one).
    """
    from activities.runtimes.docker.engine import connect, engine_url

    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS), connect(runtime, "check its engine at start"):
            return
    except TimeoutError:
        message = (
            f"runtime {runtime.name}: the docker engine at {engine_url(runtime)} did not answer within "
            f"{CHECK_TIMEOUT_SECONDS:.0f} s: start it (scripts/docker-engine.sh starts one locally) "
            "or fix the runtime's docker.base_url"
        )
    except MLCError as exc:
        message = str(exc)
    raise DockerEngineUnreachableError(message)


EmbeddedKafka = Callable[[str], bool]
"""Whether an embedded broker serves a bootstrap address (``mlc dev`` starts one for a
loopback address nobody listens on); raises ``RuntimeUnavailableError`` when it would but is
not installed. The embedded stack (``cli.stack.kafka_broker.serves``) passes it down, so
workers need not import the stack above them."""


async def kafka_broker(runtime: Runtime, *, embedded: EmbeddedKafka | None = None) -> None:
    """A broker of streaming runtime ``runtime`` answers, or ``embedded`` serves its address.

    Raises:
        KafkaBrokerUnreachableError: no broker answers, or the embedded one is not installed.
    """
    assert runtime.kafka is not None
    bootstrap = runtime.kafka.bootstrap_servers
    if embedded is not None:
        try:
            if embedded(bootstrap):
                return
        except RuntimeUnavailableError as exc:
            raise KafkaBrokerUnreachableError(f"runtime {runtime.name}: {exc}") from None
    for address in bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]"), int(port)), CHECK_TIMEOUT_SECONDS
            )
        except (OSError, TimeoutError, ValueError):
            continue
        writer.close()
        return
    raise KafkaBrokerUnreachableError(
        f"runtime {runtime.name} streams through Kafka at {bootstrap}, and no broker answers there: "
        "start the broker, or point the runtime elsewhere (mlc runtime add ... --replace --kafka-bootstrap)"
    )


async def check_runtimes(runtimes: Iterable[Runtime], *, embedded_kafka: EmbeddedKafka | None = None) -> None:
    """Check what the runtimes a worker serves need from its host, first failure raised.

    Raises:
        PrerequisiteError: the subclass naming what is missing (see the module docstring).
    """
    for runtime in runtimes:
        if runtime.gateway is not None:
            nginx(f"runtime {runtime.name}'s gateway (its stable endpoints)")
        if runtime.kind is RuntimeKind.DOCKER:
            await docker_engine(runtime)
        if Mode.STREAMING in runtime.modes and runtime.kafka is not None:
            await kafka_broker(runtime, embedded=embedded_kafka)
