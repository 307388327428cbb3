"""Connections to Temporal over mutual TLS, through Temporal's standard client settings.

The dev server speaks plain text only, so nginx (Debian's ``nginx-light``) terminates TLS
in front of it, demands a client certificate signed by the test's CA, and passes gRPC on
to the session's dev server. The certificates are made here with ``cryptography``: v3
extensions throughout (the SDK's rustls rejects v1 certificates) and a server certificate
for ``localhost`` / ``127.0.0.1``. Under CI (``CI=true``) a missing nginx fails the tests
that need it; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import TLSConfig
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from cli.stack import dev_temporal
from cli.stack.devstack import DevStack, discover, read_state
from mlc import isolation, processes
from mlc.config import Settings
from mlc.errors import RuntimeUnavailableError
from tests.conftest import missing, require_sandbox
from tests.faults.harness import leftover_processes
from tests.tls_workflow import TlsGreeting, greet
from workers.client import connect, connect_options
from workers.sandbox import start_lifecycle_worker

CLIENT_CN = "mlc-test-worker"
RPC = "/temporal.api.workflowservice.v1.WorkflowService/"


# --- certificates ---------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mlc tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    issued = Issued(cert=folder / f"{stem}.pem", key=folder / f"{stem}.key")
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    issued.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    issued.key.chmod(0o600)
    return issued


def make_ca(folder: Path, cn: str) -> tuple[Issued, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed v3 CA certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(folder, cn, cert, key), cert, key


def issue(
    folder: Path,
    cn: str,
    ca: tuple[Issued, x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
) -> Issued:
    """A v3 leaf certificate signed by ``ca``: a server's (SAN localhost, 127.0.0.1) or a client's."""
    _, ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
    return _write(folder, cn, builder.sign(ca_key, hashes.SHA256()), key)


# --- the proxy ------------------------------------------------------------------------


@dataclass(frozen=True)
class Proxy:
    """nginx terminating mutual TLS in front of the session's Temporal dev server."""

    address: str
    ca: Path
    client: Issued
    foreign_client: Issued
    """Signed by a CA the proxy does not trust."""
    access_log: Path
    error_log: Path

    def tls_env(self, *, client: Issued | None) -> dict[str, str]:
        """Temporal's standard TLS variables for this proxy, with ``client``'s certificate."""
        env = {"TEMPORAL_TLS_SERVER_CA_CERT_PATH": str(self.ca), "TEMPORAL_TLS_SERVER_NAME": "localhost"}
        if client is not None:
            env["TEMPORAL_TLS_CLIENT_CERT_PATH"] = str(client.cert)
            env["TEMPORAL_TLS_CLIENT_KEY_PATH"] = str(client.key)
        return env

    async def logged(self, rpc: str, *, probe: str | None = None, status: int | None = None) -> list[str]:
        """Access-log lines of one WorkflowService call (only those carrying the ``x-mlc-probe``
        metadata ``probe``, if given), waiting up to 5 s for one with ``status``: nginx writes
        the line as the call ends, which can be just after the client has its answer."""
        lines: list[str] = []
        for _ in range(50):
            lines = [
                line
                for line in self.access_log.read_text().splitlines()
                if f"{RPC}{rpc} " in line and (probe is None or f"probe={probe}" in line)
            ]
            if any(status is None or f"{RPC}{rpc} {status} " in line for line in lines):
                break
            await asyncio.sleep(0.1)
        return lines


def _nginx() -> str:
    exe = shutil.which("nginx")
    if exe is None:
        missing("nginx is not installed, so mTLS to Temporal cannot be tested: apt-get install nginx-light")
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NGINX_CONF = """\
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format mtls '$request_uri $status verify=$ssl_client_verify dn="$ssl_client_s_dn" '
                    'probe=$http_x_mlc_probe';
    access_log {d}/access.log mtls;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {d}/localhost.pem;
        ssl_certificate_key {d}/localhost.key;
        ssl_client_certificate {d}/mlc-test-ca.pem;
        ssl_verify_client on;
        location / {{
            grpc_pass grpc://{upstream};
            grpc_read_timeout 300s;
            grpc_send_timeout 300s;
        }}
    }}
}}
"""


@pytest.fixture(scope="module")
def proxy(temporal_env: WorkflowEnvironment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """Certificates and a running nginx (foreground, stopped after the module's tests)."""
    exe = _nginx()
    d = tmp_path_factory.mktemp("mtls")
    ca = make_ca(d, "mlc-test-ca")
    issue(d, "localhost", ca, server=True)
    client = issue(d, CLIENT_CN, ca, server=False)
    foreign = issue(d, "mlc-foreign-worker", make_ca(d, "mlc-foreign-ca"), server=False)
    port = _free_port()
    upstream = temporal_env.client.service_client.config.target_host
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, port=port, upstream=upstream))
    cmd = [exe, "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf), "-g", "daemon off;"]
    checked = subprocess.run([*cmd, "-t"], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, f"nginx exited: {proc.stderr.read() if proc.stderr else ''}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not listen within 15 s"
                time.sleep(0.05)
        yield Proxy(
            address=f"127.0.0.1:{port}",
            ca=ca[0].cert,
            client=client,
            foreign_client=foreign,
            access_log=d / "access.log",
            error_log=d / "error.log",
        )
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful: finish logging, then exit
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No Temporal client settings from the outer environment, and no default profile file."""
    for name in [name for name in os.environ if name.startswith("TEMPORAL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return monkeypatch


# --- through the proxy ----------------------------------------------------------------


async def test_worker_and_client_run_a_workflow_over_mtls(
    proxy: Proxy, temporal_env: WorkflowEnvironment, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    probe = uuid.uuid4().hex  # sent as gRPC metadata, logged by nginx: marks this client's calls
    clean_env.setenv("TEMPORAL_ADDRESS", proxy.address)
    clean_env.setenv("TEMPORAL_GRPC_META_X_MLC_PROBE", probe)
    for name, value in proxy.tls_env(client=proxy.client).items():
        clean_env.setenv(name, value)
    settings = Settings.from_env(home=tmp_path / "home")

    client = await connect(settings)
    assert client.service_client.config.target_host == proxy.address
    tls = client.service_client.config.tls
    assert isinstance(tls, TLSConfig) and tls.domain == "localhost" and tls.client_cert

    queue = f"tls-{uuid.uuid4().hex[:8]}"
    workflow_id = f"tls-greeting-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=queue, workflows=[TlsGreeting], activities=[greet]):
        result = await client.execute_workflow(
            TlsGreeting.run,
            "mtls",
            id=workflow_id,
            task_queue=queue,
            execution_timeout=datetime.timedelta(seconds=60),
        )
    assert result == "hello mtls from TlsGreeting"

    # the same run, seen by the session's plain-text client straight at the dev server
    described = await temporal_env.client.get_workflow_handle(workflow_id).describe()
    assert described.status is WorkflowExecutionStatus.COMPLETED
    # every step went through nginx, each time with the verified client certificate (the
    # activity task comes back eagerly with RespondWorkflowTaskCompleted, not from a poll)
    for rpc in (
        "StartWorkflowExecution",
        "PollWorkflowTaskQueue",
        "RespondWorkflowTaskCompleted",
        "RespondActivityTaskCompleted",
    ):
        lines = await proxy.logged(rpc, probe=probe, status=200)
        assert lines, f"no {rpc} call of this client in the proxy's access log"
        assert any(" 200 verify=SUCCESS " in line for line in lines), lines  # polls cut at shutdown: 499
        assert all(f'verify=SUCCESS dn="CN={CLIENT_CN},' in line for line in lines), lines


async def test_profile_file_selects_the_mtls_proxy(
    proxy: Proxy, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    probe = uuid.uuid4().hex
    config = tmp_path / "temporal.toml"
    config.write_text(
        f"""
[profile.team]
address = "{proxy.address}"
namespace = "default"

[profile.team.tls]
server_name = "localhost"
server_ca_cert_path = "{proxy.ca}"
client_cert_path = "{proxy.client.cert}"
client_key_path = "{proxy.client.key}"

[profile.team.grpc_meta]
x-mlc-probe = "{probe}"
"""
    )
    clean_env.setenv("TEMPORAL_CONFIG_FILE", str(config))
    clean_env.setenv("TEMPORAL_PROFILE", "team")
    settings = Settings.from_env(home=tmp_path / "home")
    assert settings.temporal_address == "127.0.0.1:7233", (
        "TEMPORAL_ADDRESS unset: the profile's address applies"
    )

    client = await connect(settings)
    assert client.service_client.config.target_host == proxy.address
    await client.count_workflows("WorkflowType = 'TlsGreeting'")
    lines = await proxy.logged("CountWorkflowExecutions", probe=probe, status=200)
    assert any(f"{RPC}CountWorkflowExecutions 200 verify=SUCCESS" in line for line in lines), lines


async def test_the_mlc_worker_command_polls_through_mtls(
    proxy: Proxy, temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    runtime = f"tls-{uuid.uuid4().hex[:8]}"
    probe = uuid.uuid4().hex  # sent as gRPC metadata, logged by nginx: marks this process's calls
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPORAL_") and k != "MLC_DATABASE_URL"}
    env |= {
        "TEMPORAL_ADDRESS": proxy.address,
        "TEMPORAL_GRPC_META_X_MLC_PROBE": probe,
        "MLC_HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        **proxy.tls_env(client=proxy.client),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mlc",
        "worker",
        "--runtime",
        runtime,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        request = DescribeTaskQueueRequest(
            namespace=temporal_env.client.namespace,
            task_queue=TaskQueue(name=f"runtime-{runtime}"),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
        )
        deadline = asyncio.get_running_loop().time() + 60
        pollers: list[str] = []
        while not pollers:  # the only poller of this fresh queue can be the subprocess
            assert proc.returncode is None, (await proc.communicate())[1].decode()
            assert asyncio.get_running_loop().time() < deadline, "the worker never polled its task queue"
            await asyncio.sleep(0.2)
            described = await temporal_env.client.workflow_service.describe_task_queue(request)
            pollers = [p.identity for p in described.pollers]
        assert len(pollers) == 1, pollers
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()
    assert f"serving runtime {runtime} on task queue runtime-{runtime}" in out.decode()
    # its connect and its long poll (cut by the shutdown) went through nginx with the client cert
    for rpc in ("GetSystemInfo", "PollActivityTaskQueue"):
        lines = await proxy.logged(rpc, probe=probe)
        assert lines and all(f'verify=SUCCESS dn="CN={CLIENT_CN},' in line for line in lines), rpc


def _environments() -> list[bytes]:
    """Every readable process environment of the host."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append((entry / "environ").read_bytes())
            except OSError:
                continue
    return found


async def test_the_sandboxed_lifecycle_worker_polls_through_mtls_without_the_key(
    proxy: Proxy, temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    """The launcher's bridge speaks mutual TLS for the sandbox: the worker inside polls
    through nginx with the client certificate, and no certificate or key enters it."""
    require_sandbox()
    queue = f"tls-{uuid.uuid4().hex[:8]}"
    probe = uuid.uuid4().hex  # sent as gRPC metadata by the worker inside, logged by nginx
    log = tmp_path / "lifecycle-worker.log"
    started = await start_lifecycle_worker(
        main_queue=queue,
        temporal_address=proxy.address,
        log_path=log,
        environ={**proxy.tls_env(client=proxy.client), "TEMPORAL_GRPC_META_X_MLC_PROBE": probe},
    )
    try:
        assert [p.name for p in started.bridge_dir.iterdir()] == ["temporal.sock"], "no key beside the socket"
        inside = [env for env in _environments() if f"MLC_TASK_QUEUE={queue}".encode() in env.split(b"\0")]
        assert inside and all(b"TEMPORAL_TLS" not in env for env in inside), "no TLS setting inside"
        request = DescribeTaskQueueRequest(
            namespace=temporal_env.client.namespace,
            task_queue=TaskQueue(name=f"{queue}-lifecycles"),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
        for _ in range(100):  # its long poll is open (nginx logs it once the stop ends it)
            if (await temporal_env.client.workflow_service.describe_task_queue(request)).pollers:
                break
            await asyncio.sleep(0.1)
    finally:
        await started.stop()
    assert f"lifecycle worker polling task queue {queue}-lifecycles" in log.read_text()
    for rpc in ("GetSystemInfo", "PollWorkflowTaskQueue"):  # the poll is logged once the stop cuts it
        lines = await proxy.logged(rpc, probe=probe)
        assert lines and all(f'verify=SUCCESS dn="CN={CLIENT_CN},' in line for line in lines), (rpc, lines)


@pytest.mark.parametrize("which", ["no client certificate", "a certificate from another CA"])
async def test_a_client_without_a_trusted_certificate_is_refused(
    proxy: Proxy, clean_env: pytest.MonkeyPatch, tmp_path: Path, which: str
) -> None:
    clean_env.setenv("TEMPORAL_ADDRESS", proxy.address)
    client = proxy.foreign_client if which == "a certificate from another CA" else None
    for name, value in proxy.tls_env(client=client).items():
        clean_env.setenv(name, value)
    errors_before = proxy.error_log.read_text()

    with pytest.raises(RuntimeUnavailableError) as refused:
        await connect(Settings.from_env(home=tmp_path / "home"))

    message = str(refused.value)
    assert message.startswith(f"cannot reach Temporal at {proxy.address}: "), message
    assert "TLS is on" in message and "TEMPORAL_TLS_*" in message, message
    new_errors = proxy.error_log.read_text()[len(errors_before) :]
    expected = "no required SSL certificate" if client is None else "client SSL certificate verify error"
    assert expected in new_errors, new_errors


# --- which settings apply (no server needed) -----------------------------------------


def test_settings_address_wins_and_env_tls_applies(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("TEMPORAL_TLS_SERVER_NAME", "temporal.example")
    clean_env.setenv("TEMPORAL_API_KEY", "secret")
    settings = Settings(
        home=tmp_path,
        database_url=None,
        temporal_address="127.0.0.9:7233",
        temporal_namespace="ns",
        task_queue="q",
    )
    options = connect_options(settings)
    assert options["target_host"] == "127.0.0.9:7233" and options["namespace"] == "ns"
    assert options["api_key"] == "secret"
    assert isinstance(options["tls"], TLSConfig) and options["tls"].domain == "temporal.example"


def test_no_settings_means_a_plain_connection(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    options = connect_options(Settings.from_env(home=tmp_path))
    assert options == {"target_host": "127.0.0.1:7233", "namespace": "default"}


def test_the_default_profile_file_is_read_only_when_asked_for(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    default_file = tmp_path / "xdg" / "temporalio" / "temporal.toml"
    default_file.parent.mkdir(parents=True)
    default_file.write_text(
        '[profile.default]\naddress = "cloud.example:7233"\nnamespace = "team"\napi_key = "k"\n'
    )
    assert connect_options(Settings.from_env(home=tmp_path)) == {
        "target_host": "127.0.0.1:7233",
        "namespace": "default",
    }, "a Temporal CLI profile must not redirect mlc on its own"

    clean_env.setenv("TEMPORAL_PROFILE", "default")
    options = connect_options(Settings.from_env(home=tmp_path))
    assert (options["target_host"], options["namespace"], options["api_key"]) == (
        "cloud.example:7233",
        "team",
        "k",
    )

    clean_env.setenv("TEMPORAL_ADDRESS", "127.0.0.1:17233")  # the variables override the file
    assert connect_options(Settings.from_env(home=tmp_path))["target_host"] == "127.0.0.1:17233"


def test_unreadable_settings_are_readable_errors(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("TEMPORAL_PROFILE", "nope")
    with pytest.raises(
        RuntimeUnavailableError, match="invalid Temporal client configuration.*TEMPORAL_PROFILE=nope"
    ):
        connect_options(Settings.from_env(home=tmp_path))
    clean_env.delenv("TEMPORAL_PROFILE")
    clean_env.setenv("TEMPORAL_TLS_CLIENT_CERT_PATH", str(tmp_path / "missing.pem"))
    with pytest.raises(RuntimeUnavailableError, match="cannot read a TLS file.*missing.pem"):
        connect_options(Settings.from_env(home=tmp_path))


async def test_plain_ignores_tls_settings(
    temporal_env: WorkflowEnvironment, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.setenv("TEMPORAL_TLS_CLIENT_CERT_PATH", str(tmp_path / "missing.pem"))
    settings = Settings(
        home=tmp_path,
        database_url=None,
        temporal_address=temporal_env.client.service_client.config.target_host,
        temporal_namespace=temporal_env.client.namespace,
        task_queue="q",
    )
    client = await connect(settings, plain=True, identity="mlc-dev-embedded")
    assert client.identity == "mlc-dev-embedded"
    assert client.service_client.config.tls is None or client.service_client.config.tls is False


# --- mlc dev's own Temporal: closed to everything but its certificate --------------------


def _root_only(what: str) -> None:
    if not isolation.isolating():
        missing(f"{what} needs root (a network namespace, another user)")


NOBODY = isolation.ModelUser(65534, 65534)
"""``nobody``/``nogroup``: the account every local service falls back to."""


def _as_stranger(action: Callable[[], object], user: isolation.ModelUser | None = None) -> str:
    """Run ``action`` in a child as another local user (a model's by default, groups
    cleared); what happened, in a word."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            isolation.drop_privileges(
                user or isolation.ModelUser(isolation.UID_RANGE[0] + 11, isolation.UID_RANGE[0] + 11)
            )
            action()
            outcome = "reached"
        except Exception as exc:  # noqa: BLE001 - the outcome is the test's subject
            outcome = type(exc).__name__
        os.write(write, outcome.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as out:
        return out.read()


def _nginx_workers() -> list[int]:
    """Pids of every nginx worker process of the host."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"nginx: worker"):
                found.append(int(entry.name))
    return found


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _ids(pid: int) -> tuple[int, int]:
    """Effective uid and gid of ``pid``."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["Uid"].split()[1]), int(status["Gid"].split()[1])


async def _ui(http: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """A Web UI API call, retried while the UI server's own connection to the frontend is
    still in its first backoff (it dials at start, before the frontend listens)."""
    for _ in range(60):
        response = await http.request(method, url, **kwargs)
        if response.status_code != 503:
            return response
        await asyncio.sleep(0.5)
    return response


async def test_mlc_dev_temporal_takes_only_its_client_certificate(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """As root, ``mlc dev``'s dev server runs in a network namespace of its own: the host's
    loopback has only the mutual-TLS proxy and the Web UI (behind a password) on its ports;
    the CLI and workers find the client certificate through ``dev.json``; the Web UI still
    starts lifecycles; no other local user reaches the sockets behind the proxy."""
    _root_only("closing mlc dev's Temporal")
    _nginx()
    home = tmp_path / "home"
    stack = DevStack(Settings.from_env(home=home), temporal_port=_free_port(), ui_port=_free_port())
    ready = await stack.start()
    try:
        address, ui = ready.temporal_address, f"http://127.0.0.1:{stack.ui_port}"
        assert ready.temporal_tls is not None and address == f"127.0.0.1:{stack.temporal_port}"
        tls_dir = home / dev_temporal.TLS_DIR
        assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in tls_dir.iterdir()), list(
            tls_dir.iterdir()
        )

        # the CLI (any `mlc` command) finds the certificate while mlc dev runs
        found = discover(Settings.from_env(home=home))
        assert found.temporal_tls == ready.temporal_tls and found.temporal_address == address
        cli = await connect(found)
        workflow_id = f"mtls-{uuid.uuid4().hex[:8]}"
        await cli.start_workflow("TlsGreeting", "x", id=workflow_id, task_queue=f"q-{uuid.uuid4().hex[:6]}")

        # the dev server itself is in a network namespace of its own: its ports on the host
        # are nginx's, which takes TLS with the home's client certificate only
        temporal_pid = read_state(home)["temporal"]["pid"]
        assert dev_temporal.in_own_network(temporal_pid)
        with pytest.raises(RuntimeUnavailableError):
            await connect(replace(ready, temporal_tls=None), plain=True)  # plain text
        for name, value in {
            "TEMPORAL_ADDRESS": address,
            "TEMPORAL_TLS_SERVER_CA_CERT_PATH": str(ready.temporal_tls.ca),
            "TEMPORAL_TLS_SERVER_NAME": "localhost",
        }.items():
            clean_env.setenv(name, value)
        with pytest.raises(RuntimeUnavailableError, match="TLS is on"):  # TLS, no client certificate
            await connect(Settings.from_env(home=tmp_path / "elsewhere"))

        # another local user reaches neither the sockets behind the proxy nor the certificates
        sockets = Path(dev_temporal.isolation.read_own_file(home / dev_temporal.SOCKETS_RECORD) or "")
        assert (sockets / dev_temporal.GRPC_SOCKET).is_socket()
        proxy = isolation.service_user(home, "temporal-proxy")
        folder = sockets.stat()
        assert (folder.st_uid, folder.st_gid, stat.S_IMODE(folder.st_mode)) == (0, proxy.gid, 0o750)
        for target in (dev_temporal.GRPC_SOCKET, dev_temporal.UI_SOCKET):
            made = (sockets / target).stat()
            assert (made.st_gid, stat.S_IMODE(made.st_mode)) == (proxy.gid, 0o660), target
            for user in (None, NOBODY):  # nobody too: the proxy's workers are not nobody
                reached = _as_stranger(
                    lambda t=target: socket.socket(socket.AF_UNIX).connect(str(sockets / t)), user
                )
                assert reached == "PermissionError", (target, user, reached)
        workers = [pid for pid in _nginx_workers() if str(home) in processes.command_line(_parent(pid))]
        assert len(workers) == 2 and all(_ids(pid) == (proxy.uid, proxy.gid) for pid in workers), workers
        assert _as_stranger(lambda: ready.temporal_tls.key.read_bytes()) == "PermissionError"  # type: ignore[union-attr]

        # people: the Web UI asks for its password, then reaches the server and starts a lifecycle
        password = (tls_dir / "ui-password").read_text().strip()
        async with httpx.AsyncClient(trust_env=False) as http:
            assert (await http.get(f"{ui}/")).status_code == 401
            assert (await http.get(f"{ui}/", auth=("mlc", "wrong"))).status_code == 401
        async with httpx.AsyncClient(trust_env=False, auth=("mlc", password)) as http:
            page = await http.get(f"{ui}/")
            assert page.status_code == 200 and "<html" in page.text.lower()
            listed = await _ui(http, "GET", f"{ui}/api/v1/namespaces/default/workflows/{workflow_id}")
            assert listed.status_code == 200 and workflow_id in listed.text, listed.text[:300]
            started_id = f"ui-{uuid.uuid4().hex[:8]}"
            payload = {"metadata": {"encoding": base64.b64encode(b"json/plain").decode()},
                       "data": base64.b64encode(b'{"model": "cc-fraud", "version": 1}').decode()}  # fmt: skip
            started = await _ui(
                http,
                "POST",
                f"{ui}/api/v1/namespaces/default/workflows/{started_id}",
                json={
                    "workflowId": started_id,
                    "workflowType": {"name": "ModelLifecycle"},
                    "taskQueue": {"name": "mlc"},
                    "input": {"payloads": [payload]},
                },  # fmt: skip
                headers={"X-CSRF-TOKEN": http.cookies.get("_csrf") or ""},
            )
            assert started.status_code == 200, started.text[:300]
        described = await cli.get_workflow_handle(started_id).describe()
        assert (described.workflow_type, described.task_queue) == ("ModelLifecycle", "mlc")
    finally:
        stack.stop()
    assert not processes.alive(temporal_pid)
    assert leftover_processes(str(home)) == [], "the proxies stop with the stack"
    assert not sockets.exists(), "and their sockets folder goes with them"
