"""Connecting to a docker runtime's engine, and mapping docker-py errors onto ours.

docker-py is synchronous, so the client is opened in a thread and every call made through
it is expected to run in ``asyncio.to_thread``. Errors are translated here, once: an
engine that cannot be reached is retryable (it may come back), an engine that refuses a
request is not (retrying the same request gets the same answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import docker
import docker.errors
import docker.tls
import requests.exceptions

from activities.runtimes.base import Heartbeat
from mlc.domain import DockerSettings, Runtime
from mlc.errors import DeploymentFailedError, RuntimeUnavailableError

T = TypeVar("T")

HEARTBEAT_SECONDS = 5.0
"""How often long engine calls (builds, downloads) report progress."""


def docker_settings(runtime: Runtime) -> DockerSettings:
    """The runtime's docker settings, defaults when it declares none."""
    return runtime.docker or DockerSettings()


def engine_url(runtime: Runtime) -> str:
    """The engine address for messages: the configured URL, ``DOCKER_HOST``, or the default."""
    return (
        docker_settings(runtime).base_url
        or os.environ.get("DOCKER_HOST")
        or "unix:///var/run/docker.sock (default)"
    )


def _tls_config(settings: DockerSettings) -> docker.tls.TLSConfig | bool:
    """TLS options for ``DockerClient``; False when none are configured."""
    client_cert = (
        (settings.tls_client_cert, settings.tls_client_key)
        if settings.tls_client_cert and settings.tls_client_key
        else None
    )
    if not (settings.tls_verify or settings.tls_ca_cert or client_cert):
        return False
    return docker.tls.TLSConfig(
        client_cert=client_cert,
        ca_cert=settings.tls_ca_cert,
        verify=settings.tls_verify,
    )


def _open_client(settings: DockerSettings) -> Any:
    """A client that has already talked to the engine once (API version negotiation).

    ``version="auto"`` matters: docker-py's default API version is newer than older
    engines (20.10 speaks 1.41) accept.
    """
    if settings.base_url is None:
        return docker.from_env(version="auto")
    return docker.DockerClient(base_url=settings.base_url, tls=_tls_config(settings), version="auto")


@contextlib.contextmanager
def engine_errors(runtime: Runtime, what: str) -> Iterator[None]:
    """Translate docker-py and requests errors raised while doing ``what`` on ``runtime``.

    Raises:
        RuntimeUnavailableError: the engine could not be reached or timed out (retryable).
        DeploymentFailedError: the engine refused the request, or the TLS settings are bad.
    """
    try:
        yield
    except docker.errors.APIError as exc:
        raise DeploymentFailedError(
            f"runtime {runtime.name}: {what} failed: the docker engine at {engine_url(runtime)} "
            f"answered {exc.status_code}: {exc.explanation or exc}"
        ) from exc
    except docker.errors.TLSParameterError as exc:
        raise DeploymentFailedError(
            f"runtime {runtime.name}: the docker TLS settings are not usable: {exc}"
        ) from exc
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise RuntimeUnavailableError(
            f"runtime {runtime.name}: cannot reach the docker engine at {engine_url(runtime)} "
            f"while trying to {what}: {exc}. Is dockerd running (scripts/docker-engine.sh starts "
            "one locally) and is the runtime's docker.base_url right?"
        ) from exc


@contextlib.asynccontextmanager
async def connect(runtime: Runtime, what: str) -> AsyncIterator[Any]:
    """Open a client for ``runtime``'s engine for one operation, with errors translated.

    A client per operation rather than per driver: drivers are created per activity call
    and have no close hook, and opening a client is one cheap ``/version`` request.
    """
    with engine_errors(runtime, what):
        client = await asyncio.to_thread(_open_client, docker_settings(runtime))
        try:
            yield client
        finally:
            client.close()


class Progress:
    """The latest progress note of work running in a thread, read by the event loop."""

    def __init__(self, note: str) -> None:
        self.note = note

    def __call__(self, note: str) -> None:
        """Record ``note`` (called from the worker thread; a plain assignment is atomic)."""
        self.note = note


async def run_with_heartbeats(fn: Callable[[Progress], T], heartbeat: Heartbeat, *, first_note: str) -> T:
    """Run blocking ``fn(progress)`` in a thread, heartbeating its latest note meanwhile.

    Heartbeats are sent from the event loop, never from the thread, because Temporal's
    heartbeat for async activities is not meant to be called off the loop.
    """
    progress = Progress(first_note)
    task = asyncio.ensure_future(asyncio.to_thread(fn, progress))
    while True:
        done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_SECONDS)
        if done:
            return task.result()
        heartbeat(progress.note)
