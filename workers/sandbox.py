"""Start the lifecycle worker where uploaded code can steal nothing: a bubblewrap sandbox.

Uploaded lifecycle code is arbitrary Python however it is checked, so the process that
runs it must hold nothing worth taking and reach nothing but Temporal. On Linux that
process runs under Debian's ``bubblewrap``:

- ``--unshare-all`` (user, pid, ipc, uts, cgroup and **network** namespaces), uid/gid
  65534, every capability dropped, no nested user namespaces, ``--new-session``,
  ``--die-with-parent``;
- started by root, bubblewrap itself runs as an unprivileged host user of its own
  (:data:`SANDBOX_HOST_UID`, see :func:`launch_options`), so the sandbox's 65534 is that
  user on the host, not root: a root-only file in a bound folder stays unreadable;
- ``--clearenv``: the environment is rebuilt from a short list (Temporal's address,
  namespace and client TLS settings, the task queue); no database URL, key or password;
- a read-only filesystem of exactly the system libraries, the Python installation and
  the project's packages, plus an empty private ``/tmp``; no home, no ``MLC_HOME``, no
  PostgreSQL socket folder, no Docker socket;
- its own empty network namespace, whose only way out is one unix socket bound into it
  (``/run/mlc/temporal.sock``), which this process forwards to Temporal's address. With
  a client certificate (mutual TLS, as ``mlc dev`` has), this process speaks TLS with it
  and the sandbox plain HTTP/2 to the socket: the key never enters the sandbox. So the
  sandbox reaches Temporal and nothing else: not PostgreSQL, not model servers, not the
  host's loopback services (with a shared network it would reach all of them).

The worker inside listens on its own loopback and pipes to that socket (see
:mod:`workers.lifecycle_worker`), so the Temporal client inside connects as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlc.errors import RuntimeUnavailableError
from mlc.isolation import UID_RANGE, ModelUser, enter, isolating

BRIDGE_ENV = "MLC_TEMPORAL_BRIDGE"
"""Inside the sandbox: the unix socket that leads to Temporal."""
BRIDGE_INSIDE = Path("/run/mlc")
BRIDGE_SOCKET = "temporal.sock"
READY_MARKER = "lifecycle worker polling task queue"
"""The line the worker prints once it polls; the launcher waits for it."""
SANDBOX_UID = 65534
"""``nobody``: the worker's user inside the sandbox."""
SANDBOX_HOST_UID = UID_RANGE[0] - 1
"""The host uid (= gid) the sandbox runs as when started by root: just below the model
users' range, the only user of that id, never root (so never ``65534 0 1`` in uid_map)."""
TMP_SIZE = 64 * 1024 * 1024
"""Bytes of the sandbox's private ``/tmp``."""
PACKAGES = ("mlc", "workflows", "activities", "workers", "lifecycles", "cli", "server")
"""The project's packages the worker imports (bound read-only when outside the venv); the
CLI that starts it imports ``server`` (the server-side halves of its writes)."""
CLIENT_ENV_PREFIXES = ("TEMPORAL_TLS", "TEMPORAL_GRPC_META_")
CLIENT_ENV = ("TEMPORAL_API_KEY",)
"""Temporal client settings the worker may take in: what it needs to reach Temporal."""
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0


def bwrap_path() -> str:
    """The ``bwrap`` executable, or a :class:`RuntimeUnavailableError` saying how to get one."""
    found = shutil.which("bwrap")
    if found is None or not sys.platform.startswith("linux"):
        raise RuntimeUnavailableError(
            "uploaded lifecycles run only in a sandbox, and bubblewrap (`bwrap`) is not installed: "
            "install it (`apt-get install bubblewrap`), or run `mlc worker --lifecycles --no-sandbox` "
            "in a container restricted like docker-compose.yml's lifecycle-worker service"
        )
    return found


def sandbox_available() -> bool:
    """Whether :func:`bwrap_path` would succeed."""
    try:
        bwrap_path()
    except RuntimeUnavailableError:
        return False
    return True


def read_only_roots() -> list[Path]:
    """What the worker needs to read: the Python installation, the venv and the packages."""
    roots = [Path(sys.base_prefix), Path(sys.prefix)]
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            roots.append(Path(spec.origin).resolve().parent)
    unique: list[Path] = []
    for root in sorted({r.resolve() for r in roots}, key=lambda p: len(p.parts)):
        if not any(root.is_relative_to(u) for u in unique) and root.exists():
            unique.append(root)
    return unique


def host_user(reach: Sequence[Path]) -> ModelUser | None:
    """Who bubblewrap runs as: :data:`SANDBOX_HOST_UID` when started by root (reaching the
    folders ``reach`` it binds), else None (the caller's own, already unprivileged, user)."""
    if not isolating():
        return None
    return ModelUser(SANDBOX_HOST_UID, SANDBOX_HOST_UID, reach=tuple(str(p) for p in reach))


def launch_options(user: ModelUser | None) -> dict[str, Any]:
    """Subprocess keywords that start ``bwrap`` as ``user``: a private mount view of what it
    binds (those behind a 0700 folder such as ``/root``), then groups, gid and uid dropped
    for good, no new privileges (:func:`mlc.isolation.enter`). The unprivileged bubblewrap
    then maps the sandbox's 65534 onto that user, never onto root."""
    if user is None:
        return {}
    return {"preexec_fn": lambda: enter(user)}


def client_env(environ: Mapping[str, str], *, address: str) -> dict[str, str]:
    """The Temporal client settings of ``environ`` the worker gets, with the TLS server
    name pinned to ``address``'s host (inside, it connects to its own loopback)."""
    chosen = {k: v for k, v in environ.items() if k in CLIENT_ENV or k.startswith(CLIENT_ENV_PREFIXES)}
    tls = chosen.get("TEMPORAL_TLS", "").lower() in ("1", "true") or any(
        k.startswith("TEMPORAL_TLS_") for k in chosen
    )
    if tls and "TEMPORAL_TLS_SERVER_NAME" not in chosen:
        chosen["TEMPORAL_TLS_SERVER_NAME"] = address.rsplit(":", 1)[0]
    return chosen


def bwrap_command(
    argv: Sequence[str], *, env: Mapping[str, str], bridge_dir: Path, read_only: Sequence[Path] = ()
) -> list[str]:
    """``bwrap ... argv``: ``argv`` in the sandbox described in this module's docstring."""
    command = [
        bwrap_path(),
        "--unshare-all",
        "--unshare-user",
        "--uid", str(SANDBOX_UID),
        "--gid", str(SANDBOX_UID),
        "--disable-userns",
        "--cap-drop", "ALL",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--hostname", "mlc-lifecycles",
    ]  # fmt: skip
    for name in ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            command += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            command += ["--ro-bind", str(path), str(path)]
    for public in ("/etc/ssl", "/etc/ca-certificates", "/etc/localtime"):
        if Path(public).exists():
            command += ["--ro-bind", public, public]
    # The private /tmp first: the project or its venv may live under the host's /tmp (a CI
    # checkout), and binds made after it are laid on top of it instead of hidden by it.
    command += ["--size", str(TMP_SIZE), "--tmpfs", "/tmp"]
    for root in [*read_only_roots(), *read_only]:
        command += ["--ro-bind", str(root), str(root)]
    command += [
        "--ro-bind", str(bridge_dir), str(BRIDGE_INSIDE),
        "--proc", "/proc",
        "--dev", "/dev",
        "--remount-ro", "/",
        "--chdir", "/tmp",
    ]  # fmt: skip
    for name, value in env.items():
        command += ["--setenv", name, value]
    return [*command, "--", *argv]


def worker_env(*, main_queue: str, address: str, namespace: str, extra: Mapping[str, str]) -> dict[str, str]:
    """The sandboxed worker's whole environment."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "MLC_HOME": "/tmp/mlc",
        "MLC_TASK_QUEUE": main_queue,
        "TEMPORAL_ADDRESS": address,
        "TEMPORAL_NAMESPACE": namespace,
        BRIDGE_ENV: str(BRIDGE_INSIDE / BRIDGE_SOCKET),
        **extra,
    }


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()


@dataclass(frozen=True)
class BridgeTLS:
    """Mutual TLS the launcher's bridge speaks to Temporal for the sandbox (which then
    speaks plain HTTP/2 to the bridge and never holds the client key)."""

    context: ssl.SSLContext
    server_name: str


def bridge_tls(env: Mapping[str, str]) -> BridgeTLS | None:
    """The bridge's TLS when Temporal's client settings ``env`` are a client certificate
    (and no API key, which the worker inside must send itself); else None."""
    cert, key = env.get("TEMPORAL_TLS_CLIENT_CERT_PATH"), env.get("TEMPORAL_TLS_CLIENT_KEY_PATH")
    if not (cert and key) or env.get("TEMPORAL_API_KEY"):
        return None
    try:
        context = ssl.create_default_context(cafile=env.get("TEMPORAL_TLS_SERVER_CA_CERT_PATH") or None)
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise RuntimeUnavailableError(f"cannot load the Temporal client certificate {cert}: {exc}") from exc
    context.set_alpn_protocols(["h2"])  # gRPC: nginx and Temporal speak HTTP/2 only when asked
    return BridgeTLS(context, env.get("TEMPORAL_TLS_SERVER_NAME") or "localhost")


async def forward(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    target: tuple[str, int] | str,
    tls: BridgeTLS | None = None,
) -> None:
    """Pipe one connection both ways to ``target`` (``(host, port)`` or a unix socket path),
    over ``tls`` to a ``(host, port)`` when given."""
    try:
        if isinstance(target, str):
            up_reader, up_writer = await asyncio.open_unix_connection(target)
        elif tls is not None:
            up_reader, up_writer = await asyncio.open_connection(
                *target, ssl=tls.context, server_hostname=tls.server_name
            )
        else:
            up_reader, up_writer = await asyncio.open_connection(*target)
    except OSError:
        writer.close()
        return
    await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RuntimeUnavailableError(f"TEMPORAL_ADDRESS {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass
class SandboxedWorker:
    """A running sandboxed lifecycle worker and the bridge that leads it to Temporal."""

    process: asyncio.subprocess.Process
    bridge: asyncio.Server
    bridge_dir: Path
    log_path: Path
    task_queue: str

    async def stop(self) -> None:
        """Stop the worker (its in-flight workflow tasks are retried elsewhere) and the bridge."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_SECONDS)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        self.bridge.close()
        await self.bridge.wait_closed()
        shutil.rmtree(self.bridge_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        """The worker's last output lines (for errors)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"


async def start_lifecycle_worker(
    *,
    main_queue: str,
    temporal_address: str,
    namespace: str = "default",
    log_path: Path,
    environ: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    ready_timeout: float = READY_TIMEOUT_SECONDS,
) -> SandboxedWorker:
    """Start ``mlc worker --lifecycles --no-sandbox`` in the sandbox, serving
    ``<main_queue>-lifecycles``, and return once it polls.

    Args:
        main_queue: The main task queue (where its activities go).
        temporal_address: ``HOST:PORT`` of Temporal's frontend, reached through the bridge.
        namespace: Temporal namespace.
        log_path: Where the worker's output goes.
        environ: Where Temporal client TLS settings are read from (default: none, plain text).
        extra_env: More variables for the worker (tests only).
        ready_timeout: How long to wait for it to poll.

    Raises:
        RuntimeUnavailableError: no bubblewrap, or the worker exited or did not start
            polling in time (with its last output lines).
    """
    bwrap_path()
    target = _host_port(temporal_address)
    bridge_dir = Path(tempfile.mkdtemp(prefix="mlc-bridge-"))  # 0700, a random name
    user = host_user([*read_only_roots(), bridge_dir])
    socket_path = bridge_dir / BRIDGE_SOCKET
    client = client_env(environ or {}, address=temporal_address)
    tls = bridge_tls(client)
    if tls is not None:  # the bridge holds the certificate: nothing of it enters the sandbox
        client = {k: v for k, v in client.items() if not k.startswith("TEMPORAL_TLS")}
    client = _copy_tls_files(client, bridge_dir, user)
    bridge = await asyncio.start_unix_server(lambda r, w: forward(r, w, target, tls), path=str(socket_path))
    os.chmod(socket_path, 0o777)
    if user is not None:
        os.chown(bridge_dir, user.uid, user.gid)
    env = worker_env(
        main_queue=main_queue,
        address=temporal_address,
        namespace=namespace,
        extra={**client, **(extra_env or {})},
    )
    argv = [sys.executable, "-m", "mlc", "worker", "--lifecycles", "--no-sandbox"]
    command = bwrap_command(argv, env=env, bridge_dir=bridge_dir)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            **launch_options(user),
        )
    started = SandboxedWorker(process, bridge, bridge_dir, log_path, f"{main_queue}-lifecycles")
    offset = log_path.stat().st_size if log_path.exists() else 0
    deadline = time.monotonic() + ready_timeout
    while True:
        if _printed(log_path, offset, READY_MARKER):
            return started
        if process.returncode is not None or time.monotonic() > deadline:
            await started.stop()
            what = (
                f"exited with code {process.returncode}"
                if process.returncode is not None
                else (f"did not poll within {ready_timeout:.0f} s")
            )
            raise RuntimeUnavailableError(
                f"the sandboxed lifecycle worker for task queue {started.task_queue} {what}; "
                f"last lines of {log_path}:\n{started.log_tail()}"
            )
        await asyncio.sleep(0.05)


def _copy_tls_files(env: Mapping[str, str], bridge_dir: Path, user: ModelUser | None) -> dict[str, str]:
    """``env`` with each ``TEMPORAL_TLS_*_PATH`` file copied into the bridge folder (0400, the
    sandbox's user's: the originals may be root-only) and the variable naming the copy as
    the sandbox sees it."""
    copied = dict(env)
    for name, value in env.items():
        if not (name.startswith("TEMPORAL_TLS_") and name.endswith("_PATH")):
            continue
        copy = bridge_dir / f"{name.lower()}.pem"
        try:
            shutil.copyfile(value, copy)
        except OSError as exc:
            raise RuntimeUnavailableError(
                f"cannot read {name}={value} for the lifecycle worker: {exc}"
            ) from exc
        copy.chmod(0o400)
        if user is not None:
            os.chown(copy, user.uid, user.gid)
        copied[name] = str(BRIDGE_INSIDE / copy.name)
    return copied


def _printed(path: Path, offset: int, marker: str) -> bool:
    """Whether ``marker`` appeared in ``path`` after ``offset`` (its size when we started)."""
    try:
        with path.open("rb") as log:
            log.seek(max(0, offset - len(marker)))
            return marker.encode() in log.read()
    except OSError:
        return False


@contextlib.asynccontextmanager
async def lifecycle_worker(
    *,
    main_queue: str,
    temporal_address: str,
    namespace: str = "default",
    log_path: Path,
    environ: Mapping[str, str] | None = None,
) -> AsyncIterator[SandboxedWorker]:
    """:func:`start_lifecycle_worker` for the duration of a ``with`` block."""
    started = await start_lifecycle_worker(
        main_queue=main_queue,
        temporal_address=temporal_address,
        namespace=namespace,
        log_path=log_path,
        environ=environ,
    )
    try:
        yield started
    finally:
        await started.stop()
