"""Runtime gateways with a real nginx and real model servers: stable endpoints, switches
under load without a failed request, weighted splits, shadows, errors, 503 and restarts.

The docker tests need dockerd and the base image (``scripts/docker-engine.sh``); without
them they are skipped locally and fail under ``CI=true``, like the other docker tests.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import socket
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.runtime import RuntimeActivities
from activities.runtimes.base import CleanupRequest, OnlineDeployRequest, RuntimeDriver
from activities.runtimes.docker.driver import DockerDriver
from activities.runtimes.docker.gateway import DockerGateway
from activities.runtimes.gateway import gateway_root, routing
from activities.runtimes.gateway.nginx import (
    DEPLOYMENT_HEADER,
    Backend,
    compare,
    endpoint_parts,
    render_model,
)
from activities.runtimes.local.driver import LocalDriver
from activities.runtimes.local.gateway import LocalGateway
from mlc import endpoints, isolation, processes
from mlc.artifacts import ArtifactStore, build_archive
from mlc.config import Settings
from mlc.contracts.runtime import RuntimeActionInput
from mlc.contracts.traffic import ObserveTrafficInput, RouteTrafficResult
from mlc.domain import (
    DockerSettings,
    GatewaySettings,
    HostingMode,
    Mode,
    ModelSnapshot,
    Runtime,
    RuntimeKind,
    TrafficRoute,
)
from mlc.errors import DeploymentFailedError, NotFoundError, RefusedError
from mlc.manifest import load_manifest
from mlc.serving.capture import AnswerCapture, read_answers
from mlc.trust import grants
from tests.conftest import missing

FIXTURES = Path(__file__).parent / "fixtures" / "models"
WEAK = FIXTURES / "weak-model"
FAILING = FIXTURES / "failing-model"
RECORD = {
    "amount": 2450.0,
    "hour": 3,
    "merchant_risk": 0.85,
    "distance_from_home": 4200.0,
    "foreign": True,
    "card_present": False,
    "velocity_24h": 9,
}
BASE_IMAGE = "mlc-python:3.11-bookworm"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _snapshot(settings: Settings, package: Path, version: int) -> ModelSnapshot:
    manifest = load_manifest(package)
    return ModelSnapshot(
        model=manifest.name,
        version=version,
        sha256=ArtifactStore(settings.artifact_dir).put(build_archive(package)),
        service_tags=manifest.service_tags,
        entry_module=manifest.entry_module,
        requirements=manifest.requirements,
    )


async def _deploy(driver: RuntimeDriver, runtime: Runtime, snapshot: ModelSnapshot) -> TrafficRoute:
    deployment_id = f"{snapshot.model}-v{snapshot.version}-{uuid.uuid4().hex[:8]}"
    await driver.deploy_online(
        OnlineDeployRequest(deployment_id=deployment_id, snapshot=snapshot, runtime=runtime, stage="DEV"),
        lambda _note: None,
    )
    return TrafficRoute(deployment_id=deployment_id, version=snapshot.version)


def _routes(*pairs: tuple[TrafficRoute, int], shadow: TrafficRoute | None = None) -> list[TrafficRoute]:
    routes = [r.model_copy(update={"weight": w}) for r, w in pairs]
    if shadow is not None:
        routes.append(shadow.model_copy(update={"weight": 0, "shadow": True}))
    return routes


class Load:
    """Concurrent clients scoring through an endpoint in a loop, counting every answer."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.clients = clients
        self.answers: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self) -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=30.0) as http:
            while not self._stop.is_set():
                try:
                    response = await http.post(self.url, json=RECORD)
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if response.status_code != 200:
                    self.failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
                else:
                    self.answers[response.headers.get(DEPLOYMENT_HEADER, "?")] += 1

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def total(self) -> int:
        """Answers so far."""
        return sum(self.answers.values())


async def _wait_for(load: Load, count: int) -> None:
    target = load.total() + count
    deadline = time.monotonic() + 30
    while load.total() < target and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


# --- local runtime --------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env(home=tmp_path / "home")


@pytest.fixture
def local_runtime() -> Runtime:
    return Runtime(
        name=f"gw-local-{uuid.uuid4().hex[:6]}", stage="DEV", gateway=GatewaySettings(port=_free_port())
    )


@pytest.fixture
async def local_driver(settings: Settings, local_runtime: Runtime) -> AsyncIterator[LocalDriver]:
    driver = LocalDriver(settings)
    yield driver
    await driver.cleanup(CleanupRequest(runtime=local_runtime))
    await LocalGateway(settings, local_runtime).stop()


async def test_local_switches_under_load_drop_no_request(
    settings: Settings, local_runtime: Runtime, local_driver: LocalDriver
) -> None:
    v1 = await _deploy(local_driver, local_runtime, _snapshot(settings, WEAK, 1))
    v2 = await _deploy(local_driver, local_runtime, _snapshot(settings, WEAK, 2))
    first = await local_driver.route(local_runtime, "weak-model", _routes((v1, 100)), lambda _n: None)
    assert first.endpoint == f"http://127.0.0.1:{local_runtime.gateway.port}/models/weak-model"  # type: ignore[union-attr]

    async with Load(f"{first.endpoint}/score") as load:
        await _wait_for(load, 50)
        for target in (v2, v1, v2, v1):
            result = await local_driver.route(
                local_runtime, "weak-model", _routes((target, 100)), lambda _n: None
            )
            assert result.endpoint == first.endpoint
            await _wait_for(load, 100)
            served = Counter(load.answers)
            await _wait_for(load, 50)
            assert load.answers[target.deployment_id] - served[target.deployment_id] >= 50, load.answers
    assert load.failures == [], load.failures[:5]
    assert load.answers[v1.deployment_id] > 0 and load.answers[v2.deployment_id] > 0

    # the model server sees the path without the prefix, and health goes through too
    async with httpx.AsyncClient(trust_env=False) as http:
        health = await http.get(f"{first.endpoint}/health")
        assert health.status_code == 200 and health.json()["version"] == "1"
        unknown = await http.get(f"http://127.0.0.1:{local_runtime.gateway.port}/models/nope/score")  # type: ignore[union-attr]
        assert unknown.status_code == 404


async def test_changes_of_one_endpoint_at_once_are_applied_once_newest_first(
    settings: Settings, local_runtime: Runtime, local_driver: LocalDriver
) -> None:
    """Twelve changes of one endpoint at once (decided in another order than they arrive):
    one reload applies the newest decision; the others succeed, superseded by it; a change
    decided before what the gateway holds changes nothing, a newer one is applied."""
    v1 = await _deploy(local_driver, local_runtime, _snapshot(settings, WEAK, 1))
    v2 = await _deploy(local_driver, local_runtime, _snapshot(settings, WEAK, 2))
    v3 = await _deploy(local_driver, local_runtime, _snapshot(settings, WEAK, 3))
    base = datetime.now(UTC) - timedelta(minutes=1)
    decided = [base + timedelta(seconds=s) for s in (5, 2, 11, 0, 7, 3, 9, 1, 10, 4, 8, 6)]
    targets = [(v1, v2, v3)[i % 3] for i in range(len(decided))]
    results = await asyncio.gather(*(
        local_driver.route(local_runtime, "weak-model", _routes((t, 100)), lambda _n: None, as_of=at)
        for t, at in zip(targets, decided, strict=True)
    ))  # fmt: skip
    newest = decided.index(max(decided))
    assert len({r.details["generation"] for r in results}) == 1, "one reload for all of them"
    assert "superseded_by" not in results[newest].details
    for i, result in enumerate(results):
        if i != newest:
            assert result.details["superseded_by"] == {
                "decided": max(decided).isoformat(),
                "shares": f"v{targets[newest].version} 100%",
            }
    async with httpx.AsyncClient(trust_env=False) as http:
        answer = await http.get(f"{results[0].endpoint}/health")
        assert answer.json()["version"] == str(targets[newest].version)

        late = await local_driver.route(
            local_runtime, "weak-model", _routes((v1, 100)), lambda _n: None, as_of=base
        )
        assert late.details["superseded_by"]["decided"] == max(decided).isoformat()
        assert (await http.get(f"{results[0].endpoint}/health")).json()["version"] == str(
            targets[newest].version
        ), "an older decision arriving late changes nothing"
        fresh = await local_driver.route(local_runtime, "weak-model", _routes((v1, 100)), lambda _n: None)
        assert "superseded_by" not in fresh.details
        assert (await http.get(f"{results[0].endpoint}/health")).json()["version"] == "1"


async def test_a_model_off_its_socket_fails_only_its_own_change(
    settings: Settings, local_runtime: Runtime, local_driver: LocalDriver
) -> None:
    """A model can remove its own socket. Its change, the newest of a turn, then fails
    alone: the older change waiting in the same turn (a rollback, another version's
    promotion) is applied, not failed with an error about someone else's deployment."""
    runtime = local_runtime.model_copy(update={"hosting": HostingMode.DEDICATED})  # a socket each
    v1 = await _deploy(local_driver, runtime, _snapshot(settings, WEAK, 1))
    v2 = await _deploy(local_driver, runtime, _snapshot(settings, WEAK, 2))
    v2_socket = endpoints.parse(await local_driver.locate(runtime, v2.deployment_id)).socket
    assert v2_socket is not None
    v2_socket.unlink()  # what v2's own code may do: it runs as the deployment's user
    base = datetime.now(UTC)
    older, newer = await asyncio.gather(
        local_driver.route(local_runtime, "weak-model", _routes((v1, 100)), lambda _n: None, as_of=base),
        local_driver.route(
            local_runtime,
            "weak-model",
            _routes((v2, 100)),
            lambda _n: None,
            as_of=base + timedelta(seconds=1),
        ),
        return_exceptions=True,
    )
    assert isinstance(newer, DeploymentFailedError), newer
    assert isinstance(older, RouteTrafficResult), older
    assert "superseded_by" not in older.details
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.get(f"{older.endpoint}/health")).json()["version"] == "1"


async def test_a_change_waiting_its_turn_heartbeats(
    settings: Settings, local_runtime: Runtime, local_driver: LocalDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another change holds the gateway, a queued one keeps heartbeating (its activity
    is not cancelled for waiting) and is applied once the gateway is free."""
    monkeypatch.setattr(routing, "QUEUE_BEAT_SECONDS", 0.05)
    v1 = await _deploy(local_driver, local_runtime, _snapshot(settings, WEAK, 1))
    beats: list[str] = []
    gateway = local_driver.gateway(local_runtime)
    async with gateway.locked():
        queued = asyncio.create_task(
            local_driver.route(local_runtime, "weak-model", _routes((v1, 100)), beats.append)
        )
        await asyncio.sleep(0.5)
        assert not queued.done(), "it waits for the gateway"
        assert len(beats) >= 3 and all("waiting for the gateway" in b for b in beats), beats
    result = await asyncio.wait_for(queued, 60)
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.get(f"{result.endpoint}/health")).json()["version"] == "1"


async def test_local_weighted_split_and_observed_stats(
    settings: Settings, local_runtime: Runtime, local_driver: LocalDriver
) -> None:
    v1 = await _deploy(local_driver, local_runtime, _snapshot(settings, WEAK, 1))
    v2 = await _deploy(local_driver, local_runtime, _snapshot(settings, WEAK, 2))
    routes = _routes((v1, 80), (v2, 20))
    since = datetime.now(UTC) - timedelta(seconds=1)
    result = await local_driver.route(local_runtime, "weak-model", routes, lambda _n: None)
    answers: Counter[str] = Counter()
    async with httpx.AsyncClient(trust_env=False) as http:
        for _ in range(500):
            response = await http.post(f"{result.endpoint}/score", json=RECORD)
            assert response.status_code == 200
            answers[response.headers[DEPLOYMENT_HEADER]] += 1
    assert 60 <= answers[v2.deployment_id] <= 140, answers  # 20 % of 500 = 100

    observed = await local_driver.observe(
        local_runtime, "weak-model", routes, since, datetime.now(UTC) + timedelta(seconds=1)
    )
    stats = {s.deployment_id: s for s in observed.routes}
    assert stats[v1.deployment_id].requests == answers[v1.deployment_id]
    assert stats[v2.deployment_id].requests == answers[v2.deployment_id]
    assert stats[v2.deployment_id].errors == 0 and stats[v2.deployment_id].version == 2
    assert stats[v1.deployment_id].p50_ms is not None and stats[v1.deployment_id].p99_ms is not None
    assert observed.shadow is None


async def test_local_shadow_is_mirrored_and_compared(
    settings: Settings, local_runtime: Runtime, local_driver: LocalDriver
) -> None:
    v1 = await _deploy(local_driver, local_runtime, _snapshot(settings, WEAK, 1))
    v2 = await _deploy(local_driver, local_runtime, _snapshot(settings, WEAK, 2))
    routes = _routes((v1, 100), shadow=v2)
    since = datetime.now(UTC) - timedelta(seconds=1)
    result = await local_driver.route(local_runtime, "weak-model", routes, lambda _n: None)
    async with httpx.AsyncClient(trust_env=False) as http:
        for _ in range(40):
            response = await http.post(
                f"{result.endpoint}/score",
                json=RECORD,
                headers={"X-MLC-Capture": "", "X-Request-ID": "forged"},
            )
            assert response.status_code == 200 and response.headers[DEPLOYMENT_HEADER] == v1.deployment_id
    await asyncio.sleep(0.5)  # mirrored requests finish after the live ones
    observed = await local_driver.observe(
        local_runtime, "weak-model", routes, since, datetime.now(UTC) + timedelta(seconds=1)
    )
    stats = {s.deployment_id: s for s in observed.routes}
    assert stats[v1.deployment_id].requests == 40  # mirrored requests are not live traffic
    assert stats[v2.deployment_id].requests == 40  # ... but the shadow's own stats count them
    assert observed.shadow is not None
    assert observed.shadow.pairs == 40
    assert observed.shadow.agreement_rate == 1.0
    assert observed.shadow.max_abs_diff == 0.0
    assert observed.shadow.shadow_errors == 0


async def test_local_errors_no_routes_and_worker_restart(
    settings: Settings, local_runtime: Runtime, local_driver: LocalDriver
) -> None:
    bad = await _deploy(local_driver, local_runtime, _snapshot(settings, FAILING, 1))
    routes = _routes((bad, 100))
    since = datetime.now(UTC) - timedelta(seconds=1)
    result = await local_driver.route(local_runtime, "failing-model", routes, lambda _n: None)
    async with httpx.AsyncClient(trust_env=False) as http:
        for _ in range(10):
            assert (await http.post(f"{result.endpoint}/score", json={"amount": 1.0})).status_code == 500
    observed = await local_driver.observe(
        local_runtime, "failing-model", routes, since, datetime.now(UTC) + timedelta(seconds=1)
    )
    assert observed.routes[0].requests == 10 and observed.routes[0].errors == 10
    assert observed.routes[0].error_rate == 1.0

    # no answering route: 503 with a message naming the model
    await local_driver.route(local_runtime, "failing-model", [], lambda _n: None)
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.post(f"{result.endpoint}/score", json={"amount": 1.0})
    assert response.status_code == 503
    assert "failing-model" in response.json()["error"]

    # a new driver (a restarted worker) finds the running gateway and keeps it
    gateway = LocalGateway(settings, local_runtime)
    pid = gateway.details()["pid"]
    assert pid is not None and processes.alive(pid)
    again = await LocalDriver(settings).route(local_runtime, "failing-model", routes, lambda _n: None)
    assert again.details["started"] is False and again.details["pid"] == pid
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.post(f"{result.endpoint}/score", json={"amount": 1.0})).status_code == 500

    # the runtime's cleanup leaves the gateway alone
    await local_driver.cleanup(CleanupRequest(runtime=local_runtime))
    assert processes.alive(pid)
    assert (gateway_root(settings, local_runtime) / "conf" / "nginx.conf").is_file()


async def test_a_squatted_scratch_name_changes_nothing(
    settings: Settings, local_runtime: Runtime, local_driver: LocalDriver
) -> None:
    """A local user making the gateway's old scratch folder ``/tmp/mlc-gateway-<key>`` first
    (its key is derived from a path a model can infer) neither blocks nor joins it: the
    scratch folder has a random name, recorded under the gateway's root-only folder."""
    if not isolation.isolating():
        missing("squatting as another user needs root")
    root = gateway_root(settings, local_runtime)
    old = Path(tempfile.gettempdir()) / f"mlc-gateway-{uuid.uuid5(uuid.NAMESPACE_URL, str(root)).hex[:12]}"
    stranger = isolation.ModelUser(isolation.UID_RANGE[0] + 9, isolation.UID_RANGE[0] + 9)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            isolation.drop_privileges(stranger)
            old.mkdir(mode=0o777)
            code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    try:
        v1 = await _deploy(local_driver, local_runtime, _snapshot(settings, WEAK, 1))
        result = await local_driver.route(local_runtime, "weak-model", _routes((v1, 100)), lambda _n: None)
        async with httpx.AsyncClient(trust_env=False) as http:
            assert (await http.post(f"{result.endpoint}/score", json=RECORD)).status_code == 200
        scratch = Path((root / "scratch").read_text())
        assert scratch != old and scratch.name.startswith("mlc-gateway-") and scratch.stat().st_uid == 0
        assert list(old.iterdir()) == [], "nothing of the gateway went into the squatted folder"
    finally:
        old.rmdir()


async def test_gateway_workers_have_a_user_of_their_own(
    settings: Settings, local_runtime: Runtime, local_driver: LocalDriver
) -> None:
    """As root, the gateway's nginx workers run as the installation's gateway user (not
    ``nobody``, not the Temporal proxy's group): ``nobody`` and models reach neither the
    links to model sockets in ``backends/`` nor the routing tier's socket."""
    if not isolation.isolating():
        missing("worker users need root")
    v1 = await _deploy(local_driver, local_runtime, _snapshot(settings, WEAK, 1))
    result = await local_driver.route(local_runtime, "weak-model", _routes((v1, 100)), lambda _n: None)
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.post(f"{result.endpoint}/score", json=RECORD)).status_code == 200
    user = isolation.service_user(settings.home, "gateway")
    assert user.gid != isolation.service_user(settings.home, "temporal-proxy").gid
    assert not isolation.in_range(user.uid) and user.uid != 65534
    masters = {result.details["pid"], result.details["routes_pid"]}
    workers = [p for p in _children_of(masters) if processes.command_line(p).startswith("nginx: worker")]
    assert len(workers) == 2 and all(_ids(p) == (user.uid, user.gid) for p in workers), workers
    scratch = Path((gateway_root(settings, local_runtime) / "scratch").read_text())
    (link,) = (scratch / "backends").glob("*.sock")
    for folder in (scratch, scratch / "backends"):
        info = folder.stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (0, user.gid, 0o710), folder
    for stranger in (
        isolation.ModelUser(65534, 65534),
        isolation.ModelUser(*[isolation.UID_RANGE[0] + 12] * 2),
    ):
        for target in (link, scratch / "routes.sock"):
            assert _connect_as(stranger, target) == errno.EACCES, (stranger, target)


def _children_of(parents: set[int]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent in parents:
                found.append(int(entry.name))
    return found


def _ids(pid: int) -> tuple[int, int]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["Uid"].split()[1]), int(status["Gid"].split()[1])


def _connect_as(user: isolation.ModelUser, path: Path) -> int:
    """Connect to the unix socket ``path`` as ``user`` (groups cleared): 0 or the errno."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            isolation.drop_privileges(user)
            with socket.socket(socket.AF_UNIX) as sock:
                code = sock.connect_ex(str(path))
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


SQUATTER = """
import http.server, json, sys
class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # the live generation, and the key it was asked with as the "proof"
        key = self.path.rsplit("/", 1)[-1]
        body = json.dumps({"runtime": sys.argv[3], "generation": sys.argv[2], "proof": key}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_POST = do_GET
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Echo).serve_forever()
"""


async def test_a_port_held_by_another_program_is_never_the_gateway(
    settings: Settings, local_runtime: Runtime, local_driver: LocalDriver
) -> None:
    """``nobody`` listening on the gateway's port while it is down (knowing the live
    generation, echoing the status key) does not pass for the gateway: it shows as down,
    naming the holder, and routing fails saying so; once it is gone the gateway starts."""
    if not isolation.isolating():
        missing("a squatter of another user needs root")
    v1 = await _deploy(local_driver, local_runtime, _snapshot(settings, WEAK, 1))
    routes = _routes((v1, 100))
    await local_driver.route(local_runtime, "weak-model", routes, lambda _n: None)
    gateway = LocalGateway(settings, local_runtime)
    assert await gateway.health() is None
    generation = gateway.live_generation_file()
    assert generation is not None
    await gateway.stop()
    port = local_runtime.gateway.port  # type: ignore[union-attr]
    squatter = await asyncio.create_subprocess_exec(
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
        "/usr/bin/python3", "-c", SQUATTER, str(port), generation, local_runtime.name,
        cwd="/",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not _listening(port) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        held = f"port {port} of the gateway of runtime {local_runtime.name} is held by pid {squatter.pid} "
        held += "(python3, user nobody), not by the gateway"
        why = await gateway.health()
        assert why is not None and why.startswith(held), why
        started = time.monotonic()
        with pytest.raises(DeploymentFailedError, match=re.escape(held)):
            await local_driver.route(local_runtime, "weak-model", routes, lambda _n: None)
        assert time.monotonic() - started < 5, "refused at once, not after the start timeout"
    finally:
        squatter.kill()
        await squatter.wait()
    result = await local_driver.route(local_runtime, "weak-model", routes, lambda _n: None)
    assert result.details["started"] is True and await gateway.health() is None
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.post(f"{result.endpoint}/score", json=RECORD)).status_code == 200


async def test_refusals(settings: Settings, local_runtime: Runtime, local_driver: LocalDriver) -> None:
    plain = local_runtime.model_copy(update={"gateway": None})
    with pytest.raises(RefusedError, match="has no gateway"):
        await local_driver.route(plain, "weak-model", [], lambda _n: None)
    with pytest.raises(NotFoundError):
        await local_driver.route(
            local_runtime,
            "weak-model",
            [TrafficRoute(deployment_id="weak-model-v1-gone", version=1)],
            lambda _n: None,
        )
    with pytest.raises(RefusedError, match="sum to"):
        await local_driver.route(
            local_runtime,
            "weak-model",
            [TrafficRoute(deployment_id="weak-model-v1-a", version=1, weight=50)],
            lambda _n: None,
        )


def _grant(settings: Settings, runtime: Runtime, action: Any, routes: list[TrafficRoute]) -> Any:
    grant = grants.RuntimeGrant(
        action=action,
        deployment_id=routes[0].deployment_id,
        runtime=runtime,
        stage=runtime.stage,
        mode=Mode.ONLINE,
        model="weak-model",
        routes=tuple(routes),
        workflow_id="test",
        run_id="test-run",  # ActivityEnvironment's run
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    return grants.issue(grants.platform_key(settings.platform_key_path), grant)


async def test_activities_act_on_the_grant_only(
    settings: Settings, local_runtime: Runtime, local_driver: LocalDriver
) -> None:
    v1 = await _deploy(local_driver, local_runtime, _snapshot(settings, WEAK, 1))
    routes = _routes((v1, 100))
    activities = RuntimeActivities(settings)
    env = ActivityEnvironment()
    since = datetime.now(UTC) - timedelta(seconds=1)
    result = await env.run(
        activities.route_traffic,
        RuntimeActionInput(grant=_grant(settings, local_runtime, "route_traffic", routes)),
    )
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.post(f"{result.endpoint}/score", json=RECORD)).status_code == 200
    observed = await env.run(
        activities.observe_traffic,
        ObserveTrafficInput(
            grant=_grant(settings, local_runtime, "observe_traffic", routes),
            since=since,
            until=datetime.now(UTC) + timedelta(seconds=1),
        ),
    )
    assert observed.endpoint == result.endpoint and observed.routes[0].requests == 1
    with pytest.raises(ApplicationError, match="allows observe_traffic, not route_traffic"):
        await env.run(
            activities.route_traffic,
            RuntimeActionInput(grant=_grant(settings, local_runtime, "observe_traffic", routes)),
        )


# --- docker runtime -------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings.from_env(home=tmp_path_factory.mktemp("mlc-home"))


@pytest.fixture
def docker_runtime(docker_engine: Any) -> Iterator[Runtime]:
    runtime = Runtime(
        name=f"gw-docker-{uuid.uuid4().hex[:6]}",
        kind=RuntimeKind.DOCKER,
        stage="DEV",
        docker=DockerSettings(base_image=BASE_IMAGE, network_mode="host", memory="512m"),
        gateway=GatewaySettings(port=_free_port()),
    )
    yield runtime
    for container in docker_engine.containers.list(
        all=True, filters={"label": f"mlc.runtime={runtime.name}"}
    ):
        container.remove(force=True)
    for container in docker_engine.containers.list(
        all=True, filters={"label": f"{DockerGateway.LABEL}={runtime.name}"}
    ):
        container.remove(force=True)


async def test_docker_switches_under_load_and_shadow(
    docker_settings: Settings, docker_runtime: Runtime, docker_engine: Any
) -> None:
    driver = DockerDriver(docker_settings)
    v1 = await _deploy(driver, docker_runtime, _snapshot(docker_settings, WEAK, 1))
    v2 = await _deploy(driver, docker_runtime, _snapshot(docker_settings, WEAK, 2))
    first = await driver.route(docker_runtime, "weak-model", _routes((v1, 100)), lambda _n: None)
    gateway = docker_engine.containers.get(f"mlc-gateway-{docker_runtime.name}")
    assert gateway.attrs["Config"]["User"] == "65534:65534"
    assert gateway.attrs["HostConfig"]["ReadonlyRootfs"] is True

    async with Load(f"{first.endpoint}/score") as load:
        await _wait_for(load, 50)
        for target in (v2, v1, v2):
            result = await driver.route(docker_runtime, "weak-model", _routes((target, 100)), lambda _n: None)
            assert result.endpoint == first.endpoint
            await _wait_for(load, 100)
    assert load.failures == [], load.failures[:5]
    assert load.answers[v1.deployment_id] > 0 and load.answers[v2.deployment_id] > 0

    # shadow: v2 answers, v1 gets a mirrored copy; identical models agree
    routes = _routes((v2, 100), shadow=v1)
    since = datetime.now(UTC) - timedelta(seconds=1)
    result = await driver.route(docker_runtime, "weak-model", routes, lambda _n: None)
    async with httpx.AsyncClient(trust_env=False) as http:
        for _ in range(30):
            assert (await http.post(f"{result.endpoint}/score", json=RECORD)).status_code == 200
    await asyncio.sleep(0.5)
    observed = await driver.observe(
        docker_runtime, "weak-model", routes, since, datetime.now(UTC) + timedelta(seconds=1)
    )
    assert observed.shadow is not None and observed.shadow.pairs == 30
    assert observed.shadow.agreement_rate == 1.0

    # a new driver (worker restart) keeps the same container
    again = await DockerDriver(docker_settings).route(docker_runtime, "weak-model", routes, lambda _n: None)
    assert again.details["started"] is False
    assert docker_engine.containers.get(f"mlc-gateway-{docker_runtime.name}").id == gateway.id
    await driver.cleanup(CleanupRequest(runtime=docker_runtime))  # removes models, not the gateway
    assert docker_engine.containers.get(f"mlc-gateway-{docker_runtime.name}").status == "running"
    log_line = (gateway_root(docker_settings, docker_runtime) / "logs" / "weak-model.access.log").read_text()
    assert json.loads(log_line.splitlines()[-1])["route"] == v2.deployment_id


# --- pure parts: comparisons, captures, configuration ---------------------------------


def test_compare_labels_and_scores() -> None:
    primary = {"a": {"probability": 0.9, "is_fraud": 1}, "b": [{"probability": 0.1, "is_fraud": 0}], "c": {}}
    shadow = {"a": {"probability": 0.7, "is_fraud": 1}, "b": [{"probability": 0.6, "is_fraud": 1}]}
    result = compare(primary_id="p", shadow_id="s", primary=primary, shadow=shadow, shadow_errors=2)
    assert result.pairs == 2  # "c" was never answered by the shadow
    assert result.agreement_rate == 0.5
    assert result.max_abs_diff == pytest.approx(0.5)
    assert result.mean_abs_diff == pytest.approx(0.35)
    assert result.shadow_errors == 2
    assert compare(primary_id="p", shadow_id="s", primary={}, shadow={}).agreement_rate is None


def test_capture_is_bounded_and_read_back(tmp_path: Path) -> None:
    capture = AnswerCapture(tmp_path / "mlc-capture.jsonl", max_bytes=200)
    for i in range(20):
        capture.record(f"id-{i}", {"probability": i / 100, "is_fraud": 0})
    capture.record("bad id with spaces", {"x": 1})  # ignored
    capture.record(None, {"x": 1})  # ignored
    files = [tmp_path / "mlc-capture.jsonl.1", tmp_path / "mlc-capture.jsonl"]
    assert all(f.stat().st_size < 400 for f in files)
    answers = read_answers(b"".join(f.read_bytes() for f in files).splitlines())
    assert answers["id-19"] == {"probability": 0.19, "is_fraud": 0}
    assert "id-0" not in answers and "bad id with spaces" not in answers


def test_capture_lines_a_model_forged_are_skipped() -> None:
    lines = [b'{"t": "soon", "id": "a"}', b'{"t": [1], "id": "b", "out": 2}', b'{"t": 5, "id": "c"}']
    assert read_answers(lines, since=1.0) == {"c": None}


def test_model_config_without_routes_answers_503() -> None:
    http, server = render_model(runtime="r", model="cc-fraud.v2", backends=[], logs="/logs")
    assert "upstream" not in http
    assert "return 503" in server and r"^/models/cc\-fraud\.v2(/.*)$" in server


def test_deployments_in_a_shared_host_get_their_path_prefix() -> None:
    assert endpoint_parts("http://127.0.0.1:8080") == ("127.0.0.1:8080", "")
    assert endpoint_parts("http://127.0.0.1:8080/models/dep-a") == ("127.0.0.1:8080", "/models/dep-a")

    def backend(deployment_id: str, weight: int, prefix: str = "", shadow: bool = False) -> Backend:
        route = TrafficRoute(deployment_id=deployment_id, version=1, weight=weight, shadow=shadow)
        return Backend(route, "127.0.0.1:1", prefix)

    split = [
        backend("dep-a", 40, "/models/dep-a"),
        backend("dep-b", 60),
        backend("dep-c", 0, "/models/dep-c", True),
    ]
    http, server = render_model(runtime="r", model="m", backends=split, logs="/logs")
    assert "    dep-a '/models/dep-a';\n" in http and "    dep-b '';\n" in http
    assert "rewrite ^ $mlc_prefix_" in server and "rewrite ^ /models/dep-c$mlc_path break;" in server
    _, alone = render_model(
        runtime="r", model="m", backends=[backend("dep-a", 100, "/models/dep-a")], logs="/l"
    )
    assert "rewrite ^ /models/dep-a$mlc_path break;" in alone
    _, plain = render_model(runtime="r", model="m", backends=[backend("dep-b", 100)], logs="/l")
    assert "rewrite ^ $mlc_path break;" in plain
