"""The compose files: valid for docker-compose, and shaped the way docs/team.md says.

``docker-compose config -q`` validates each profile; the structural checks read the files
(and the merged local profile) with PyYAML. Nothing is started, so no Docker engine is
needed, only the docker-compose binary: under CI (``CI=true``) its absence is a failure,
elsewhere a skip.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "docker-compose.yml"
OVERRIDE = ROOT / "docker-compose.override.yml"
LOCAL = ROOT / "docker-compose.local.yml"
PROFILES = {"production": [BASE, OVERRIDE], "production-no-ports": [BASE], "local": [BASE, LOCAL]}

WORKER_ENV = ("MLC_DATABASE_URL", "TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE", "MLC_HOME", "MLC_TASK_QUEUE")
SEARCH_ATTRIBUTES = {
    "MlcModel": "Keyword",
    "MlcVersion": "Int",
    "MlcStage": "Keyword",
    "MlcServiceTag": "KeywordList",
}
HEALTHY_CONDITIONS = {"service_healthy", "service_completed_successfully"}


def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        message = (
            "docker-compose is not installed, so docker-compose.yml and docker-compose.local.yml "
            "cannot be validated: install it (apt-get install -y docker-compose)"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(f"{message} (skipped outside CI only)")
    return exe


def _compose(files: list[Path], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [_docker_compose()]
    for f in files:
        cmd += ["-f", str(f)]
    # A fixed project name and the repo as cwd: results do not depend on where pytest runs.
    cmd += ["-p", "mlc-compose-test", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


@functools.cache
def _merged(profile: str) -> dict[str, Any]:
    result = _compose(PROFILES[profile], "config")
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert isinstance(data, dict)
    return data


def _port_text(port: str | dict[str, Any]) -> str:
    """``HOST_IP:PUBLISHED:TARGET[/PROTO]`` from either syntax docker-compose prints."""
    if isinstance(port, str):
        return port
    return f"{port.get('host_ip', '')}:{port.get('published', '')}:{port.get('target', '')}"


def _raw(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def _active(services: dict[str, Any]) -> dict[str, Any]:
    """Services started by a plain ``up`` (no compose profile activated)."""
    return {name: svc for name, svc in services.items() if not svc.get("profiles")}


def _env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _volume_sources(svc: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for vol in svc.get("volumes") or []:
        if isinstance(vol, str):
            source, _, rest = vol.partition(":")
            pairs.append((source, rest.split(":")[0]))
        else:
            pairs.append((str(vol.get("source", "")), str(vol.get("target", ""))))
    return pairs


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_config_is_valid(profile: str) -> None:
    result = _compose(PROFILES[profile], "config", "-q")
    assert result.returncode == 0, f"docker-compose config -q ({profile}):\n{result.stderr}"


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_service_is_health_gated(profile: str) -> None:
    services = _active(_merged(profile)["services"])
    assert {"postgres", "temporal", "temporal-init", "worker"} <= set(services)
    for name, svc in services.items():
        depends = svc.get("depends_on") or {}
        conditions = {d.get("condition") for d in depends.values()} if isinstance(depends, dict) else set()
        assert "healthcheck" in svc or (conditions and conditions <= HEALTHY_CONDITIONS), (
            f"service {name} ({profile}) has neither a healthcheck nor depends_on conditions "
            f"on healthy/completed services: {depends!r}"
        )
        if "healthcheck" in svc:
            assert not svc["healthcheck"].get("disable"), f"{name}: healthcheck disabled"
        for dep, spec in depends.items() if isinstance(depends, dict) else []:
            assert dep in services, f"{name} depends on {dep}, which a plain `up` does not start"
            assert spec.get("condition") in HEALTHY_CONDITIONS, f"{name} -> {dep}: {spec!r}"


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_named_volumes_are_declared(profile: str) -> None:
    data = _merged(profile)
    declared = set(data.get("volumes") or {})
    for name, svc in data["services"].items():
        for source, target in _volume_sources(svc):
            if source and not source.startswith(("/", ".")):
                assert source in declared, f"{name}: volume {source} ({target}) is not declared"
    assert {"postgres-data", "mlc-home"} <= declared


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_worker_mounts_docker_and_sets_env(profile: str) -> None:
    data = _merged(profile)
    worker = data["services"]["worker"]
    env = _env(worker)
    for key in WORKER_ENV:
        assert env.get(key), f"worker ({profile}) does not set {key}"
    mounts = dict((target, source) for source, target in _volume_sources(worker))
    assert mounts.get("/var/run/docker.sock") == "/var/run/docker.sock"
    assert mounts.get(env["MLC_HOME"]) == "mlc-home", "MLC_HOME must be the mlc-home named volume"
    # Docker runtimes bind-mount folders under MLC_HOME into model containers, and the
    # host's engine resolves them on the host: the volume must be that same host folder.
    device = data["volumes"]["mlc-home"]["driver_opts"]["device"]
    assert device == env["MLC_HOME"], f"mlc-home is backed by {device}, MLC_HOME is {env['MLC_HOME']}"
    assert worker.get("group_add"), "worker needs the docker socket's group (DOCKER_GID)"
    assert "build" in worker and worker.get("image")
    assert env["MLC_DATABASE_URL"].startswith("postgresql://mlc:")


def test_production_profile_uses_postgres_for_temporal() -> None:
    services = _raw(BASE)["services"]
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["temporal"]["image"].startswith("temporalio/auto-setup:")
    assert _env(services["temporal"])["DB"] == "postgres12"
    assert _env(services["temporal"])["POSTGRES_SEEDS"] == "postgres"
    assert services["temporal-ui"]["image"].startswith("temporalio/ui:")


def test_local_profile_builds_everything_on_host_network() -> None:
    data = _merged("local")
    services = _active(data["services"])
    assert "temporal-ui" not in services, "the dev server serves the UI in the local profile"
    built = {svc["image"] for svc in services.values() if "build" in svc}
    for name, svc in services.items():
        assert svc.get("network_mode") == "host", f"{name}: local services use the host network"
        assert svc["image"] in built, f"{name}: image {svc['image']} would need a registry"
        if "build" in svc:
            assert svc["build"].get("network") == "host", f"{name}: build needs network: host"
            assert svc["build"]["args"]["BASE"] == "mlc-python:3.11-bookworm" or os.environ.get(
                "MLC_BASE_IMAGE"
            )


def test_local_profile_publishes_no_ports() -> None:
    # docker-compose 1.x refuses port bindings with network_mode: host at `up` time, which
    # `config -q` does not catch.
    for name, svc in _active(_merged("local")["services"]).items():
        assert not svc.get("ports"), f"{name}: published ports break `up` on the host network"


def test_production_publishes_temporal_and_ui_on_loopback() -> None:
    services = _merged("production")["services"]
    for name, port in (("temporal", 7233), ("temporal-ui", 8080)):
        ports = [_port_text(p) for p in services[name]["ports"]]
        assert any(p.startswith("127.0.0.1:") and p.split("/")[0].endswith(f":{port}") for p in ports), (
            f"{name}: {ports!r}"
        )


def test_local_ports_agree_and_bind_loopback() -> None:
    services = _merged("local")["services"]
    pg = _env(services["postgres"])
    temporal = _env(services["temporal"])
    worker = _env(services["worker"])
    assert pg["POSTGRES_LISTEN_ADDRESSES"] == "127.0.0.1"
    assert temporal["TEMPORAL_IP"] == "127.0.0.1"
    assert worker["MLC_DATABASE_URL"].endswith(f"@127.0.0.1:{pg['PGPORT']}/mlc")
    assert worker["TEMPORAL_ADDRESS"] == f"127.0.0.1:{temporal['TEMPORAL_PORT']}"
    assert _env(services["temporal-init"])["TEMPORAL_ADDRESS"] == worker["TEMPORAL_ADDRESS"]
    if not any(os.environ.get(k) for k in ("MLC_PG_PORT", "MLC_TEMPORAL_PORT", "MLC_TEMPORAL_UI_PORT")):
        assert (pg["PGPORT"], temporal["TEMPORAL_PORT"], temporal["TEMPORAL_UI_PORT"]) == (
            "55432",
            "17233",
            "18233",
        )


@pytest.mark.parametrize("path", [BASE, OVERRIDE, LOCAL], ids=lambda p: p.name)
def test_every_variable_is_documented(path: Path) -> None:
    text = path.read_text()
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    if path == LOCAL:
        comments += "\n" + "\n".join(
            line for line in BASE.read_text().splitlines() if line.lstrip().startswith("#")
        )
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    assert used, "expected ${VAR} settings"
    undocumented = sorted(v for v in used if not re.search(rf"\b{v}\b", comments))
    assert not undocumented, f"{path.name}: variables used but not described in comments: {undocumented}"


def test_search_attributes_registered_by_init() -> None:
    script = (ROOT / "deploy/temporal/register-search-attributes.sh").read_text()
    for name, kind in SEARCH_ATTRIBUTES.items():
        assert f"{name}={kind}" in script
    entry = _raw(BASE)["services"]["temporal-init"]["entrypoint"]
    assert entry[-1].endswith("register-search-attributes.sh")


def test_files_referenced_by_compose_exist() -> None:
    for path in (BASE, OVERRIDE, LOCAL):
        for name, svc in _raw(path)["services"].items():
            build = svc.get("build") or {}
            if isinstance(build, dict) and build.get("dockerfile"):
                assert (ROOT / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']}"
            for source, _ in _volume_sources(svc):
                if source.startswith("./"):
                    assert (ROOT / source).exists(), f"{name}: {source}"
    assert (ROOT / "Dockerfile").is_file()
    assert (ROOT / ".dockerignore").is_file()
