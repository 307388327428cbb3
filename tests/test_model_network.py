"""Model code reaches nothing of the host's network: a hostile package deployed in DEV next
to a PROD deployment behind its gateway, on the real stack (Temporal, PostgreSQL, nginx).

The model tries to connect to and bind every loopback port it is told of (Temporal's,
PostgreSQL's, the gateway's, a port the test listens on, a free one) and scans every port,
and tries PROD's socket and the gateway's sockets and links, in its shared DEV host and as
a batch job. No connection succeeds; a bind takes a port of the model's own namespace
only, so the host's port stays free; PROD's stable endpoint keeps answering with PROD's
model; and the gateway refuses a socket that is not the deployment's user's.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from activities.runtimes import gateway, registry
from activities.runtimes.base import (
    BatchJobRequest,
    CleanupRequest,
    OnlineDeployRequest,
    StreamingDeployRequest,
)
from activities.runtimes.local.driver import LocalDriver
from mlc import endpoints, isolation
from mlc.artifacts import ArtifactStore, build_archive
from mlc.config import Settings
from mlc.domain import HostingMode, ModelNetwork, ModelSnapshot, Runtime, TrafficRoute
from mlc.errors import DeploymentFailedError
from mlc.manifest import load_manifest
from tests.conftest import Stack, call_model, gateway_settings, missing
from tests.streaming_helpers import produce, read_topic, streaming_runtime
from tests.test_streaming import STREAM_MODEL

MANIFEST = """\
name: {name}
service_tags: [network]
requirements: []
evaluation:
  path: data/eval.jsonl
  label: y
  score_field: p
"""

HOSTILE = """\
import errno
import os
import socket

KEEP = []


def tcp(port, how):
    sock = socket.socket()
    sock.settimeout(0.5)
    try:
        if how == "bind":
            sock.bind(("127.0.0.1", port))
            sock.listen()
            KEEP.append(sock)  # held for as long as the model lives
            return "BOUND"
        sock.connect(("127.0.0.1", port))
        sock.close()
        return "CONNECTED"
    except OSError as exc:
        sock.close()
        return "refused " + errno.errorcode.get(exc.errno, str(exc.errno))


def unix(path):
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(0.5)
    try:
        sock.connect(path)
        return "CONNECTED"
    except OSError as exc:
        return "refused " + errno.errorcode.get(exc.errno, str(exc.errno))
    finally:
        sock.close()


def score(record):
    found = {}
    for port in record.get("ports", []):
        found[f"connect {port}"] = tcp(port, "connect")
        found[f"bind {port}"] = tcp(port, "bind")
    for path in record.get("sockets", []):
        found[f"unix {path}"] = unix(path)
    scan = [p for p in range(1, 65536) if tcp(p, "connect") == "CONNECTED"] if record.get("scan") else []
    return {"p": 0.5, "found": found, "scan": scan, "net": os.readlink("/proc/self/ns/net")}
"""


@pytest.fixture
def as_root() -> None:
    if isolation.isolating():
        return
    missing("model processes get a network namespace of their own only when the worker runs as root")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def listener() -> Iterator[int]:
    """A port the test listens on, on the host's loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
async def prod(stack: Stack, as_root: None) -> AsyncIterator[tuple[LocalDriver, Runtime, str]]:
    """A PROD deployment behind its runtime's gateway; yields the driver, runtime, endpoint."""
    settings = stack.settings
    runtime = Runtime(
        name="local-prod", stage="PROD", hosting=HostingMode.DEDICATED, gateway=gateway_settings()
    )
    driver = LocalDriver(settings)
    victim = snapshot_of(settings, write_package(settings.home.parent / "victim", "victim", VICTIM))
    request = OnlineDeployRequest(deployment_id="prod-victim", snapshot=victim, runtime=runtime, stage="PROD")
    try:
        result = await driver.deploy_online(request, lambda note: None)
        routes = (TrafficRoute(deployment_id="prod-victim", version=1),)
        await gateway.route(driver, runtime, "victim", routes, lambda note: None)
        yield driver, runtime, result.endpoint
    finally:
        await driver.cleanup(CleanupRequest(runtime=runtime))
        await registry.remove_gateway(settings, runtime)


VICTIM = "def score(record):\n    return {'p': 1.0, 'who': 'prod'}\n"


def write_package(root: Path, name: str, score: str) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "data" / "eval.jsonl").write_text('{"x": 1, "y": 1}\n{"x": 2, "y": 0}\n')
    (root / "score.py").write_text(score)
    (root / "manifest.yaml").write_text(MANIFEST.format(name=name))
    return root


def snapshot_of(settings: Settings, package: Path) -> ModelSnapshot:
    manifest = load_manifest(package)
    return ModelSnapshot(
        model=manifest.name,
        version=1,
        sha256=ArtifactStore(settings.artifact_dir).put(build_archive(package)),
        service_tags=manifest.service_tags,
        entry_module=manifest.entry_module,
    )


def port_of(address: str) -> int | None:
    """The TCP port of a ``host:port`` or URL, None without one (a unix socket)."""
    parts = urlsplit(address if "//" in address else f"tcp://{address}")
    return parts.port


def assert_reaches_nothing(answer: dict[str, object], targets: list[str]) -> None:
    found = answer["found"]
    assert isinstance(found, dict) and set(found) == set(targets), found
    # A bind succeeds only in the model's own namespace, on its own loopback, which no one
    # else reaches: the host's port stays free (checked by the caller).
    tried = {k: v for k, v in found.items() if not k.startswith("bind ")}
    assert all(str(v).startswith("refused") for v in tried.values()), tried
    assert answer["scan"] == [], "no port of any address is reachable"
    assert answer["net"] != os.readlink("/proc/self/ns/net"), "a network namespace of its own"


async def test_a_hostile_model_in_dev_reaches_no_port_and_no_other_model(
    stack: Stack, prod: tuple[LocalDriver, Runtime, str], listener: int, tmp_path: Path
) -> None:
    driver, prod_runtime, prod_endpoint = prod
    gateway_config = prod_runtime.gateway
    assert gateway_config is not None
    local_gateway = registry.gateway_for(stack.settings, prod_runtime)
    run_folder = Path(local_gateway.paths.run)
    free = free_port()
    ports = [
        p
        for p in (
            port_of(stack.settings.temporal_address),
            port_of(stack.settings.database_url or ""),
            gateway_config.port,
            listener,
            free,
        )
        if p is not None
    ]
    prod_socket = endpoints.parse(prod_endpoint).socket
    assert prod_socket is not None
    sockets = [str(prod_socket), *map(str, run_folder.rglob("*.sock"))]
    assert len(sockets) >= 3, "PROD's socket, the gateway's tier socket and its link to PROD"
    record = {"ports": ports, "sockets": sockets, "scan": True}
    targets = [f"{how} {p}" for p in ports for how in ("connect", "bind")] + [f"unix {s}" for s in sockets]

    hostile = snapshot_of(stack.settings, write_package(tmp_path / "hostile", "hostile", HOSTILE))
    dev = Runtime(name="local-dev", stage="DEV")  # shares one host: the default below PROD
    try:
        deployed = await driver.deploy_online(
            OnlineDeployRequest(deployment_id="hostile", snapshot=hostile, runtime=dev, stage="DEV"),
            lambda note: None,
        )
        assert deployed.endpoint.startswith("unix:") and deployed.endpoint.endswith("/models/hostile")
        answer = (await call_model(deployed.endpoint, "/score", json=record, timeout=60)).json()
        assert_reaches_nothing(answer, targets)
        with socket.socket() as sock:  # the host's port was never taken: the model still runs
            sock.bind(("127.0.0.1", free))

        batch_input = tmp_path / "in.jsonl"
        batch_input.write_text(json.dumps({**record, "scan": False}) + "\n")
        batch_input.chmod(0o644)
        job = await driver.run_batch(
            BatchJobRequest(
                deployment_id="hostile-batch",
                snapshot=hostile,
                runtime=dev,
                stage="DEV",
                input_path=str(batch_input),
            ),
            lambda note: None,
        )
        [output] = [json.loads(line) for line in Path(job.output_path).read_text().splitlines()]
        assert_reaches_nothing({**output, "scan": []}, targets)
    finally:
        await driver.cleanup(CleanupRequest(runtime=dev))

    async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
        answer = await http.post(f"{gateway_config.endpoint('victim')}/score", json={"x": 1})
    assert answer.status_code == 200 and answer.json()["who"] == "prod", "PROD still answers PROD"
    assert stat.S_IMODE(os.stat(prod_socket.parent).st_mode) == 0o700


async def test_the_gateway_refuses_a_socket_that_is_not_the_deployments_user(
    stack: Stack, prod: tuple[LocalDriver, Runtime, str]
) -> None:
    driver, runtime, endpoint = prod
    prod_socket = endpoints.parse(endpoint).socket
    assert prod_socket is not None
    assert await driver.locate(runtime, "prod-victim") == endpoint
    owner = os.stat(prod_socket.parent).st_uid
    os.chown(prod_socket, owner + 1, owner + 1, follow_symlinks=False)  # as if another user bound it
    try:
        with pytest.raises(DeploymentFailedError, match="refusing to send it traffic"):
            await driver.locate(runtime, "prod-victim")
        routes = (TrafficRoute(deployment_id="prod-victim", version=1),)
        with pytest.raises(DeploymentFailedError, match="not to the deployment's user"):
            await gateway.route(driver, runtime, "victim", routes, lambda note: None)
        with pytest.raises(DeploymentFailedError, match="not to the deployment's user"):
            async with endpoints.connect(endpoint, timeout=5, owner=owner):
                pass
    finally:
        os.chown(prod_socket, owner, owner, follow_symlinks=False)
    assert (await call_model(endpoint, "/health")).status_code == 200


async def test_outbound_network_never_reaches_the_host_itself(
    stack: Stack, as_root: None, listener: int, tmp_path: Path
) -> None:
    """``model_network: outbound`` (a runtime setting in its signed record): the model shares
    the host's network to reach other hosts, but every connection to the host itself is
    refused, and the firewall rule goes with the deployment."""
    driver = LocalDriver(stack.settings)
    runtime = await stack.add_runtime(
        Runtime(
            name="local-out", stage="DEV", hosting=HostingMode.DEDICATED, model_network=ModelNetwork.OUTBOUND
        )
    )
    listed = await stack.mlc("runtime", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {r["name"]: r["model_network"] for r in json.loads(listed.stdout)}["local-out"] == "outbound"
    hostile = snapshot_of(stack.settings, write_package(tmp_path / "hostile", "hostile", HOSTILE))
    ports = [listener, p] if (p := port_of(stack.settings.temporal_address)) else [listener]
    try:
        deployed = await driver.deploy_online(
            OnlineDeployRequest(deployment_id="outbound", snapshot=hostile, runtime=runtime, stage="DEV"),
            lambda note: None,
        )
        answer = (await call_model(deployed.endpoint, "/score", json={"ports": ports})).json()
        assert answer["net"] == os.readlink("/proc/self/ns/net"), "the host's network"
        connects = {k: v for k, v in answer["found"].items() if k.startswith("connect ")}
        assert connects and all(v == "refused ECONNREFUSED" for v in connects.values()), connects
        uid = os.stat(driver.workdir(runtime, "outbound")).st_uid
        assert str(uid) in rules_of_the_host()
    finally:
        await driver.cleanup(CleanupRequest(runtime=runtime))
    assert str(uid) not in rules_of_the_host(), "the rule goes with the deployment"


def rules_of_the_host() -> str:
    return "".join(
        subprocess.run([tool, "-S", "OUTPUT"], capture_output=True, text=True, check=True).stdout
        for tool in isolation.FIREWALLS
    )


STREAM_SCORE = """\
import os
import socket


def score(record):
    return score_batch([record])[0]


def score_batch(records):
    port = int(open(os.path.join(os.path.dirname(__file__), "broker-port")).read())
    sock = socket.socket()
    sock.settimeout(0.5)
    try:
        sock.connect(("127.0.0.1", port))
        reach = "CONNECTED"
    except OSError as exc:
        reach = "refused " + type(exc).__name__
    finally:
        sock.close()
    return [{"id": r["id"], "y": 2.0 * r["x"], "reach": reach, "pid": os.getpid()} for r in records]
"""


async def test_a_streaming_models_code_is_off_the_network_while_its_consumer_reads_kafka(
    stack: Stack, as_root: None, kafka_broker: str, tmp_path: Path
) -> None:
    """The consumer talks to the broker; the model's code (scoring in the deployment's own
    server) cannot reach it, nor anything else of the host's network."""
    package = tmp_path / "stream-hostile"
    shutil.copytree(STREAM_MODEL, package)
    (package / "score.py").write_text(STREAM_SCORE)
    (package / "broker-port").write_text(str(port_of(kafka_broker)))
    driver = LocalDriver(stack.settings)
    runtime = streaming_runtime(kafka_broker, name="local-stream-net")
    kafka = runtime.kafka
    assert kafka is not None
    snapshot = snapshot_of(stack.settings, package)
    try:
        result = await driver.deploy_streaming(
            StreamingDeployRequest(
                deployment_id="stream-net", snapshot=snapshot, runtime=runtime, stage="UAT"
            ),
            lambda note: None,
        )
        await asyncio.to_thread(produce, kafka_broker, kafka.input_topic, [("k1", {"id": 1, "x": 2.0})])
        [output] = await asyncio.to_thread(read_topic, kafka_broker, kafka.output_topic, until=1)
        assert output.value["y"] == 4.0 and output.value["reach"] == "refused OSError", output.value
        scorer = int(output.value["pid"])
        [consumer] = result.details["pids"]
        host = os.readlink("/proc/self/ns/net")
        assert os.readlink(f"/proc/{scorer}/ns/net") != host, "model code: a namespace of its own"
        assert os.readlink(f"/proc/{consumer}/ns/net") == host, "the consumer reaches the broker"
        assert Path(f"/proc/{consumer}/environ").stat().st_uid == 0, "not dumpable: its /proc is root's"
    finally:
        await driver.cleanup(CleanupRequest(runtime=runtime))
