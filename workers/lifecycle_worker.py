"""The lifecycle worker process: uploaded lifecycles on ``<main>-lifecycles``, nothing else.

This is what runs *inside* the sandbox (``mlc worker --lifecycles --no-sandbox``, started
by :mod:`workers.sandbox` or as docker-compose's ``lifecycle-worker`` container). It
serves only the dynamic ``CustomLifecycle`` workflow and no activity, so everything the
uploaded code makes happen is an activity on the main queue, run by trusted workers.

Before serving it checks its own reach and refuses to start where it could see a
secret: a database URL, a key, a password in its environment, or the Docker socket.
Inside bubblewrap it reaches Temporal through the bridge socket: it listens on its own
loopback and pipes each connection to that socket.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from mlc.config import Settings
from mlc.errors import RefusedError
from mlc.names import lifecycles_task_queue
from workers.sandbox import BRIDGE_ENV, READY_MARKER, forward

SECRET_ENV = (
    "MLC_DATABASE_URL",
    "MLC_WORKER_DATABASE_URL",
    "MLC_PLATFORM_KEY",
    "MLC_SIGNING_KEY",
    "DOCKER_HOST",
    "DOCKER_CERT_PATH",
)
"""Variables the trusted workers and the CLI hold that the lifecycle worker must not."""
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "PRIVATE_KEY")
"""Any variable whose name contains one of these is treated as a secret too."""
DOCKER_SOCKETS = (Path("/var/run/docker.sock"), Path("/run/docker.sock"))
MAX_CACHED_ENV = "MLC_MAX_CACHED_WORKFLOWS"
"""Runs kept in memory between tasks (default 1000); 0 replays every run's history on each task."""


def exposures(environ: Mapping[str, str]) -> list[str]:
    """What this process could steal if uploaded code escaped the workflow sandbox."""
    found = [
        f"${name}"
        for name in sorted(environ)
        if name in SECRET_ENV or any(word in name.upper() for word in SECRET_WORDS)
    ]
    found += [str(path) for path in DOCKER_SOCKETS if path.exists()]
    return found


def check_exposures(environ: Mapping[str, str]) -> None:
    """Refuse to run uploaded code where it could read a secret.

    Raises:
        RefusedError: naming what is reachable and how to start the worker instead.
    """
    found = exposures(environ)
    if found:
        raise RefusedError(
            "the lifecycle worker runs uploaded code and must not see secrets, but it can reach "
            f"{', '.join(found)}; start it without them: `mlc worker --lifecycles` (sandboxed), or "
            "a container like docker-compose.yml's lifecycle-worker service"
        )


def start_bridge(socket_path: str) -> int:
    """Listen on a loopback port of this process and pipe each connection to ``socket_path``.

    It runs on its own thread and event loop, so forwarding never waits behind a
    workflow task. Returns the port.
    """
    ready: list[int] = []
    started = threading.Event()

    def serve() -> None:
        async def main() -> None:
            server = await asyncio.start_server(lambda r, w: forward(r, w, socket_path), "127.0.0.1", 0)
            ready.append(int(server.sockets[0].getsockname()[1]))
            started.set()
            async with server:
                await server.serve_forever()

        asyncio.run(main())

    threading.Thread(target=serve, name="temporal-bridge", daemon=True).start()
    if not started.wait(10):
        raise RefusedError(f"could not open the bridge to Temporal through {socket_path}")
    return ready[0]


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Serve uploaded lifecycles for ``settings.task_queue`` until ``stop`` is set."""
    from workers.client import connect
    from workers.worker import build_lifecycle_worker

    check_exposures(os.environ)
    bridge = os.environ.get(BRIDGE_ENV)
    if bridge:
        settings = replace(settings, temporal_address=f"127.0.0.1:{start_bridge(bridge)}")
    client = await connect(settings, identity=f"lifecycle-worker@{os.getpid()}")
    cached = int(os.environ.get(MAX_CACHED_ENV) or 1000)
    async with build_lifecycle_worker(client, settings.task_queue, max_cached_workflows=cached):
        print(f"{READY_MARKER} {lifecycles_task_queue(settings.task_queue)}", flush=True)
        await stop.wait()
