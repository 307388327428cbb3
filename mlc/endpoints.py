"""Where a model server answers: a unix socket in its deployment folder, or an HTTP address.

Local runtimes serve every model on a unix socket inside the deployment's own folder
(mode 0700, the model user's), never on a TCP port: a socket there cannot be squatted by
another model, and a model in a network namespace of its own still answers through it
(path-named sockets are not bound to a network namespace). Such an endpoint is written
``unix:SOCKET[PATH]``: the socket's absolute path, whose last component ends in ``.sock``,
then the HTTP path prefix of the model on it, e.g.
``unix:/root/.mlc/runtimes/local-dev/.host/host.sock/models/cc-fraud-v1-dev-...``. Docker
runtimes and histories recorded before this change hold ``http://HOST:PORT[/PATH]``,
which is still understood.

:func:`connect` opens an HTTP client on either kind. For a socket it first opens the
socket file without following links and checks its owner, then connects through that
handle (``/proc/self/fd/N``): what is checked is what is connected to, and paths longer
than a socket address may hold (108 bytes) still work.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from mlc.errors import DeploymentFailedError

UNIX_PREFIX = "unix:"
SOCKET_SUFFIX = ".sock"
SOCKET_BASE_URL = "http://model"
"""The origin HTTP requests over a socket carry (the server ignores the host)."""


@dataclass(frozen=True)
class Endpoint:
    """A parsed endpoint: the socket (None for TCP) and the HTTP base URL of the model."""

    socket: Path | None
    url: str


def unix_endpoint(socket: Path, path: str = "") -> str:
    """The endpoint of a model at ``path`` on the server listening on ``socket``."""
    return f"{UNIX_PREFIX}{socket}{path}"


def parse(endpoint: str) -> Endpoint:
    """Split ``endpoint`` into its socket (None for ``http://``) and HTTP base URL.

    Raises:
        ValueError: a ``unix:`` endpoint without an absolute ``.sock`` path.
    """
    if not endpoint.startswith(UNIX_PREFIX):
        return Endpoint(None, endpoint.rstrip("/"))
    parts = Path(endpoint[len(UNIX_PREFIX) :]).parts
    for index, part in enumerate(parts):
        if part.endswith(SOCKET_SUFFIX) and index > 0:
            if parts[0] != "/":
                break
            path = "/".join(parts[index + 1 :])
            return Endpoint(Path(*parts[: index + 1]), SOCKET_BASE_URL + (f"/{path}" if path else ""))
    raise ValueError(f"endpoint {endpoint!r} is not unix:/PATH/NAME.sock[/PREFIX]")


def socket_owner(socket: Path) -> int:
    """The uid owning ``socket``, looked at without following a link.

    Raises:
        DeploymentFailedError: it is missing or is not a socket.
    """
    try:
        info = os.lstat(socket)
    except OSError as exc:
        raise DeploymentFailedError(f"no model server socket at {socket}: {exc.strerror}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise DeploymentFailedError(f"{socket} is not a socket: refusing to send it traffic")
    return info.st_uid


async def get(endpoint: str, path: str, *, timeout: float) -> httpx.Response:
    """One ``GET`` of ``path`` on ``endpoint`` over a fresh connection: for polling a server
    that is starting (its socket may not exist yet, or be a new one)."""
    async with connect(endpoint, timeout=timeout) as (client, url):
        return await client.get(f"{url}{path}")


@contextlib.asynccontextmanager
async def connect(
    endpoint: str, *, timeout: float | httpx.Timeout, owner: int | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """An HTTP client reaching ``endpoint`` and the base URL to put paths after.

    Args:
        endpoint: ``unix:...`` or ``http://...`` (see the module's docstring).
        timeout: Seconds per request.
        owner: For a socket, the uid that must own it (the deployment's model user).

    Raises:
        DeploymentFailedError: the socket's owner is not ``owner``.
    """
    target = parse(endpoint)
    if target.socket is None:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            yield client, target.url
        return
    try:
        fd = os.open(target.socket, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        fd = -1  # gone (a dead server): requests fail as a refused connection would
    try:
        if fd >= 0 and owner is not None and os.fstat(fd).st_uid != owner:
            raise DeploymentFailedError(
                f"{target.socket} belongs to uid {os.fstat(fd).st_uid}, not to the deployment's "
                f"user {owner}: refusing to send it traffic"
            )
        uds = f"/proc/self/fd/{fd}" if fd >= 0 else str(target.socket)
        # plain HTTP on a socket: no TLS context (loading the CA bundle costs ~35 ms a try)
        transport = httpx.AsyncHTTPTransport(uds=uds, verify=False)
        async with httpx.AsyncClient(transport=transport, timeout=timeout, trust_env=False) as client:
            yield client, target.url
    finally:
        if fd >= 0:
            os.close(fd)
