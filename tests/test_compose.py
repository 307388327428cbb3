"""The compose files: valid for docker-compose, and shaped the way docs/team.md says.

``docker-compose config -q`` validates each profile; the structural checks read the files
(and the merged local profile) with PyYAML, and the two Temporal setup scripts run against
fake ``temporal-sql-tool`` / ``temporal`` / ``nc`` commands. Nothing is started, so no Docker
engine is needed, only the docker-compose binary: under CI (``CI=true``) its absence is a
failure, elsewhere a skip.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.conftest import missing

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "docker-compose.yml"
OVERRIDE = ROOT / "docker-compose.override.yml"
LOCAL = ROOT / "docker-compose.local.yml"
PROFILES = {"production": [BASE, OVERRIDE], "production-no-ports": [BASE], "local": [BASE, LOCAL]}

WORKER_ENV = (
    "MLC_WORKER_DATABASE_URL",
    "TEMPORAL_ADDRESS",
    "TEMPORAL_NAMESPACE",
    "MLC_HOME",
    "MLC_TASK_QUEUE",
)
SEARCH_ATTRIBUTES = {
    "MlcModel": "Keyword",
    "MlcVersion": "Int",
    "MlcStage": "Keyword",
    "MlcServiceTag": "KeywordList",
}
HEALTHY_CONDITIONS = {"service_healthy", "service_completed_successfully"}
TEMPORAL_DEPLOY = ROOT / "deploy" / "temporal"
PERSISTENCE_ENV = (
    "DB",
    "DB_PORT",
    "POSTGRES_SEEDS",
    "POSTGRES_USER",
    "POSTGRES_PWD",
    "DBNAME",
    "VISIBILITY_DBNAME",
)
"""What temporal-schema and the temporal server must agree on: the same databases, same role."""


def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        missing(
            "docker-compose is not installed, so docker-compose.yml and docker-compose.local.yml "
            "cannot be validated: install it (apt-get install -y docker-compose)"
        )
    return exe


def _compose(
    files: list[Path], *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [_docker_compose()]
    for f in files:
        cmd += ["-f", str(f)]
    # A fixed project name and the repo as cwd: results do not depend on where pytest runs.
    cmd += ["-p", "mlc-compose-test", *args]
    return subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


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
    assert {"postgres", "temporal-schema", "temporal", "temporal-init", "migrate", "worker"} <= set(services)
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
    # Least privilege: the worker logs in as mlc_worker and never holds the owner's DSN.
    assert urlsplit(env["MLC_WORKER_DATABASE_URL"]).username == "mlc_worker"
    assert "MLC_DATABASE_URL" not in env, "the worker must not get the inventory owner's DSN"
    # Present even when empty (then $MLC_HOME/trust-root applies), so .env can set it.
    assert "MLC_TRUST_ROOT" in env, "worker must pass MLC_TRUST_ROOT through"


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_server_holds_the_owner_dsn_and_shares_the_workers_artifacts(profile: str) -> None:
    """``mlc server`` is the people-facing holder of the owner's DSN: migrated schema first,
    the worker's trust root, the mlc-home volume at the worker's path (uploaded packages go to
    the artifact store the worker deploys from), health from ``/healthz``."""
    services = _merged(profile)["services"]
    server, worker = services["server"], services["worker"]
    command = server["command"]
    assert command[:2] == ["server", "--host"] and "--port" in command, command
    env, worker_env = _env(server), _env(worker)
    assert urlsplit(env["MLC_DATABASE_URL"]).username == "mlc", "the server reads as the inventory's owner"
    assert env["MLC_DATABASE_URL"] == _env(services["migrate"])["MLC_DATABASE_URL"]
    for key in ("MLC_TRUST_ROOT", "TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE", "MLC_TASK_QUEUE", "MLC_HOME"):
        assert env[key] == worker_env[key], key
    assert dict(_volume_sources(server)) == {"mlc-home": worker_env["MLC_HOME"]}
    assert server["image"] == worker["image"] and "build" in server
    assert server["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    port = command[command.index("--port") + 1]
    assert env["MLC_SERVER_PORT"] == port and "/healthz" in " ".join(server["healthcheck"]["test"])
    assert urlsplit(env["MLC_API_PUBLIC_URL"]).port == (8280 if profile != "local" else int(port))
    if profile == "production":
        ports = [_port_text(p) for p in server["ports"]]
        assert any(p.startswith("127.0.0.1:8280:8280") for p in ports), ports


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_migrate_runs_as_owner_and_enables_the_worker_role(profile: str) -> None:
    services = _merged(profile)["services"]
    migrate, worker = services["migrate"], services["worker"]
    command = migrate["command"]
    command = command.split() if isinstance(command, str) else list(command)
    assert command[:2] == ["db", "migrate"], command
    flag = command.index("--worker-password-env")
    variable = command[flag + 1]
    env, worker_env = _env(migrate), _env(worker)
    password = env.get(variable, "")
    assert len(password) >= 12, f"migrate's {variable} must hold a password (mlc db migrate wants >= 12)"
    owner = urlsplit(env["MLC_DATABASE_URL"])
    assert owner.username == "mlc", "migrations are applied by the inventory's owner"
    # The password migrate gives mlc_worker is the one the worker logs in with, on the same
    # server and database.
    worker_dsn = urlsplit(worker_env["MLC_WORKER_DATABASE_URL"])
    assert worker_dsn.password == password
    assert (worker_dsn.hostname, worker_dsn.port, worker_dsn.path) == (owner.hostname, owner.port, owner.path)
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert str(migrate.get("restart", "no")) == "no", "migrate is a one-shot"
    assert migrate["image"] == worker["image"], "migrate runs the worker's own image (same migrations)"
    assert "build" in migrate, "migrate starts before the worker: it must build, never pull, the image"


def _tag(image: str) -> str:
    return image.rpartition(":")[2]


def _version(tag: str) -> tuple[int, ...]:
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag), f"{tag!r} is not a plain X.Y.Z release tag"
    return tuple(int(part) for part in tag.split("."))


def test_production_runs_temporal_server_with_admin_tools() -> None:
    raw = BASE.read_text()
    assert "auto-setup" not in "\n".join(
        line for line in raw.splitlines() if not line.lstrip().startswith("#")
    ), "temporalio/auto-setup is deprecated: use temporalio/server + admin-tools"
    services = _merged("production")["services"]
    assert services["postgres"]["image"].startswith("postgres:16")
    server = services["temporal"]["image"]
    assert server.startswith("temporalio/server:")
    # The schema files come from admin-tools: its tag must be the server's, in every service.
    for name in ("temporal-schema", "temporal-init"):
        image = services[name]["image"]
        assert image.startswith("temporalio/admin-tools:"), f"{name}: {image}"
        assert _tag(image) == _tag(server), f"{name} runs {image}, the server {server}"
    assert _version(_tag(server)) >= (1, 32, 0), f"{server} is older than the pinned line"
    ui = services["temporal-ui"]["image"]
    assert ui.startswith("temporalio/ui:") and _version(_tag(ui)) >= (2, 54, 1), ui
    # Schema first, then the server, on the same databases with the same role.
    depends = services["temporal"]["depends_on"]
    assert depends["temporal-schema"]["condition"] == "service_completed_successfully"
    server_env, schema_env = _env(services["temporal"]), _env(services["temporal-schema"])
    assert server_env["DB"] == "postgres12" and server_env["POSTGRES_SEEDS"] == "postgres"
    for key in PERSISTENCE_ENV:
        assert schema_env.get(key) == server_env.get(key), (
            f"{key}: schema {schema_env.get(key)!r}, server {server_env.get(key)!r}"
        )
    assert server_env["BIND_ON_IP"] == "0.0.0.0", "other containers must reach the frontend"


def test_production_pins_one_temporal_version_by_default() -> None:
    # With TEMPORAL_VERSION unset the defaults apply; they must be the same literal everywhere.
    raw = _raw(BASE)["services"]
    images = [raw[name]["image"] for name in ("temporal", "temporal-schema", "temporal-init")]
    matches = [re.fullmatch(r"temporalio/[a-z-]+:\$\{TEMPORAL_VERSION:-([0-9.]+)\}", i) for i in images]
    assert all(matches), f"not pinned through ${{TEMPORAL_VERSION:-X.Y.Z}}: {images}"
    assert len({m.group(1) for m in matches if m}) == 1, images
    # And a hop (docs/team.md, "Versions") moves server and admin-tools together.
    result = _compose(PROFILES["production"], "config", env={"TEMPORAL_VERSION": "1.30.3"})
    assert result.returncode == 0, result.stderr
    hopped = yaml.safe_load(result.stdout)["services"]
    assert {
        hopped[name]["image"].rpartition(":")[2] for name in ("temporal", "temporal-schema", "temporal-init")
    } == {"1.30.3"}


def test_production_temporal_healthcheck_needs_no_cli() -> None:
    # temporalio/server has no `temporal` binary (admin-tools has): a check calling it would
    # never pass and the whole stack would wait forever.
    test = _raw(BASE)["services"]["temporal"]["healthcheck"]["test"]
    command = test[1] if test[0] == "CMD" else test[1].split()[0]
    assert command != "temporal", test


def test_production_dynamic_config_is_mounted_and_sane() -> None:
    temporal = _raw(BASE)["services"]["temporal"]
    path = _env(temporal)["DYNAMIC_CONFIG_FILE_PATH"]
    mounts = {target: source for source, target in _volume_sources(temporal)}
    folder = next((t for t in mounts if path.startswith(t.rstrip("/") + "/")), None)
    assert folder, f"{path} is not under any mounted folder: {mounts}"
    local = ROOT / mounts[folder] / path[len(folder) :].lstrip("/")
    assert local.is_file(), local
    config = yaml.safe_load(local.read_text())
    assert isinstance(config, dict) and config
    for key, values in config.items():
        assert isinstance(values, list) and all("value" in v for v in values), key
    assert config["limit.maxIDLength"][0]["value"] <= 255, "SQL visibility keeps ids in VARCHAR(255)"
    assert config["frontend.enableUpdateWorkflowExecution"][0]["value"] is True, "approvals are Updates"
    assert "system.forceSearchAttributesCacheRefreshOnRead" not in config, "dev-only setting"


def test_local_profile_builds_everything_on_host_network() -> None:
    data = _merged("local")
    services = _active(data["services"])
    assert "temporal-ui" not in services, "the dev server serves the UI in the local profile"
    built = {svc["image"] for svc in services.values() if "build" in svc}
    for name, svc in services.items():
        assert svc.get("network_mode") == "host", f"{name}: local services use the host network"
        assert svc["image"] in built, f"{name}: image {svc['image']} would need a registry"
        # `up` pulls a missing image of a service without `build` before the services that
        # build it start, so a one-shot that starts first must build its image itself.
        if name in ("temporal-schema", "migrate"):
            assert "build" in svc, f"{name} starts before the service that builds {svc['image']}"
        if "build" in svc:
            assert svc["build"].get("network") == "host", f"{name}: build needs network: host"
            assert svc["build"]["args"]["BASE"] == "mlc-python:3.11-bookworm" or os.environ.get(
                "MLC_BASE_IMAGE"
            )


def test_local_temporal_schema_is_a_no_op() -> None:
    # start-dev keeps its own SQLite schema, and the local image has no temporal-sql-tool.
    schema = _merged("local")["services"]["temporal-schema"]
    assert "temporal-sql-tool" not in " ".join(schema["entrypoint"]) + " ".join(schema.get("command") or [])


def test_local_profile_publishes_no_ports() -> None:
    # docker-compose 1.x refuses port bindings with network_mode: host at `up` time, which
    # `config -q` does not catch.
    for name, svc in _active(_merged("local")["services"]).items():
        assert not svc.get("ports"), f"{name}: published ports break `up` on the host network"


def test_production_publishes_temporal_and_ui_on_loopback() -> None:
    services = _merged("production")["services"]
    for name, port in (("temporal", 7233), ("temporal-ui", 8080), ("postgres", 5432)):
        ports = [_port_text(p) for p in services[name]["ports"]]
        assert any(p.startswith("127.0.0.1:") and p.split("/")[0].endswith(f":{port}") for p in ports), (
            f"{name}: {ports!r}"
        )


def test_production_never_publishes_postgres_beyond_loopback() -> None:
    result = _compose(PROFILES["production"], "config", env={"MLC_BIND_ADDRESS": "0.0.0.0"})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert any(_port_text(p).startswith("0.0.0.0:") for p in services["temporal"]["ports"])
    for port in services["postgres"]["ports"]:
        assert _port_text(port).startswith("127.0.0.1:"), f"PostgreSQL published beyond loopback: {port!r}"


def test_local_ports_agree_and_bind_loopback() -> None:
    services = _merged("local")["services"]
    pg = _env(services["postgres"])
    temporal = _env(services["temporal"])
    worker = _env(services["worker"])
    migrate = _env(services["migrate"])
    assert pg["POSTGRES_LISTEN_ADDRESSES"] == "127.0.0.1"
    assert temporal["TEMPORAL_IP"] == "127.0.0.1"
    assert worker["MLC_WORKER_DATABASE_URL"].endswith(f"@127.0.0.1:{pg['PGPORT']}/mlc")
    assert migrate["MLC_DATABASE_URL"].endswith(f"@127.0.0.1:{pg['PGPORT']}/mlc")
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


def _fake_bin(tmp_path: Path, name: str, body: str) -> None:
    """A stand-in command on PATH that appends its arguments to ``calls.log``, then runs ``body``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/calls.log"\n{body}\n')
    script.chmod(0o755)


def _run_script(
    tmp_path: Path, script: str, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    path = f"{tmp_path / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    result = subprocess.run(
        ["sh", str(TEMPORAL_DEPLOY / script)],
        env={"PATH": path, "HOME": str(tmp_path), "MLC_INIT_WAIT_SECONDS": "0", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    log = tmp_path / "calls.log"
    return result, log.read_text().splitlines() if log.exists() else []


def test_schema_setup_creates_and_migrates_both_stores(tmp_path: Path) -> None:
    schemas = tmp_path / "schema"
    for store in ("temporal", "visibility"):
        (schemas / store / "versioned").mkdir(parents=True)
    _fake_bin(tmp_path, "nc", "exit 0")
    # Records the password it got through the environment, never on the command line.
    _fake_bin(tmp_path, "temporal-sql-tool", f'echo "SQL_PASSWORD=$SQL_PASSWORD" >> "{tmp_path}/env.log"')
    services = _raw(BASE)["services"]
    env = {k: v for k, v in _env(services["temporal-schema"]).items() if "${" not in v}
    env |= {"POSTGRES_PWD": "s3cret-pw", "MLC_TEMPORAL_SCHEMA_ROOT": str(schemas)}
    result, calls = _run_script(tmp_path, "setup-schema.sh", env)
    assert result.returncode == 0, result.stderr
    common = "temporal-sql-tool --plugin postgres12 --ep postgres -p 5432 -u temporal"
    expected = []
    for database, store in (("temporal", "temporal"), ("temporal_visibility", "visibility")):
        expected += [
            f"{common} --db {database} create-database",
            f"{common} --db {database} setup-schema -v 0.0",
            f"{common} --db {database} update-schema -d {schemas / store / 'versioned'}",
        ]
    assert [c for c in calls if c.startswith("temporal-sql-tool")] == expected
    assert not any("s3cret-pw" in c for c in calls), "the password must not be an argument"
    assert set((tmp_path / "env.log").read_text().split()) == {"SQL_PASSWORD=s3cret-pw"}
    assert services["temporal-schema"]["entrypoint"][-1].endswith("/setup-schema.sh")


def test_schema_setup_stops_at_the_first_failure(tmp_path: Path) -> None:
    for store in ("temporal", "visibility"):
        (tmp_path / "schema" / store / "versioned").mkdir(parents=True)
    _fake_bin(tmp_path, "nc", "exit 0")
    _fake_bin(tmp_path, "temporal-sql-tool", 'case "$*" in *setup-schema*) exit 1 ;; esac')
    env = {"POSTGRES_PWD": "pw", "MLC_TEMPORAL_SCHEMA_ROOT": str(tmp_path / "schema")}
    result, calls = _run_script(tmp_path, "setup-schema.sh", env)
    assert result.returncode != 0
    assert not any("update-schema" in c for c in calls), calls
    # Without the password nothing runs at all.
    (tmp_path / "calls.log").unlink()
    result, calls = _run_script(
        tmp_path, "setup-schema.sh", {"MLC_TEMPORAL_SCHEMA_ROOT": str(tmp_path / "schema")}
    )
    assert result.returncode != 0 and "POSTGRES_PWD" in result.stderr and not calls


_FAKE_TEMPORAL = """
case "$*" in
  "operator cluster health") exit 0 ;;
  "operator namespace describe"*) [ -f "{state}/ns" ] ;;
  "operator namespace create"*) touch "{state}/ns" ;;
  "operator search-attribute list"*)
    [ -f "{state}/ns" ] || exit 1; printf 'MlcModel Keyword\nWorkflowId Keyword\n' ;;
  "operator search-attribute create"*) exit 0 ;;
  *) exit 2 ;;
esac
"""


def test_temporal_init_creates_namespace_then_attributes(tmp_path: Path) -> None:
    _fake_bin(tmp_path, "temporal", _FAKE_TEMPORAL.replace("{state}", str(tmp_path)))
    init = _raw(BASE)["services"]["temporal-init"]
    assert init["entrypoint"][-1].endswith("/temporal-init.sh")
    env = {k: v for k, v in _env(init).items() if "${" not in v} | {"TEMPORAL_NAMESPACE": "mlc-team"}
    result, calls = _run_script(tmp_path, "temporal-init.sh", env)
    assert result.returncode == 0, result.stderr
    creates = [c for c in calls if "namespace create" in c]
    assert creates == ["temporal operator namespace create --namespace mlc-team --retention 720h"]
    made = {c.split("--name ")[1] for c in calls if "search-attribute create" in c}
    # MlcModel is listed already; the other three are created with their types.
    expected = {f"{n} --type {k}" for n, k in SEARCH_ATTRIBUTES.items() if n != "MlcModel"}
    assert made == expected
    # Second run: the namespace exists, nothing is created again.
    (tmp_path / "calls.log").unlink()
    result, calls = _run_script(tmp_path, "temporal-init.sh", env)
    assert result.returncode == 0 and not any("namespace create" in c for c in calls)


def test_temporal_init_refuses_an_attribute_of_another_type(tmp_path: Path) -> None:
    fake = _FAKE_TEMPORAL.replace("{state}", str(tmp_path)).replace("MlcModel Keyword", "MlcModel Text")
    _fake_bin(tmp_path, "temporal", fake)
    (tmp_path / "ns").touch()
    result, _ = _run_script(tmp_path, "temporal-init.sh", {})
    assert result.returncode != 0 and "MlcModel exists as Text" in result.stderr


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


def test_every_package_reaches_the_image_build() -> None:
    """.dockerignore is an allow-list: a package pyproject.toml installs but the list leaves out
    is missing from the image (``mlc server`` died in compose with ``No module named 'server'``)."""
    import tomllib

    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {pattern.rstrip("*") for pattern in found["include"]}
    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    missing_ones = sorted(packages - allowed)
    assert packages and not missing_ones, f"not in .dockerignore's allow-list: {missing_ones}"


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_lifecycle_worker_runs_uploaded_code_with_nothing_to_steal(profile: str) -> None:
    services = _merged(profile)["services"]
    svc = services["lifecycle-worker"]
    assert svc["command"] == ["worker", "--lifecycles", "--no-sandbox"]
    assert svc["image"] == services["worker"]["image"] and svc["build"] == services["worker"]["build"]
    env = _env(svc)
    assert env["MLC_HEALTHCHECK_QUEUE"] == f"{env['MLC_TASK_QUEUE']}-lifecycles"
    secrets = [k for k in env if "DATABASE" in k or "PASSWORD" in k or "KEY" in k or k.startswith("DOCKER")]
    assert not secrets, f"the lifecycle worker must not hold {secrets}"
    assert not _volume_sources(svc), "no volume: no MLC_HOME, keys, artifacts or Docker socket"
    assert svc.get("read_only") is True
    assert svc.get("cap_drop") == ["ALL"]
    assert any("no-new-privileges" in opt for opt in svc.get("security_opt") or [])
    assert not svc.get("group_add") and not svc.get("privileged")


def test_lifecycle_worker_shares_a_network_with_temporal_only() -> None:
    merged = _merged("production")
    services = merged["services"]
    networks = {name: set(svc.get("networks") or {"default"}) for name, svc in services.items()}
    assert networks["lifecycle-worker"] == {"lifecycles"}
    assert merged["networks"]["lifecycles"].get("internal") is True, "no route out of the host"
    sharing = sorted(n for n, nets in networks.items() if nets & networks["lifecycle-worker"])
    assert sharing == ["lifecycle-worker", "temporal"], f"the lifecycle worker reaches {sharing}"
    for trusted in ("postgres", "worker", "migrate", "temporal-schema", "temporal-init"):
        assert networks[trusted] & networks["temporal"], f"{trusted} must still reach temporal"
    assert networks["postgres"] & networks["worker"] & networks["migrate"]
