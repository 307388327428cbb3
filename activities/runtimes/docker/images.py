"""Model images for docker runtimes: built offline from a host wheelhouse, cached by digest.

An image holds one snapshot's package, the model server (a copy of the ``mlc`` modules it
needs) and their Python dependencies. Builds never use the network: no image registry is
assumed reachable, and a build container with network access would be a way out for model
code. Instead the host downloads wheels for the *base image's* Python (probed once per
build) into a cached wheelhouse, and the build installs from it with pip run from its own
wheel, because a minimal base image may have python3 but no pip (Debian's has no ensurepip).

Images are found again by labels: the snapshot's sha256, the base image name, and a build
digest covering the base image id, the Dockerfile and the server code. So a new snapshot,
another base image, a rebuilt base or an upgraded model server each get a new image, and
nothing else does.

A snapshot's requirements are hostile input: they are checked again here (snapshots
registered before the check existed) and reach pip only after ``--``, with wheels only
(no ``setup.py`` runs) from the index pip is configured with. pip's output is scrubbed
of the worker's environment values before it becomes a heartbeat, a log or an error.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker.errors

import mlc
from activities.runtimes.base import Heartbeat
from activities.runtimes.docker.engine import (
    Progress,
    docker_settings,
    engine_url,
    run_with_heartbeats,
)
from mlc.artifacts import ArtifactStore
from mlc.config import Settings
from mlc.domain import ModelSnapshot, Runtime
from mlc.errors import DeploymentFailedError
from mlc.manifest import check_requirement

PACKAGE_DIR = "/opt/model"
"""Where the snapshot's package sits inside every model image."""

SERVER_DISTRIBUTIONS = (
    "starlette", "uvicorn", "uvloop", "httptools", "orjson", "pyyaml", "pydantic", "packaging",
    "confluent-kafka", "httpx", "httpcore",
)  # fmt: skip
"""What ``mlc.serving`` and ``mlc.streaming`` import (``packaging`` lets the server check
requirement versions; ``confluent-kafka`` is the streaming consumer's client, ``httpx``
how it reaches the model server that scores for it)."""

MLC_SOURCES = (
    "__init__.py", "domain.py", "errors.py", "kafka_settings.py", "manifest.py", "serving",
    "cgroups.py", "isolation.py", "processes.py",  # what serving's fork server imports
    "streaming/__init__.py", "streaming/__main__.py", "streaming/consumer.py", "streaming/inflight.py",
    "streaming/settings.py",
)  # fmt: skip
"""The parts of the ``mlc`` package the model server and the streaming consumer import; the
rest stays out of images. ``tests/test_image_sources.py`` checks it is exactly the import
closure of the ``python -m`` commands the drivers run in containers."""

_PIP_WHEEL = "pip.whl"
"""The pip wheel's name in the build context: fixed, so the Dockerfile does not depend on it."""

_LOG_TAIL_LINES = 30

_SCRUB_MIN_LENGTH = 9
"""Environment values at least this long are replaced in pip's output (shorter ones are
words like ``C.UTF-8`` or ``/root`` that would garble it without hiding a secret)."""

_PROBE = (
    "import platform, sys; print(sys.implementation.name, *sys.version_info[:2], "
    "platform.machine(), *platform.libc_ver())"
)
"""Prints e.g. ``cpython 3 11 x86_64 glibc 2.36``: what pip needs to pick wheels for the image."""


@dataclass(frozen=True)
class ModelImage:
    """An image ready to run a snapshot."""

    id: str
    tag: str
    built: bool
    """False when an existing image was reused."""
    seconds: float
    """Time spent finding or building it."""


@dataclass(frozen=True)
class PythonTarget:
    """The Python inside a base image, as ``pip download`` needs to describe it."""

    major: int
    minor: int
    platforms: tuple[str, ...]
    """Wheel platform tags it accepts, most specific first."""

    def pip_args(self) -> list[str]:
        """``pip download`` options selecting wheels for this interpreter."""
        args = [
            "--python-version", f"{self.major}.{self.minor}",
            "--implementation", "cp",
            "--abi", f"cp{self.major}{self.minor}",
        ]  # fmt: skip
        for platform in self.platforms:
            args += ["--platform", platform]
        return args


_LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


def manylinux_platforms(glibc: str, machine: str) -> tuple[str, ...]:
    """Every manylinux tag a glibc ``glibc`` (e.g. ``2.36``) system on ``machine`` runs.

    pip does not widen an explicit ``--platform manylinux_2_36_x86_64`` to older glibc
    versions (which is what most wheels are built for), so the list is spelled out.
    """
    major, _, minor = glibc.partition(".")
    tags: list[str] = []
    for version in range(int(minor), 4, -1):
        tags.append(f"manylinux_{major}_{version}_{machine}")
        if major == "2" and version in _LEGACY_MANYLINUX:
            tags.append(f"{_LEGACY_MANYLINUX[version]}_{machine}")
    return tuple(tags)


def image_tag(snapshot: ModelSnapshot) -> str:
    """``mlc-model/<model>:<version>-<sha[:12]>``: readable, and unique per snapshot."""
    return f"mlc-model/{snapshot.model}:{snapshot.version}-{snapshot.sha256[:12]}"


def platform_requirements() -> list[str]:
    """The server's and consumer's dependencies, pinned to this host's versions.

    Pinning makes the container run the versions the orchestrator was tested with, and
    keeps the wheelhouse key stable while the host environment is unchanged.
    """
    pinned = []
    for name in SERVER_DISTRIBUTIONS:
        try:
            pinned.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pinned.append(name)
    return pinned


def server_requirements(snapshot: ModelSnapshot) -> list[str]:
    """What the model server's environment installs: :func:`platform_requirements` and the
    snapshot's own requirements, resolved together so the model gets versions that agree.

    Raises:
        DeploymentFailedError: a requirement of the snapshot is not a plain index requirement.
    """
    for entry in snapshot.requirements:
        try:
            check_requirement(entry)
        except ValueError as exc:
            raise DeploymentFailedError(
                f"{snapshot.ref}: {exc}. Fix manifest.yaml and register a new version."
            ) from None
    return [*platform_requirements(), *snapshot.requirements]


MODEL_SITE = "/opt/site"
"""The model server's packages: the platform's and the model's, resolved together."""
PLATFORM_SITE = "/opt/mlc-site"
"""The platform's packages only: what the streaming consumer imports. A model's wheels can
ship modules named like the standard library's (``ctypes/``, ``logging/``) and would run
first from ``MODEL_SITE``; the consumer, which holds the broker's credentials and network,
never has that folder on its path."""
CONSUMER_PATH = ("/opt/mlc", PLATFORM_SITE)


def consumer_command(*args: str, path: tuple[str, ...] = CONSUMER_PATH) -> list[str]:
    """``python -m mlc.streaming ARGS`` isolated from the image's ``PYTHONPATH`` (``-I``:
    no environment variables, user site or working directory on the path) with only
    ``path`` in front of the standard library."""
    boot = (
        f"import sys; sys.path[:0] = {list(path)!r}; import runpy; "
        "runpy.run_module('mlc.streaming', run_name='__main__', alter_sys=True)"
    )
    return ["python3", "-I", "-B", "-u", "-c", boot, *args]


def _pip_install(requirements: list[str], target: str) -> str:
    install = [
        "python3", f"/build/{_PIP_WHEEL}/pip", "install",
        "--no-index", "--find-links", "/build/wheels", "--only-binary=:all:", "--target", target,
        "--no-warn-script-location", "--disable-pip-version-check", "--no-cache-dir",
        "--root-user-action=ignore",
        "--", *requirements,
    ]  # fmt: skip
    return f"RUN {json.dumps(install)}"


def render_dockerfile(base_image: str, requirements: list[str]) -> str:
    """The model image's Dockerfile (two stages, so the wheels stay out of the final image)."""
    compile_sources = ["python3", "-m", "compileall", "-q", "/opt/mlc", PACKAGE_DIR]
    return "\n".join(
        [
            f"FROM {base_image} AS deps",
            f"COPY {_PIP_WHEEL} /build/{_PIP_WHEEL}",
            "COPY wheels /build/wheels",
            _pip_install(requirements, MODEL_SITE),
            _pip_install(platform_requirements(), PLATFORM_SITE),
            "",
            f"FROM {base_image}",
            f"COPY --from=deps {MODEL_SITE} {MODEL_SITE}",
            f"COPY --from=deps {PLATFORM_SITE} {PLATFORM_SITE}",
            "COPY mlc /opt/mlc/mlc",
            f"COPY model {PACKAGE_DIR}",
            # Containers run with a read-only root: compile now, never write bytecode later.
            f"RUN {json.dumps(compile_sources)}",
            f"ENV PYTHONPATH=/opt/mlc:{MODEL_SITE} HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1",
            "USER 65534:65534",
            "WORKDIR /tmp",
            "",
        ]
    )


def _mlc_source_files() -> Iterator[tuple[str, Path]]:
    """(path relative to the ``mlc`` package, file) for every source file images carry."""
    root = Path(mlc.__file__).resolve().parent
    for entry in MLC_SOURCES:
        path = root / entry
        files = [path] if path.is_file() else sorted(path.rglob("*.py"))
        for file in files:
            if "__pycache__" not in file.parts:
                yield file.relative_to(root).as_posix(), file


def _mlc_source_digest() -> str:
    digest = hashlib.sha256()
    for rel, file in _mlc_source_files():
        digest.update(rel.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def build_digest(*, base_image_id: str, dockerfile: str) -> str:
    """What, besides the snapshot, decides an image's content."""
    digest = hashlib.sha256()
    for part in (base_image_id, dockerfile, _mlc_source_digest()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


async def ensure_image(
    client: Any,
    *,
    settings: Settings,
    runtime: Runtime,
    snapshot: ModelSnapshot,
    heartbeat: Heartbeat,
    log_path: Path,
) -> ModelImage:
    """Return the image for ``snapshot`` on ``runtime``'s base image, building it if needed.

    Args:
        client: An open ``docker.DockerClient`` for the runtime's engine.
        settings: Where the artifact store and the wheelhouse cache are.
        runtime: The docker runtime (its ``docker.base_image`` is the base).
        snapshot: The snapshot to package.
        heartbeat: Receives progress notes during downloads and builds.
        log_path: Where the full build log is written.

    Raises:
        DeploymentFailedError: the base image is missing or has no usable python3, wheels
            could not be downloaded, or the build failed (with the log's last lines).
    """
    started = time.monotonic()
    base = docker_settings(runtime).base_image
    requirements = server_requirements(snapshot)
    dockerfile = render_dockerfile(base, requirements)
    tag = image_tag(snapshot)
    labels = {
        "mlc.model": snapshot.model,
        "mlc.version": str(snapshot.version),
        "mlc.sha256": snapshot.sha256,
        "mlc.service-tags": ",".join(snapshot.service_tags),
        "mlc.base-image": base,
    }
    # Two inspects at once: the base image, and the image the snapshot's tag names, which
    # is the one to use when its labels match (a deploy with a cached image waits for
    # nothing else; listing images by label scans them all: 0.2-0.5 s with a thousand).
    base_id, tagged = await asyncio.gather(_base_image_id(client, runtime, base), _tagged(client, tag))
    labels["mlc.build-digest"] = build_digest(base_image_id=base_id, dockerfile=dockerfile)
    found = _newest([tagged] if tagged is not None else [], labels)
    if found is None:
        found = _newest(await _find_images(client, labels), labels)
    if found is not None:
        if tag not in found.tags:
            repository, _, version = tag.partition(":")
            await asyncio.to_thread(found.tag, repository, version)
        return ModelImage(id=found.id, tag=tag, built=False, seconds=time.monotonic() - started)

    heartbeat(f"probing python3 in base image {base}")
    target = await _probe_python(client, runtime, base)
    wheels = await run_with_heartbeats(
        lambda progress: download_wheelhouse(
            settings, ["pip", *requirements], target, progress, snapshot=snapshot
        ),
        heartbeat,
        first_note=f"downloading wheels for {snapshot.ref}",
    )
    image_id = await run_with_heartbeats(
        lambda progress: _build(
            client,
            runtime=runtime,
            settings=settings,
            snapshot=snapshot,
            wheels=wheels,
            dockerfile=dockerfile,
            tag=tag,
            labels=labels,
            log_path=log_path,
            progress=progress,
        ),
        heartbeat,
        first_note=f"building image {tag}",
    )
    return ModelImage(id=image_id, tag=tag, built=True, seconds=time.monotonic() - started)


async def _base_image_id(client: Any, runtime: Runtime, base: str) -> str:
    try:
        image = await asyncio.to_thread(client.images.get, base)
    except docker.errors.ImageNotFound:
        raise DeploymentFailedError(
            f"runtime {runtime.name}: base image {base!r} is not on the docker engine at "
            f"{engine_url(runtime)}, and images are never pulled. Run scripts/docker-engine.sh "
            "to build mlc-python:3.11-bookworm and set the runtime's docker.base_image to it, "
            f"or `docker pull`/`docker build` an image with python3 and tag it {base!r}."
        ) from None
    return str(image.id)


async def _tagged(client: Any, tag: str) -> Any:
    """The image ``tag`` names, or None."""
    try:
        return await asyncio.to_thread(client.images.get, tag)
    except docker.errors.ImageNotFound:
        return None


async def _find_images(client: Any, labels: dict[str, str]) -> list[Any]:
    """The images carrying every one of ``labels`` (the service tags may differ)."""
    selector = [f"{key}={value}" for key, value in labels.items() if key != "mlc.service-tags"]
    return list(await asyncio.to_thread(lambda: client.images.list(filters={"label": selector})))


def _newest(images: list[Any], labels: dict[str, str]) -> Any:
    """The newest of ``images`` carrying every one of ``labels`` (service tags aside), or None."""
    wanted = {key: value for key, value in labels.items() if key != "mlc.service-tags"}
    matching = [
        image
        for image in images
        if all((image.labels or {}).get(key) == value for key, value in wanted.items())
    ]
    if not matching:
        return None
    return max(matching, key=lambda image: str(image.attrs.get("Created", "")))


async def _probe_python(client: Any, runtime: Runtime, base: str) -> PythonTarget:
    """Ask the base image's python3 which wheels it can use."""

    def probe() -> str:
        output = client.containers.run(
            base, ["python3", "-c", _PROBE], remove=True, network_mode="none", stderr=True
        )
        return bytes(output).decode(errors="replace")

    try:
        words = (await asyncio.to_thread(probe)).split()
    except (docker.errors.ContainerError, docker.errors.APIError) as exc:
        raise DeploymentFailedError(
            f"runtime {runtime.name}: base image {base!r} cannot run python3 ({exc}); "
            "model images need a base image with python3 >= 3.11 on glibc"
        ) from exc
    if len(words) != 6 or words[0] != "cpython" or words[4] != "glibc":
        raise DeploymentFailedError(
            f"runtime {runtime.name}: base image {base!r} has {' '.join(words) or 'no python3'}; "
            "model images need CPython >= 3.11 on glibc (manylinux wheels)"
        )
    return PythonTarget(
        major=int(words[1]), minor=int(words[2]), platforms=manylinux_platforms(words[5], words[3])
    )


def download_wheelhouse(
    settings: Settings,
    requirements: list[str],
    target: PythonTarget,
    progress: Progress,
    *,
    snapshot: ModelSnapshot,
) -> Path:
    """Return a directory of wheels for ``requirements`` on ``target``, downloading once.

    Cached under ``settings.cache_dir/wheelhouse/<hash of requirements and target>``;
    the download goes to a temporary folder renamed into place, so a crash never leaves a
    half-filled wheelhouse that later builds would trust. pip runs in that empty folder
    (so no requirement can name a local file), with wheels only, from the index its own
    configuration names, and ``--`` before the requirements.

    Raises:
        DeploymentFailedError: pip could not find wheels (with pip's last lines).
    """
    key_source = json.dumps({"requirements": sorted(requirements), "target": target.pip_args()})
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    root = settings.cache_dir / "wheelhouse"
    dest = root / key
    if dest.is_dir():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    command = [
        sys.executable, "-m", "pip", "download", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        "--dest", str(partial), *target.pip_args(), "--", *requirements,
    ]  # fmt: skip
    scrub = environment_scrubber()
    tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
    with subprocess.Popen(
        command, cwd=partial, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as pip:
        assert pip.stdout is not None  # stdout=PIPE
        for line in pip.stdout:
            clean = scrub(line.rstrip())
            tail.append(clean)
            progress(f"pip download: {clean.strip()[:200]}")
    if pip.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise DeploymentFailedError(
            f"{snapshot.ref}: could not download wheels for Python {target.major}.{target.minor} "
            f"(glibc, {target.platforms[0]}) with `pip download --only-binary=:all:`; check the model's "
            "requirements in manifest.yaml and that the package index is reachable. pip said:\n"
            + "\n".join(tail)
        )
    try:
        os.rename(partial, dest)
    except OSError:  # another build filled it first; theirs is as good as ours
        shutil.rmtree(partial, ignore_errors=True)
    return dest


def environment_scrubber(environ: Mapping[str, str] | None = None) -> Callable[[str], str]:
    """A function that replaces each long value of ``environ`` (default: ours) with ``$NAME``.

    pip echoes URLs, paths and the errors of whatever it contacted; the worker's
    environment holds database URLs, tokens and passwords, and pip's output becomes
    heartbeat details and error messages that everyone with Web UI access reads.
    """
    names: dict[str, str] = {}
    for name, value in sorted((os.environ if environ is None else environ).items()):
        if len(value) >= _SCRUB_MIN_LENGTH:
            names.setdefault(value, name)
    if not names:
        return str
    # Longest first, so a value containing another is replaced whole.
    pattern = re.compile("|".join(re.escape(v) for v in sorted(names, key=len, reverse=True)))

    def scrub(text: str) -> str:
        return pattern.sub(lambda match: f"${names[match.group()]}", text)

    return scrub


def _write_context(
    context: Path, *, settings: Settings, snapshot: ModelSnapshot, wheels: Path, dockerfile: str
) -> None:
    """Lay out the build context: Dockerfile, pip wheel, wheels, mlc sources, model."""
    (context / "Dockerfile").write_text(dockerfile)
    (context / "wheels").mkdir()
    pip_wheels = sorted(wheels.glob("pip-*.whl"))
    if not pip_wheels:
        raise DeploymentFailedError(f"{snapshot.ref}: the wheelhouse {wheels} has no pip wheel")
    for wheel in wheels.iterdir():
        _link_or_copy(wheel, context / "wheels" / wheel.name)
    _link_or_copy(pip_wheels[-1], context / _PIP_WHEEL)
    for rel, file in _mlc_source_files():
        dest = context / "mlc" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, dest)
    ArtifactStore(settings.artifact_dir).unpack(snapshot.sha256, context / "model")


def _link_or_copy(source: Path, dest: Path) -> None:
    """Hard-link (wheelhouse and context share a filesystem) and copy only when that fails."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def _build(
    client: Any,
    *,
    runtime: Runtime,
    settings: Settings,
    snapshot: ModelSnapshot,
    wheels: Path,
    dockerfile: str,
    tag: str,
    labels: dict[str, str],
    log_path: Path,
    progress: Progress,
) -> str:
    """Build the image without network, streaming the log to ``log_path``; return its id."""
    builds = settings.cache_dir / "build"
    builds.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    scrub = environment_scrubber()
    tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
    image_id: str | None = None
    error: str | None = None
    with tempfile.TemporaryDirectory(dir=builds) as tmp, log_path.open("w") as log:
        context = Path(tmp)
        _write_context(context, settings=settings, snapshot=snapshot, wheels=wheels, dockerfile=dockerfile)
        stream = client.api.build(
            path=str(context),
            tag=tag,
            labels=labels,
            network_mode="none",
            pull=False,
            rm=True,
            forcerm=True,
            decode=True,
        )
        for chunk in stream:
            text = scrub(str(chunk.get("stream") or chunk.get("status") or ""))
            if chunk.get("error"):
                error = scrub(str(chunk["error"]))
                text = error
            if "aux" in chunk and isinstance(chunk["aux"], dict) and "ID" in chunk["aux"]:
                image_id = str(chunk["aux"]["ID"])
            if text.strip():
                log.write(text if text.endswith("\n") else text + "\n")
                tail.extend(line for line in text.rstrip().splitlines() if line.strip())
                progress(f"building {tag}: {tail[-1][:200]}")
    if error is not None or image_id is None:
        raise DeploymentFailedError(
            f"runtime {runtime.name}: building image {tag} for {snapshot.ref} on base "
            f"{labels['mlc.base-image']!r} failed: {error or 'the engine reported no image id'}. "
            f"Full log: {log_path}. Last lines:\n" + "\n".join(tail)
        )
    return image_id
