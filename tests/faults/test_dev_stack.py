"""``mlc dev`` itself: one per home, ``kill -9`` and restarts on the same home, SIGTERM and
SIGINT stopping everything. Only the real CLI is used, as a person would."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import httpx

from cli.api_client import ApiClient
from cli.stack import dev_temporal
from cli.stack.dev_postgres import DevPostgres
from cli.stack.devstack import DevStack, dev_running, port_open, read_state
from mlc import isolation, processes
from mlc.config import Settings
from mlc.trust.keys import load_private_key
from tests.conftest import FIXTURES, call_model
from tests.faults.harness import (
    PROJECT,
    WAIT_SECONDS,
    environ_without_servers,
    free_port,
    leftover_processes,
    model_servers,
    wait_until,
)

MODEL = FIXTURES / "models" / "weak-model"
SPEC = {"stages": [{"name": "DEV", "tests": ["smoke"], "gate": {}}]}


class Dev:
    """One home and the ``mlc`` commands run on it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.ports = [str(free_port()), str(free_port())]
        self.api_port = free_port()
        self.env = {
            **environ_without_servers(),
            "MLC_HOME": str(self.home),
            "MLC_SIGNING_KEY": str(root / "tester.pem"),
            "MLC_USER": "tester",
            "MLC_RECONCILE_SECONDS": "1",
        }
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        """Start ``mlc dev`` and wait until its worker runs (the banner is printed)."""
        self.starts += 1
        out = self.root / f"dev-{self.starts}.out"
        with out.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.command(), env=self.env, cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT
            )
        await wait_until(
            lambda: self._ready(out), what=f"mlc dev to start:\n{self.root}/dev-{self.starts}.out", timeout=90
        )

    def command(self) -> list[str]:
        """``mlc dev`` on this home's ports, without the Web UI."""
        temporal, ui = self.ports
        return [
            sys.executable,
            "-m",
            "mlc",
            "dev",
            "--headless",
            "--temporal-port",
            temporal,
            "--ui-port",
            ui,
            "--api-port",
            str(self.api_port),
        ]

    def _ready(self, out: Path) -> bool:
        assert self.process is not None
        text = out.read_text(errors="replace")
        assert self.process.returncode is None, text
        return "mlc dev is running" in text

    async def mlc(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run an ``mlc`` command against this home's running stack."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mlc", *args, env=self.env, cwd=PROJECT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
        return subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())

    async def json(self, *args: str) -> Any:
        """An ``mlc ... --json`` command's output, parsed (it must succeed)."""
        done = await self.mlc(*args, "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)

    async def on_server_host(self, *args: str) -> subprocess.CompletedProcess[str]:
        """An ``mlc`` command run as on the server's host, with the owner's DSN taken from the
        stack's server (the home's commands otherwise have only the API): what acts on this
        host's runtimes (``runtime cleanup``) or the API does not offer (``runtime add --replace``)."""
        server = read_state(self.home)["server"]["pid"]
        variables = Path(f"/proc/{server}/environ").read_text().split("\0")
        environ = dict(item.split("=", 1) for item in variables if "=" in item)
        saved = self.env
        self.env = {**saved, "MLC_DATABASE_URL": environ["MLC_DATABASE_URL"]}
        try:
            return await self.mlc(*args)
        finally:
            self.env = saved

    async def stop(self, signum: int) -> int:
        """Send ``signum`` to ``mlc dev`` and return its exit code."""
        assert self.process is not None
        self.process.send_signal(signum)
        return await asyncio.wait_for(self.process.wait(), timeout=60)

    def nothing_left(self) -> bool:
        """No process of this home runs (servers, model servers) and its lock is free."""
        return not leftover_processes(str(self.home)) and not dev_running(Settings.from_env(home=self.home))


async def _serving_again(dev: Dev, deployment_id: str, old_pid: int) -> None:
    """The reconciler of the restarted stack brought the model server back, healthy."""

    def back() -> bool:
        pid = model_servers(dev.home).get(deployment_id)
        return pid is not None and pid != old_pid

    await wait_until(back, what="the reconciler to restart the model server", timeout=60)
    (deployment,) = await dev.json("deployments")
    assert deployment["state"] == "serving" and deployment["id"] == deployment_id
    health = await wait_until(lambda: _health(deployment["endpoint"]), what="health", timeout=30)
    assert health


async def _health(endpoint: str) -> bool:
    try:
        return (await call_model(endpoint, "/health")).status_code == 200
    except httpx.HTTPError:
        return False


async def test_dev_killed_restarted_and_stopped_needs_no_cleanup(tmp_path: Path) -> None:
    dev = Dev(tmp_path)
    await dev.start()
    try:
        second = await dev.mlc(
            "dev", "--headless", "--temporal-port", dev.ports[0], "--ui-port", dev.ports[1]
        )
        assert second.returncode == 4 and "already running" in second.stderr, second.stderr

        registered = await dev.mlc("model", "register", str(MODEL))
        assert registered.returncode == 0, registered.stderr
        (tmp_path / "spec.json").write_text(json.dumps(SPEC))
        started = await dev.mlc("lifecycle", "start", "weak-model@1", "--spec", str(tmp_path / "spec.json"))
        assert started.returncode == 0, started.stderr

        async def at_gate() -> bool:
            status = await dev.mlc("status", "weak-model@1", "--json")
            return status.returncode == 0 and '"pending_gate": {' in status.stdout

        await wait_until(at_gate, what="the DEV gate", timeout=WAIT_SECONDS)
        ((deployment_id, pid),) = model_servers(dev.home).items()

        # kill -9: Temporal, PostgreSQL and the model server go with it; nothing is left
        assert dev.process is not None
        dev.process.kill()
        await dev.process.wait()
        await wait_until(dev.nothing_left, what="mlc dev's children to die with it", timeout=30)

        await dev.start()  # same home, same ports: no manual cleanup
        await _serving_again(dev, deployment_id, pid)
        pid = model_servers(dev.home)[deployment_id]
        assert await dev.stop(signal.SIGTERM) == 0
        await wait_until(dev.nothing_left, what="SIGTERM to stop everything", timeout=30)

        await dev.start()
        await _serving_again(dev, deployment_id, pid)
        await wait_until(at_gate, what="the run to wait at its gate again", timeout=WAIT_SECONDS)
        approved = await dev.mlc("approve", "weak-model@1", "--stage", "DEV", "--comment", "after 3 starts")
        assert approved.returncode == 0, approved.stdout + approved.stderr

        async def succeeded() -> bool:
            return '"state": "succeeded"' in (await dev.mlc("status", "weak-model@1", "--json")).stdout

        await wait_until(succeeded, what="the lifecycle to complete", timeout=WAIT_SECONDS)
        cleanup = await dev.on_server_host("runtime", "cleanup", "local-dev", "--json")
        assert cleanup.returncode == 0, cleanup.stdout + cleanup.stderr
        (cleaned,) = json.loads(cleanup.stdout)
        assert cleaned["removed"] == []
        verified = await dev.mlc("audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert await dev.stop(signal.SIGINT) == 0
        await wait_until(dev.nothing_left, what="SIGINT to stop everything", timeout=30)
    finally:
        if dev.process is not None and dev.process.returncode is None:
            dev.process.kill()
            await dev.process.wait()
        await wait_until(dev.nothing_left, what="nothing left", timeout=30)


async def test_dev_serves_the_api_and_keeps_the_owner_dsn_to_its_server(tmp_path: Path) -> None:
    """``mlc dev`` starts ``mlc server`` (on a free port when its own is taken) with the owner's
    DSN in the server's environment only: ``dev.json`` and the start-up table hold the API's
    URL, not the DSN or its password; the home's commands get the URL; signed reads answer;
    the server stops with the stack."""
    dev = Dev(tmp_path)
    with socket.socket() as taken:  # another program on the API port: a free one instead
        taken.bind(("127.0.0.1", dev.api_port))
        taken.listen()
        await dev.start()
    try:
        out = _output(dev)
        state = read_state(dev.home)
        api_url = state["api_url"]
        assert api_url.startswith("http://127.0.0.1:") and api_url != f"http://127.0.0.1:{dev.api_port}"
        assert f"port {dev.api_port} is taken by another program" in out, out
        assert re.search(rf"API +│ {re.escape(api_url)} \(mlc server", out), out
        password = (dev.home / "postgres.password").read_text().strip()
        written = (dev.home / "dev.json").read_text()
        assert "database_url" not in state and password not in written and "postgresql://" not in written
        assert password not in out and "(server only; password in" in out, out

        server = state["server"]["pid"]
        environ = Path(f"/proc/{server}/environ").read_bytes().split(b"\0")
        assert any(v.startswith(b"MLC_DATABASE_URL=postgresql://") for v in environ), "the server has the DSN"
        assert not any(v.startswith(b"MLC_API_URL=") for v in environ)

        # a command of the home is pointed at the API, not at the database
        probe = "from cli.context import settings; s = settings(); print(s.api_url, s.database_url)"
        seen = await _python(dev, probe)
        assert seen.split() == [api_url, "None"], seen

        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{api_url}/healthz")).json() == {"ok": True}
            assert (await http.get(f"{api_url}/v1/me")).status_code == 401  # unsigned
        async with ApiClient(api_url, load_private_key(Path(dev.env["MLC_SIGNING_KEY"]))) as api:
            me = await api.get("/v1/me")
            assert (me["name"], me["role"]) == ("tester", "admin")
            assert await api.get("/v1/snapshots") == {"items": [], "next": None}
        # and the home's read commands work through it, with no DSN in their environment
        listed = {r["name"]: r["stage"] for r in await dev.json("runtime", "list")}
        assert listed == {"local-dev": "DEV", "local-sit": "SIT", "local-uat": "UAT", "local-prod": "PROD"}
        assert await dev.json("model", "list") == []
        assert (await dev.mlc("audit", "verify")).returncode == 0

        # supervised: a server that dies is started again, at the same URL
        os.kill(server, signal.SIGKILL)
        await wait_until(
            lambda: read_state(dev.home)["server"]["pid"] != server, what="a new server", timeout=60
        )
        server = read_state(dev.home)["server"]["pid"]
        assert read_state(dev.home)["api_url"] == api_url
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{api_url}/healthz")).json() == {"ok": True}
        again = f"mlc server serves again at {api_url}"
        said = await wait_until(lambda: again in _output(dev) and _output(dev), what="the notice")
        assert "mlc server exited (code -9); starting it again" in said, said

        assert await dev.stop(signal.SIGINT) == 0
        assert not processes.alive(server) and not port_open("127.0.0.1", int(api_url.rsplit(":", 1)[1]))
        await wait_until(dev.nothing_left, what="SIGINT to stop everything", timeout=30)
    finally:
        if dev.process is not None and dev.process.returncode is None:
            dev.process.kill()
            await dev.process.wait()
        await wait_until(dev.nothing_left, what="nothing left", timeout=30)


async def _python(dev: Dev, code: str) -> str:
    """Run ``code`` in a fresh Python with the home's environment, as an ``mlc`` command runs."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, env=dev.env, cwd=PROJECT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_servers_a_previous_stack_left_are_reused_when_they_fit_and_stopped_otherwise(
    tmp_path: Path,
) -> None:
    """Where no parent-death signal exists, a killed stack's servers outlive it; the next
    start adopts the ones started the same way and replaces the others."""
    settings = Settings.from_env(home=tmp_path / "home")
    settings.home.mkdir(parents=True)
    ports = {"temporal_port": free_port(), "ui_port": free_port(), "headless": True}
    log = (tmp_path / "survivors.log").open("ab")
    temporal = _survivor(DevStack(settings, **ports), log)
    postgres = DevPostgres(settings.home / "postgres", settings.home / "postgres.log")
    postgres.start(die_with_parent=False)
    await _survivor_up(temporal, ports["temporal_port"])

    stack = DevStack(settings, **ports)
    ready = await stack.start()
    try:
        assert stack.reused == [
            f"Temporal dev server (pid {temporal.pid})",
            f"PostgreSQL (pid {postgres.pid})",
        ]
        assert ready.temporal_address == f"127.0.0.1:{ports['temporal_port']}"
        assert read_state(settings.home)["postgres"]["pid"] == postgres.pid
    finally:
        stack.stop()
    assert not processes.alive(temporal.pid) and not processes.alive(postgres.pid or 0)

    other = {**ports, "ui_port": free_port()}
    odd = _survivor(DevStack(settings, **other), log)
    await _survivor_up(odd, ports["temporal_port"])
    stack = DevStack(settings, **ports)
    await stack.start()
    try:
        assert stack.stopped == [f"Temporal dev server (pid {odd.pid}, started with other options)"]
        assert not processes.alive(odd.pid) and port_open("127.0.0.1", ports["temporal_port"])
    finally:
        stack.stop()
    log.close()
    assert leftover_processes(str(tmp_path)) == []


def _output(dev: Dev) -> str:
    """What the last start of ``mlc dev`` printed so far."""
    return (dev.root / f"dev-{dev.starts}.out").read_text(errors="replace")


async def test_dev_restarts_after_kill_9_quietly_and_checks_nginx_for_its_gateways(tmp_path: Path) -> None:
    dev = Dev(tmp_path)
    await dev.start()  # nginx is installed here: the runtimes it creates get gateways
    try:
        first = _output(dev)
        password = (dev.home / "postgres.password").read_text().strip()
        assert password not in first, "the start-up table shows no password"
        assert f"(server only; password in {dev.home / 'postgres.password'})" in first, first
        assert f"{dev.home / 'worker.log'} (tracebacks of failed activities)" in first, first

        assert dev.process is not None
        dev.process.kill()
        await dev.process.wait()
        await dev.start()  # at once, same options: its Temporal server may still be shutting down
        restarted = _output(dev)
        assert "started with other options" not in restarted, restarted
        assert "stopped Temporal" not in restarted, restarted
        prod = next(r for r in await dev.json("runtime", "list") if r["name"] == "local-prod")
        assert await dev.stop(signal.SIGINT) == 0
        await wait_until(dev.nothing_left, what="SIGINT to stop everything", timeout=30)

        # another account listening on PROD's gateway port while the stack is down: refused
        port = prod["gateway"]["port"]
        squatter = await asyncio.create_subprocess_exec(
            "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "/usr/bin/python3", "-m", "http.server", "--bind", "127.0.0.1", str(port), cwd="/",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await wait_until(lambda: port_open("127.0.0.1", port), what="the squatter", timeout=10)
            squatted = await asyncio.to_thread(
                subprocess.run,
                dev.command(),
                env=dev.env,
                cwd=PROJECT,
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            squatter.kill()
            await squatter.wait()
        assert squatted.returncode == 5, squatted.stdout + squatted.stderr
        assert squatted.stderr.splitlines() == [
            f"error: port {port} of the gateway of runtime local-prod is held by pid {squatter.pid} "
            "(python3, user nobody), not by the gateway: stop it, or give the runtime another port "
            "(`mlc runtime add local-prod ... --gateway-port PORT --replace`)"
        ], squatted.stderr
        assert "mlc dev is running" not in squatted.stdout
        await wait_until(dev.nothing_left, what="a refused start to leave nothing running", timeout=30)

        missing = tmp_path / "no-nginx"
        refused = await asyncio.to_thread(
            subprocess.run,
            dev.command(),
            env={**dev.env, "MLC_NGINX": str(missing)},
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 10, refused.stdout + refused.stderr
        assert refused.stderr.splitlines() == [
            f"error: runtime local-dev's gateway (its stable endpoints) needs nginx, and MLC_NGINX={missing} "
            "is not a file: run scripts/system-deps.sh or apt-get install nginx-light (or set MLC_NGINX to "
            "an nginx binary)"
        ]
        assert "mlc dev is running" not in refused.stdout
        await wait_until(dev.nothing_left, what="a refused start to leave nothing running", timeout=30)
    finally:
        if dev.process is not None and dev.process.returncode is None:
            dev.process.kill()
            await dev.process.wait()
        await wait_until(dev.nothing_left, what="nothing left", timeout=30)


async def test_dev_without_nginx_or_bubblewrap_runs_without_gateways_or_uploaded_lifecycles(
    tmp_path: Path,
) -> None:
    dev = Dev(tmp_path)
    dev.env["MLC_NGINX"] = str(tmp_path / "no-nginx")  # and nothing there
    dev.env["PATH"] = str(Path(sys.executable).parent)  # no bwrap (nor nginx) on it
    await dev.start()
    missing = tmp_path / "no-nginx"
    try:
        shown = _output(dev)
        said = shown.split("mlc dev is running")[0].splitlines()  # what it said before its table
        notes = [line for line in said if "needs nginx" in line or "bubblewrap" in line]
        assert notes == [
            f"a runtime's gateway (its stable endpoints) needs nginx, and MLC_NGINX={missing} is not a file"
            ": run scripts/system-deps.sh or apt-get install nginx-light (or set MLC_NGINX to an "
            "nginx binary); until then the stack's runtimes have no gateway: consumers call each "
            "deployment's own endpoint",
            "uploaded lifecycles run only in a sandbox, and bubblewrap (bwrap) is not installed: run "
            "scripts/system-deps.sh or apt-get install bubblewrap; until then uploaded lifecycles are off",
        ], shown
        assert "mlc-lifecycles (off: no bubblewrap)" in shown
        listed = await dev.json("runtime", "list")
        assert sorted(r["name"] for r in listed) == ["local-dev", "local-prod", "local-sit", "local-uat"]
        assert all(r["gateway"] is None for r in listed), listed
        assert await dev.stop(signal.SIGINT) == 0
    finally:
        if dev.process is not None and dev.process.returncode is None:
            dev.process.kill()
            await dev.process.wait()
        await wait_until(dev.nothing_left, what="nothing left", timeout=30)


async def test_dev_keeps_its_home_to_itself_from_its_start(tmp_path: Path) -> None:
    """Before any model runs: the home lists for nobody else (0711) and nothing directly
    in it but the runtimes' folder is open to others (its logs, Temporal's database, keys)."""
    dev = Dev(tmp_path)
    dev.home.mkdir()
    dev.home.chmod(0o755)  # as a umask of 022 makes it
    (dev.home / "keys").mkdir(mode=0o755)
    (dev.home / "keys").chmod(0o755)
    await dev.start()
    try:
        assert stat.S_IMODE(dev.home.stat().st_mode) == 0o711
        entries = {
            e.name: e.lstat().st_mode
            for e in dev.home.iterdir()
            if e.name != "runtimes" and not e.is_symlink()
        }
        assert {"worker.log", "temporal.db", "keys"} <= entries.keys(), sorted(entries)
        open_to_others = {name: oct(mode) for name, mode in entries.items() if mode & 0o007}
        assert open_to_others == {}
        assert await dev.stop(signal.SIGTERM) == 0
    finally:
        if dev.process is not None and dev.process.returncode is None:
            dev.process.kill()
            await dev.process.wait()
        await wait_until(dev.nothing_left, what="nothing left", timeout=30)


HOSTILE_CODE = """

import os as _os
import sys as _sys

_MARKER = {marker!r}
_SLEEP = "import signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\ntime.sleep(3600)"


def _daemon(when):
    middle = _os.fork()
    if middle == 0:
        _os.setsid()
        if _os.fork() == 0:
            _os.execv(_sys.executable, [_sys.executable, "-c", _SLEEP, _MARKER + "-" + when])
        _os._exit(0)
    _os.waitpid(middle, 0)


_daemon("import")
_score = score


def score(record):
    _daemon("request")
    return _score(record)
"""


def hostile_package(root: Path, marker: str, version: int) -> Path:
    """weak-model, named ``hostile``, whose code double-forks a ``setsid`` daemon (SIGTERM
    ignored, the marker in its command line) when imported and on every request."""
    package = root / f"hostile-{version}"
    shutil.copytree(MODEL, package)
    manifest = package / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("name: weak-model", "name: hostile"))
    with (package / "score.py").open("a") as code:
        code.write(HOSTILE_CODE.format(marker=marker) + f"# version {version}\n")
    return package


def uid_of(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


async def test_a_hostile_models_daemons_end_with_reject_and_with_the_stack(tmp_path: Path) -> None:
    """DEV's shared host: ``mlc reject`` ends the model's daemons; a dedicated runtime: a
    restart of ``mlc dev`` after ``kill -9`` and its SIGTERM end them. Found by a marker in
    their command line and by uid."""
    assert isolation.isolating(), "mlc dev gives models their own user only as root"
    marker = f"mlc-dev-daemon-{os.urandom(8).hex()}"
    dev = Dev(tmp_path)
    await dev.start()

    async def at_gate(ref: str) -> bool:
        status = await dev.mlc("status", ref, "--json")
        return status.returncode == 0 and '"pending_gate": {' in status.stdout

    async def deployed_with_daemons(version: int) -> set[int]:
        registered = await dev.mlc("model", "register", str(hostile_package(tmp_path, marker, version)))
        assert registered.returncode == 0, registered.stdout + registered.stderr
        started = await dev.mlc("lifecycle", "start", f"hostile@{version}", "--spec", str(spec))
        assert started.returncode == 0, started.stderr
        await wait_until(lambda: at_gate(f"hostile@{version}"), what="the DEV gate", timeout=WAIT_SECONDS)
        found = processes.find_processes(marker)  # the smoke test asked it: both daemons run
        commands = " ".join(processes.command_line(pid) for pid in found)
        assert f"{marker}-import" in commands and f"{marker}-request" in commands, commands
        uids = {uid_of(pid) for pid in found}
        assert len(uids) == 1 and None not in uids and 0 not in uids
        return {uid for uid in uids if uid is not None}

    def nothing_of(uids: set[int], *, but_a_host: bool = False) -> bool:
        """No process carries the marker, and none runs as ``uids`` (but one shared host)."""
        left = [processes.command_line(pid) for uid in uids for pid in isolation.processes_of(uid)]
        hosts = [command for command in left if "serve-many" in command]
        return not processes.find_processes(marker) and (left == hosts if but_a_host else not left)

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    try:
        # a bystander in DEV's shared host, so the host outlives the rejected model
        registered = await dev.mlc("model", "register", str(MODEL))
        assert registered.returncode == 0, registered.stderr
        started = await dev.mlc("lifecycle", "start", "weak-model@1", "--spec", str(spec))
        assert started.returncode == 0, started.stderr
        await wait_until(lambda: at_gate("weak-model@1"), what="the DEV gate", timeout=WAIT_SECONDS)
        shared = await deployed_with_daemons(1)
        rejected = await dev.mlc("reject", "hostile@1", "--stage", "DEV", "--comment", "daemons")
        assert rejected.returncode == 0, rejected.stdout + rejected.stderr

        await wait_until(
            lambda: nothing_of(shared, but_a_host=True),
            what="reject to end every process of the model",
            timeout=60,
        )
        (bystander,) = [d for d in await dev.json("deployments") if d["model"] == "weak-model"]
        assert await wait_until(lambda: _health(bystander["endpoint"]), what="health", timeout=30)

        hosting = await dev.on_server_host(  # --replace is not offered through the API
            "runtime", "add", "local-dev", "--stage", "DEV", "--replace", "--hosting", "dedicated"
        )
        assert hosting.returncode == 0, hosting.stdout + hosting.stderr
        dedicated = await deployed_with_daemons(2)
        assert dedicated != shared

        # kill -9: the servers die with the stack, their daemons do not; the next start ends them
        survivors = set(processes.find_processes(marker))
        assert dev.process is not None
        dev.process.kill()
        await dev.process.wait()
        await dev.start()
        assert not survivors & set(processes.find_processes(marker)), "a killed stack's daemons live on"

        assert await dev.stop(signal.SIGTERM) == 0
        assert nothing_of(shared | dedicated), [
            processes.command_line(pid) for pid in processes.find_processes(marker)
        ]
        await wait_until(dev.nothing_left, what="SIGTERM to stop everything", timeout=30)
    finally:
        if dev.process is not None and dev.process.returncode is None:
            dev.process.kill()
            await dev.process.wait()
        for pid in processes.find_processes(marker):
            os.kill(pid, signal.SIGKILL)


def _survivor(stack: DevStack, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """A dev server started as ``stack`` starts it (as root: in a network namespace of its
    own), with no parent-death signal: what a killed stack leaves where none exists."""
    if dev_temporal.unguarded_because() is None:
        return dev_temporal.spawn_in_own_network(stack.temporal_args(), log=log, die_with_parent=False)
    return processes.spawn(stack.temporal_args(), log=log, die_with_parent=False)


async def _survivor_up(survivor: subprocess.Popen[bytes], port: int) -> None:
    """Wait for a survivor's port (in its own network namespace where it has one)."""
    if dev_temporal.unguarded_because() is None:
        await wait_until(lambda: dev_temporal.listening(survivor.pid, port), what="the survivor's port")
    else:
        await wait_until(lambda: port_open("127.0.0.1", port), what="the survivor's port")
