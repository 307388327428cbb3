"""Temporal of ``mlc dev`` closed to everything but its workers and people: mutual TLS.

The dev server has no TLS and no authentication, and anyone who reaches its port can
start, signal and terminate any workflow. So, when ``mlc dev`` runs as root and nginx is
installed:

- the dev server runs in a **network namespace of its own** (:func:`own_network`): its
  gRPC and Web UI ports exist only on that namespace's loopback, which no other process
  of the host reaches;
- an nginx inside that namespace (:func:`join_network`) passes them on to two unix
  sockets (0660) in a folder of root's with a random name (0750), both of the group of
  nginx's workers: the installation's ``temporal-proxy`` user and group
  (:func:`mlc.isolation.service_user`), which no other account, model or gateway worker
  has (not ``nobody``); path-named sockets are not bound to a network namespace;
- the host's nginx listens on ``127.0.0.1:<temporal port>`` with **mutual TLS** (a
  client certificate signed by the home's CA, checked by nginx) and passes gRPC to the
  first socket; on ``127.0.0.1:<ui port>`` it asks for the Web UI's password (HTTP basic
  authentication) and passes the UI to the second.

The certificates (a CA, whose key is thrown away once it has signed the others; the
server's for ``localhost``/``127.0.0.1``; one client's for the CLI and the workers; all
X.509 v3: the SDK's rustls refuses v1) and the UI password are made once into
``MLC_HOME/tls`` (0700, files 0600) by :func:`ensure_credentials`. ``mlc dev`` records
their paths in ``dev.json``, which is how the CLI and ``mlc worker`` find them
(:func:`cli.stack.devstack.discover`).

Without root there is no network namespace to give, and without nginx no proxy: the dev
server then listens in plain text on ``127.0.0.1:<temporal port>`` as before, open to
every local process, and ``mlc dev`` says so (:func:`unguarded_because`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import datetime
import fcntl
import hashlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mlc import isolation, processes
from mlc.config import TemporalTLS
from mlc.errors import RuntimeUnavailableError

TLS_DIR = "tls"
"""Under ``MLC_HOME``: the CA, the server's and the client's certificates, the UI password."""
PROXY_DIR = "temporal-proxy"
"""Under ``MLC_HOME``: the two nginx configurations, their logs and pid files."""
SOCKETS_RECORD = "temporal-sockets"
"""Under ``MLC_HOME``: the path of the sockets folder (a random name, see
:func:`mlc.isolation.private_temp_folder`)."""
SOCKETS_TIMEOUT_SECONDS = 10.0
"""How long the inner nginx may take to make its sockets."""
GRPC_SOCKET = "grpc.sock"
UI_SOCKET = "ui.sock"
UI_USER = "mlc"
"""The Web UI's login name; its password is in ``tls/ui-password``."""
SERVER_NAME = "localhost"
CERT_DAYS = 825
RENEW_DAYS = 30
"""Certificates closer than this to their end are made again at the next start."""
NGINX_ENV = "MLC_NGINX"

_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def unguarded_because() -> str | None:
    """Why ``mlc dev`` cannot close its Temporal here (None when it can: root on Linux, for
    a network namespace, and nginx, for the proxy)."""
    if not isolation.isolating():
        return "run `mlc dev` as root"
    if find_nginx() is None:
        return "install nginx (scripts/system-deps.sh or apt-get install nginx-light)"
    return None


def find_nginx() -> str | None:
    """The host's nginx: ``MLC_NGINX`` when set (None if that is not a file), else on PATH
    or in ``/usr/sbin``."""
    named = os.environ.get(NGINX_ENV)
    if named:
        return named if Path(named).is_file() else None
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")


def nginx() -> str:
    """:func:`find_nginx`, or a readable error."""
    found = find_nginx()
    if found is None:
        raise RuntimeUnavailableError(
            "`mlc dev` puts Temporal behind nginx (mutual TLS), and nginx is not installed: "
            f"run `apt-get install nginx-light` (or set {NGINX_ENV}, or TEMPORAL_ADDRESS to your own server)"
        )
    return found


def listening(pid: int, port: int) -> bool:
    """Whether something listens on ``127.0.0.1:port`` in ``pid``'s network namespace (its
    ``/proc/PID/net/tcp``): the port check of a server no connection from here reaches."""
    try:
        table = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    wanted = f"0100007F:{port:04X}"
    return any(row.split()[1] == wanted and row.split()[3] == "0A" for row in table if len(row.split()) > 3)


# --- certificates ------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """What ``MLC_HOME/tls`` holds."""

    client: TemporalTLS
    """The CLI's and the workers' client certificate, with the CA that signed the server's."""
    server_cert: Path
    server_key: Path
    ui_password: str
    htpasswd: str
    """The password's line for nginx (``{SSHA}``: salted, never the password itself)."""


def ensure_credentials(home: Path) -> Credentials:
    """The home's certificates and UI password, made now where missing or near their end."""
    folder = home / TLS_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    folder.chmod(0o700)
    ca, server, client = (folder / f"{name}.pem" for name in ("ca", "server", "client"))
    keys = {path: path.with_suffix(".key") for path in (server, client)}
    if not (_valid(ca) and all(_valid(path) and key.is_file() for path, key in keys.items())):
        _issue_all(ca, server, client, keys)
    password_file = folder / "ui-password"
    password = isolation.read_own_file(password_file)
    if not password:
        password = secrets.token_urlsafe(18)
        isolation.write_file(password_file, password)
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.strip().encode() + salt, usedforsecurity=False).digest()
    return Credentials(
        client=TemporalTLS(ca=ca, cert=client, key=keys[client], server_name=SERVER_NAME),
        server_cert=server,
        server_key=keys[server],
        ui_password=password.strip(),
        htpasswd=f"{UI_USER}:{{SSHA}}{base64.b64encode(digest + salt).decode()}\n",
    )


def ui_login(home: Path) -> str | None:
    """``user mlc, password in FILE`` when the home's Web UI asks for one (the start-up
    table never shows a password: a screen is shared, a terminal is logged)."""
    password_file = home / TLS_DIR / "ui-password"
    return f"user {UI_USER}, password in {password_file}" if password_file.is_file() else None


def _valid(path: Path) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return left > datetime.timedelta(days=RENEW_DAYS)


def _issue_all(ca: Path, server: Path, client: Path, keys: dict[Path, Path]) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("mlc dev Temporal CA", ca_key.public_key(), ca_key, None)
    isolation.write_file(ca, ca_cert.public_bytes(serialization.Encoding.PEM).decode())
    # the CA's key is not kept: all three are made again together when one is near its end
    for path, cn, usage in (
        (server, SERVER_NAME, ExtendedKeyUsageOID.SERVER_AUTH),
        (client, "mlc dev client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        _write_pem(path, _certificate(cn, key.public_key(), ca_key, (ca_cert, usage)), keys[path], key)


def _certificate(
    cn: str,
    public: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    leaf: tuple[x509.Certificate, x509.ObjectIdentifier] | None,
) -> x509.Certificate:
    """A v3 certificate: the CA's (``leaf`` None, self-signed), or a leaf signed by the
    CA with its extended key usage and names ``localhost`` / ``127.0.0.1``."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    is_ca = leaf is None
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if leaf is None else leaf[0].subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS * (4 if is_ca else 1)))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    if leaf is not None:
        builder = (
            builder.add_extension(x509.ExtendedKeyUsage([leaf[1]]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
                ),
                critical=False,
            )
        )
    return builder.sign(signer, hashes.SHA256())


def _write_pem(
    cert_path: Path, cert: x509.Certificate, key_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    pem = serialization.Encoding.PEM
    isolation.write_file(cert_path, cert.public_bytes(pem).decode())
    isolation.write_file(
        key_path,
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode(),
    )


# --- network namespaces ------------------------------------------------------------------


def own_network() -> None:
    """In a child before exec: a network namespace of its own, with its loopback up."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def join_network(pid: int) -> Callable[[], None]:
    """A pre-exec function entering ``pid``'s network namespace."""
    path = f"/proc/{pid}/ns/net"

    def enter() -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns({path}) failed")
        finally:
            os.close(fd)

    return enter


def in_own_network(pid: int) -> bool:
    """Whether ``pid`` runs in another network namespace than this process."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    except OSError:
        return False


# --- the two nginx -----------------------------------------------------------------------

_COMMON = """\
worker_processes 1;
user {user};
pid {d}/{name}.pid;
error_log {d}/{name}.error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {d}/{name}.access.log;
    client_body_temp_path {s}/{name}-body;
    proxy_temp_path {s}/{name}-proxy;
    fastcgi_temp_path {s}/{name}-fastcgi;
    uwsgi_temp_path {s}/{name}-uwsgi;
    scgi_temp_path {s}/{name}-scgi;
    client_max_body_size 64m;
    grpc_read_timeout 300s;
    grpc_send_timeout 300s;
    proxy_read_timeout 300s;
{servers}}}
"""

INNER = """\
    server {{
        listen unix:{s}/{grpc} http2;
        location / {{ grpc_pass grpc://127.0.0.1:{port}; }}
    }}
{ui}"""

INNER_UI = """\
    server {{
        listen unix:{s}/{uisock};
        location / {{
            proxy_pass http://127.0.0.1:{ui_port};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_buffering off;
        }}
    }}
"""

OUTER = """\
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        location / {{ grpc_pass grpc://unix:{s}/{grpc}; }}
    }}
{ui}"""

OUTER_UI = """\
    server {{
        listen 127.0.0.1:{ui_port};
        auth_basic "mlc dev: Temporal Web UI (user {ui_user}, password in {password_file})";
        auth_basic_user_file {s}/ui.htpasswd;
        location / {{
            proxy_pass http://unix:{s}/{uisock};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Authorization "";
            proxy_buffering off;
        }}
    }}
"""


@dataclass
class TemporalProxy:
    """The inner and the outer nginx of one home's guarded Temporal (module docstring)."""

    home: Path
    temporal_port: int
    ui_port: int
    headless: bool

    def __post_init__(self) -> None:
        self.folder = self.home / PROXY_DIR
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, temporal_pid: int, credentials: Credentials) -> None:
        """(Re)start both nginx: the inner one in ``temporal_pid``'s network namespace."""
        self.stop()
        self.folder.mkdir(mode=0o700, exist_ok=True)
        sockets = self._sockets_folder()
        isolation.write_file(sockets / "ui.htpasswd", credentials.htpasswd, mode=0o640)
        os.chown(sockets / "ui.htpasswd", 0, self._worker_gid())
        for name in (GRPC_SOCKET, UI_SOCKET):
            (sockets / name).unlink(missing_ok=True)
        common = {"d": self.folder, "s": sockets, "user": self._worker_user(), "grpc": GRPC_SOCKET}
        fields = {**common, "port": self.temporal_port, "ui_port": self.ui_port, "uisock": UI_SOCKET}
        inner_ui = "" if self.headless else INNER_UI.format(**fields)
        outer_ui = (
            ""
            if self.headless
            else OUTER_UI.format(**fields, ui_user=UI_USER, password_file=self.home / TLS_DIR / "ui-password")
        )
        inner = INNER.format(**fields, ui=inner_ui)
        outer = OUTER.format(
            **fields,
            ui=outer_ui,
            cert=credentials.server_cert,
            key=credentials.server_key,
            ca=credentials.client.ca,
        )
        for name, servers in (("inner", inner), ("outer", outer)):
            isolation.write_file(
                self.folder / f"{name}.conf", _COMMON.format(**common, name=name, servers=servers)
            )
        names = isolation.naming([self._user()], self.folder)
        self._spawn("inner", join_network(temporal_pid), names)
        self._lock_sockets(sockets)
        self._spawn("outer", None, names)

    def _lock_sockets(self, sockets: Path) -> None:
        """Once the inner nginx made its sockets (nginx makes them 0666): 0660, of the
        proxy's group, so only the outer nginx's workers connect (the folder is that
        group's too). Returns early if the inner nginx exits (:meth:`failed` says why)."""
        names = [GRPC_SOCKET] + ([] if self.headless else [UI_SOCKET])
        deadline = time.monotonic() + SOCKETS_TIMEOUT_SECONDS
        while not all((sockets / n).is_socket() for n in names) and time.monotonic() < deadline:
            if self.failed() is not None:
                return
            time.sleep(0.02)
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.chown(sockets / name, 0, self._worker_gid(), follow_symlinks=False)
                os.chmod(sockets / name, 0o660, follow_symlinks=False)

    def _spawn(self, name: str, enter: Callable[[], None] | None, names: list[str]) -> None:
        command = [*names, nginx(), "-p", f"{self.folder}/", "-c", str(self.folder / f"{name}.conf"),
                   "-e", str(self.folder / f"{name}.error.log"), "-g", "daemon off;"]  # fmt: skip
        death = processes.parent_death_signal(signal.SIGTERM)

        def preexec() -> None:
            if enter is not None:
                enter()
            if death is not None:
                death()

        with (self.folder / f"{name}.out").open("ab") as log:
            child = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=preexec,
            )  # fmt: skip
        self._children[name] = child

    def failed(self) -> str | None:
        """Which nginx exited, with its last log lines (None while both run)."""
        for name, child in self._children.items():
            if child.poll() is not None:
                log = self.folder / f"{name}.out"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                return f"the {name} nginx in front of Temporal exited (code {child.returncode}): {tail}"
        return None

    def stop(self) -> None:
        """Stop both (those of a previous stack too, found by their pid files) and remove the
        sockets folder (the next start makes a new one)."""
        for name in ("outer", "inner"):
            child = self._children.pop(name, None)
            pid = child.pid if child is not None else _pid_of(self.folder / f"{name}.pid")
            conf = str(self.folder / f"{name}.conf")
            if pid and processes.alive(pid) and (child is not None or conf in processes.command_line(pid)):
                processes.stop(pid, child=child)
        recorded = isolation.read_own_file(self.home / SOCKETS_RECORD)
        if recorded:
            folder = Path(recorded.strip())
            with contextlib.suppress(OSError):
                if folder.is_dir() and not folder.is_symlink() and folder.stat().st_uid == os.geteuid():
                    shutil.rmtree(folder)

    def _sockets_folder(self) -> Path:
        folder = isolation.private_temp_folder(self.home / SOCKETS_RECORD, prefix="mlc-temporal-")
        os.chown(folder, 0, self._worker_gid())
        folder.chmod(0o750)  # root, and nginx's workers (the group): nobody else
        return folder

    def _user(self) -> isolation.ModelUser:
        """The user and group of the proxy's nginx workers (one per installation)."""
        return isolation.service_user(self.home, "temporal-proxy")

    def _worker_user(self) -> str:
        name = isolation.service_name(self._user())
        return f"{name} {name}"

    def _worker_gid(self) -> int:
        return self._user().gid


def _pid_of(path: Path) -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().strip() or 0)
    return 0


def spawn_in_own_network(
    args: list[str], *, log: IO[bytes], die_with_parent: bool
) -> subprocess.Popen[bytes]:
    """:func:`mlc.processes.spawn` in a network namespace of the child's own (:func:`own_network`)."""
    death = processes.parent_death_signal(signal.SIGTERM) if die_with_parent else None

    def preexec() -> None:
        own_network()
        if death is not None:
            death()

    return subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=preexec,
    )  # fmt: skip


async def wait_ready(address: str, tls: TemporalTLS, failed: Callable[[], str | None]) -> None:
    """Return once Temporal answers at ``address`` over mutual TLS, or raise with what
    ``failed`` reports (a process that exited) or after 30 s."""
    from temporalio.client import Client
    from temporalio.service import TLSConfig

    config = TLSConfig(
        server_root_ca_cert=tls.ca.read_bytes(),
        domain=tls.server_name,
        client_cert=tls.cert.read_bytes(),
        client_private_key=tls.key.read_bytes(),
    )
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        problem = failed()
        if problem is not None:
            raise RuntimeUnavailableError(problem)
        try:
            await Client.connect(address, tls=config)
            return
        except RuntimeError as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeUnavailableError(
                    f"Temporal did not answer through its mutual-TLS proxy at {address} within 30 s: {exc}"
                ) from exc
        await asyncio.sleep(0.2)
