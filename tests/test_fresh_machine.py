"""The newcomer's path: the README's quick start, verbatim, on a clean Debian machine.

A Debian image with nothing but ``python3``, ``python3-venv``, ``git`` and ``ca-certificates``
(debootstrap, through ``scripts/docker-engine.sh`` with ``MLC_BASE_PACKAGES``) stands in for
a fresh machine. It is built once and tagged with a digest of its recipe (the package list
and the script), so a changed recipe builds a new image and the old one is removed.

Each path gets a fresh container of it, run as root on the host's network with what a VM's
root has and a container lacks by default: ``SYS_ADMIN`` and ``NET_ADMIN``, no seccomp or
AppArmor profile, and ``systempaths=unconfined`` (bubblewrap mounts a new /proc for the
lifecycle sandbox's pid namespace, which the kernel refuses while /proc has the paths Docker
masks). ``--init`` reaps orphans as a machine's init does. In it the checkout's HEAD is
cloned into a fresh folder (committed state only: uncommitted changes are not in the clone,
as they would not be in a newcomer's), HOME is an empty folder, and the README's first
quick-start command runs as written. It must exit 0, say that the model serves in PROD at
its stable endpoint, and show no traceback.

The ``--no-yes`` path runs in a second fresh container rather than after the first run in the
same one: reusing it would save only the few seconds apt takes, and would start the second
run with nginx and bubblewrap installed, hiding a fresh machine's failure of that path. Each
gate is approved from a second ``docker exec`` shell (same HOME, as a second terminal) with
exactly what the demo prints: its "approve from another terminal" line, then each
``mlc approve`` command.

The container gets from this machine only its way to the package registries, read-only:
``/etc/apt`` (sources, keys, settings), the CA certificates, pip's configuration files (the
user's into the container's HOME, where a newcomer has them), the ``PIP_*`` variables and the
local folders those name (e.g. ``PIP_FIND_LINKS``).

Measured here (2 cores shared with other jobs): the image ~70 s, once per recipe; each path
50 to 70 s (apt, venv and locked wheels from the index, then the demo), up to 3 minutes when
the machine is loaded; the module about 2 minutes with the image cached.
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import os
import queue
import re
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = "python3,python3-venv,git,ca-certificates"
"""What the clean machine has: Python with venv, git to clone, CA certificates for HTTPS."""
IMAGE_REPOSITORY = "mlc-fresh-debian"
NEWCOMER = "/newcomer"
CLONE = f"{NEWCOMER}/mlc"
HOME = f"{NEWCOMER}/home"
BUNDLE = "/mnt/mlc.bundle"
RUN_SECONDS = 900
"""A quick start that takes longer is broken (each took about a minute here)."""
DEMO_PORTS = (7233, 8233)
"""The embedded stack's Temporal and Web UI ports, on the host's network (shared with the host)."""
CAPABILITIES = [
    "--cap-add", "SYS_ADMIN",
    "--cap-add", "NET_ADMIN",
    "--security-opt", "seccomp=unconfined",
    "--security-opt", "apparmor=unconfined",
    "--security-opt", "systempaths=unconfined",
]  # fmt: skip
SERVES_IN_PROD = re.compile(r"serves in PROD at its stable endpoint http://\S+")
HINT = re.compile(r"approve from another terminal: (?P<prepare>.+?), then run each")
APPROVE = re.compile(r"^\s*(?P<command>mlc approve \S+ --stage (?P<stage>\S+).*)$")


def quick_start() -> str:
    """The README's first quick-start command (the code block under "Quick start")."""
    section = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README.md's quick start has no sh code block"
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    return next(command for command in commands if command)


def image_tag() -> str:
    """The clean image's tag: a digest of its recipe."""
    recipe = hashlib.sha256(PACKAGES.encode())
    recipe.update((ROOT / "scripts" / "docker-engine.sh").read_bytes())
    return f"{IMAGE_REPOSITORY}:{recipe.hexdigest()[:12]}"


@pytest.fixture(scope="module")
def fresh_image(docker_engine: Any) -> str:
    """The clean Debian image, built when its tag is missing; older recipes' tags removed."""
    import docker.errors

    tag = image_tag()
    started = time.monotonic()
    built = subprocess.run(
        [str(ROOT / "scripts" / "docker-engine.sh")],
        env={**os.environ, "MLC_BASE_IMAGE": tag, "MLC_BASE_PACKAGES": PACKAGES},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    print(f"clean image {tag}: {time.monotonic() - started:.1f}s ({built.stdout.splitlines()[-1]})")
    for image in docker_engine.images.list(name=IMAGE_REPOSITORY):
        for old in image.tags:
            if old != tag:
                with contextlib.suppress(docker.errors.APIError):  # in use by a running test
                    docker_engine.images.remove(old)
    return tag


INDEX_SETTINGS = ("index-url", "extra-index-url", "index_url", "extra_index_url")
"""pip settings naming package indexes (keys in pip.conf, suffixes of PIP_* variables)."""


def _local_paths(setting: str, value: str) -> Iterator[Path]:
    """Existing local paths a pip setting names (plain or ``file://``); for a local index, the
    folder around it, because its pages link to files beside it (e.g. ``../../files/``)."""
    for token in value.split():
        path = Path(token.removeprefix("file://"))
        if path.is_absolute() and path.exists():
            yield path.parent if setting.lower().endswith(INDEX_SETTINGS) else path


def registry_access() -> list[str]:
    """``docker run`` arguments giving the container this machine's way to the registries."""
    home = Path.home()
    mounts = {Path(p): Path(p) for p in ("/etc/apt", "/etc/ssl/certs", "/etc/pip.conf", "/etc/xdg/pip")}
    mounts |= {home / ".config" / "pip": Path(HOME) / ".config" / "pip", home / ".pip": Path(HOME) / ".pip"}
    pip_env = sorted(name for name in os.environ if name.startswith("PIP_"))
    settings = [(name, os.environ[name]) for name in pip_env]
    config_files = [
        Path("/etc/pip.conf"),
        Path("/etc/xdg/pip/pip.conf"),
        home / ".config" / "pip" / "pip.conf",
        home / ".pip" / "pip.conf",
    ]
    for config_file in config_files:
        if config_file.is_file():
            parser = configparser.RawConfigParser()
            parser.read(config_file)
            settings += [item for section in parser.sections() for item in parser[section].items()]
    named = {path: path for setting, value in settings for path in _local_paths(setting, value)}
    named = {path: path for path in named if not any(path.is_relative_to(m) for m in mounts)}
    arguments: list[str] = []
    for host, inside in {**named, **mounts}.items():
        if host.exists():
            arguments += ["--volume", f"{host}:{inside}:ro"]
    for name in pip_env:
        arguments += ["--env", name]  # its value comes from this process's environment
    return arguments


@contextlib.contextmanager
def fresh_machine(image: str, bundle: Path) -> Iterator[str]:
    """A fresh container of ``image`` with HEAD cloned at CLONE and an empty HOME; removed after."""
    name = f"mlc-fresh-{uuid.uuid4().hex[:10]}"
    command = [
        "docker", "run", "--detach", "--init", "--name", name, "--network", "host", *CAPABILITIES,
        *registry_access(), "--volume", f"{bundle}:{BUNDLE}:ro", image, "sleep", "infinity",
    ]  # fmt: skip
    started = subprocess.run(command, capture_output=True, text=True, timeout=60)
    try:
        assert started.returncode == 0, started.stderr
        cloned = shell(
            name,
            f"mkdir -p {HOME} && git clone -q -c advice.detachedHead=false {BUNDLE} {CLONE}",
            workdir="/",
        )
        assert cloned.returncode == 0, cloned.stdout
        yield name
    finally:
        subprocess.run(["docker", "rm", "--force", name], capture_output=True, timeout=60)


def shell(
    container: str, command: str, *, timeout: float = 120, workdir: str = CLONE
) -> subprocess.CompletedProcess[str]:
    """``command`` in a new shell of the newcomer (their HOME, in the clone)."""
    return subprocess.run(
        ["docker", "exec", "--env", f"HOME={HOME}", "--workdir", workdir, container, "sh", "-c", command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """The checkout's HEAD as a git bundle the container clones from."""
    path = tmp_path / "mlc.bundle"
    made = subprocess.run(
        ["git", "-C", str(ROOT), "bundle", "create", str(path), "HEAD"], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    return path


@pytest.fixture
def demo_ports_free() -> None:
    """The demo's fixed ports must be free: the container shares this host's network."""
    for port in DEMO_PORTS:
        with socket.socket() as probe:
            # as servers bind: connections of an earlier demo in TIME_WAIT do not hold the port
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                pytest.fail(f"port {port} is in use on this host; the demo in the container needs it")


def pump(stream: IO[str], into: queue.Queue[str | None]) -> None:
    """Every line of ``stream`` into ``into``, then None at its end."""
    for line in stream:
        into.put(line)
    into.put(None)


def assert_reached_prod(output: str) -> None:
    """What a newcomer must see at the end: PROD at the stable endpoint, no traceback."""
    assert SERVES_IN_PROD.search(output), output[-4000:]
    assert "Traceback (most recent call last)" not in output, output[-4000:]


@pytest.mark.timeout(RUN_SECONDS + 600)
@pytest.mark.usefixtures("demo_ports_free")
def test_quick_start_reaches_prod_on_a_fresh_machine(fresh_image: str, bundle: Path) -> None:
    command = quick_start()
    assert command == "./scripts/demo.sh", f"the README's quick start changed: {command!r}"
    with fresh_machine(fresh_image, bundle) as machine:
        started = time.monotonic()
        result = shell(machine, command, timeout=RUN_SECONDS)
        print(f"{command} on a fresh machine: {time.monotonic() - started:.1f}s")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "[system-deps] installed nginx-light bubblewrap" in result.stdout, result.stdout[-4000:]
    assert_reached_prod(result.stdout)


@pytest.mark.timeout(RUN_SECONDS + 600)
@pytest.mark.usefixtures("demo_ports_free")
def test_no_yes_path_is_approved_from_a_second_shell(fresh_image: str, bundle: Path) -> None:
    command = f"{quick_start()} --no-yes"
    assert f"`{command}`" in (ROOT / "README.md").read_text(), f"the README no longer names {command}"
    with fresh_machine(fresh_image, bundle) as machine:
        started = time.monotonic()
        demo = subprocess.Popen(
            ["docker", "exec", "--env", f"HOME={HOME}", "--workdir", CLONE, machine, "sh", "-c", command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert demo.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=pump, args=(demo.stdout, lines), daemon=True).start()
        output: list[str] = []
        prepare: str | None = None
        approved: list[str] = []
        deadline = time.monotonic() + RUN_SECONDS
        try:
            while (line := lines.get(timeout=max(deadline - time.monotonic(), 0.1))) is not None:
                output.append(line)
                if hint := HINT.search(line):
                    prepare = hint["prepare"]
                elif gate := APPROVE.match(line):
                    assert prepare, "the demo printed an approve command but not how to get `mlc`"
                    # A second terminal: the demo's own instructions, then its command.
                    second = shell(machine, f"{prepare} && {gate['command']}")
                    assert second.returncode == 0, f"{gate['command']}:\n{second.stdout}"
                    approved.append(gate["stage"])
            returncode = demo.wait(timeout=60)
        except queue.Empty:
            pytest.fail(f"{command} took over {RUN_SECONDS}s:\n{''.join(output)[-4000:]}")
        finally:
            demo.kill()
        print(f"{command} on a fresh machine, approving from a 2nd shell: {time.monotonic() - started:.1f}s")
    text = "".join(output)
    assert returncode == 0, text[-4000:]
    assert approved == ["DEV", "SIT", "UAT"], text[-4000:]
    assert_reached_prod(text)
