"""Stable endpoints as the inventory records them: which versions answer, with which share.

Only pydantic and the standard library are imported here, so workflow code, the CLI's
light reads and the store share these types.
"""

from __future__ import annotations

import errno
import random
import socket
from collections.abc import Collection
from datetime import datetime

from mlc.domain import Frozen, TrafficRoute

GATEWAY_PORTS = range(20000, 30000)
"""Where a new runtime's gateway port is picked: below the kernel's ephemeral range
(32768-60999 on Linux), from which deployments and clients take theirs, so a port picked
today is not taken by a model server when the gateway first starts."""


class TrafficTable(Frozen):
    """One stable endpoint: the routes live behind a model's endpoint on one gateway runtime."""

    runtime: str
    model: str
    stage: str
    endpoint: str
    routes: tuple[TrafficRoute, ...] = ()
    """Empty when nothing was routed there yet (the endpoint answers 503)."""
    updated_at: datetime | None = None
    workflow_id: str | None = None
    run_id: str | None = None
    """The run that made the last change."""
    decided_at: datetime | None = None
    """When that change was authorized (the order of changes; None: recorded before it was kept)."""

    @property
    def routed_ids(self) -> frozenset[str]:
        """The deployments behind the endpoint (answering or shadow)."""
        return frozenset(r.deployment_id for r in self.routes)


def describe_routes(routes: tuple[TrafficRoute, ...]) -> str:
    """``v2 90%, v1 10%, v3 shadow`` (or ``nothing (503)``) for people to read."""
    if not routes:
        return "nothing (503)"
    return ", ".join(f"v{r.version} shadow" if r.shadow else f"v{r.version} {r.weight}%" for r in routes)


def pick_gateway_port(
    host: str = "127.0.0.1", *, taken: Collection[int] = (), preferred: int | None = None
) -> int:
    """A port free on ``host`` now for a new runtime's gateway (``preferred`` when free).

    A ``host`` that is not this machine's (a remote engine's) cannot be checked from here.

    Raises:
        OSError: no free port was found in :data:`GATEWAY_PORTS` after many tries.
    """
    candidates = [preferred] if preferred else []
    candidates += random.sample(GATEWAY_PORTS, 200)
    for port in candidates:
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    return port  # another host's address (a remote engine): cannot check from here
                continue
        return port
    raise OSError(f"no free port for a gateway on {host} in {GATEWAY_PORTS.start}-{GATEWAY_PORTS.stop - 1}")
