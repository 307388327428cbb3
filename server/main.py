"""Run the server: bind first, so the public URL names the port really bound (``--port 0``)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

import uvicorn

from mlc.config import Settings
from server.app import create_app
from server.auth.oidc import OidcVerifier
from server.config import ServerConfig

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket. ``TCP_NODELAY`` is set here because connections accepted from a
    socket uvicorn did not make do not get it (uvloop with ``sockets=``), and they inherit it
    from the listener: without it a kept-alive client waits ~40 ms (Nagle against delayed
    ACKs) for every answer after the first, headers and body being two writes (measured by
    bench/bench_api.py: /healthz 48 ms p50 with it off, 2 ms with it on)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


async def serve(settings: Settings, *, host: str, port: int, port_file: Path | None = None) -> None:
    """Serve until stopped; ``port_file`` gets the bound port once the app is ready."""
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    config = ServerConfig.from_env(settings, host=host, port=bound)
    # Discovery before serving: a server that cannot check its provider's tokens does not start.
    oidc = await OidcVerifier.start(config.oidc) if config.oidc else None
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config, oidc=oidc),
            log_level="warning",
            access_log=False,  # request lines can carry cursors and names; never bodies or settings
            server_header=False,
            lifespan="on",
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        log.warning("mlc server listening on %s", config.public_url)
        if port_file is not None:
            tmp = port_file.with_name(f".{port_file.name}.{os.getpid()}")
            tmp.write_text(str(bound))
            tmp.replace(port_file)
    await task
