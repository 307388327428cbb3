"""Hostile model packages: refused at registration, never handed the worker's secrets.

Registration runs through the shared ``Stack.register`` (real PostgreSQL, artifact store
and worker), and every refusal is checked for what it leaves behind (nothing). The pip checks run real
``pip download`` with the index switched off, and the environment checks read a real
model server's ``/proc/<pid>/environ``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from activities.runtimes.base import BatchJobRequest, CleanupRequest, OnlineDeployRequest, UndeployRequest
from activities.runtimes.docker.images import (
    CONSUMER_PATH,
    MODEL_SITE,
    PLATFORM_SITE,
    PythonTarget,
    consumer_command,
    download_wheelhouse,
    environment_scrubber,
    render_dockerfile,
    server_requirements,
)
from activities.runtimes.local.driver import LocalDriver
from activities.runtimes.local.layout import HOST_DIR
from mlc.artifacts import ArtifactStore, PackageLimits, build_archive
from mlc.config import Settings
from mlc.domain import HostingMode, ModelSnapshot, Runtime
from mlc.errors import DeploymentFailedError, InvalidPackageError
from mlc.manifest import load_manifest
from mlc.store import snapshots
from tests.conftest import Stack, call_model

SECRET = "s3cr3t-token-planted-by-the-test"
DATABASE_SECRET = "postgresql://mlc:hunter2-planted@127.0.0.1:1/inventory"

MANIFEST = """\
name: hostile
service_tags: [hostile]
requirements: {requirements}
evaluation:
  path: {evaluation}
  label: y
  score_field: p
"""

SCORE = """\
import os

def score(record):
    return {"p": 0.5, "home": os.environ.get("HOME"), "keys": sorted(os.environ)}
"""


def write_package(
    root: Path, *, requirements: str = "[]", evaluation: str = "data/eval.jsonl", manifest: str | None = None
) -> Path:
    """A small valid package, with whatever the test changes."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "eval.jsonl").write_text('{"x": 1, "y": 1}\n{"x": 2, "y": 0}\n')
    (root / "score.py").write_text(SCORE)
    text = manifest or MANIFEST.format(requirements=requirements, evaluation=evaluation)
    (root / "manifest.yaml").write_text(text)
    return root


async def refused(stack: Stack, package: Path) -> str:
    """Register ``package``, expect a refusal, check nothing was stored; return the message."""
    with pytest.raises(InvalidPackageError) as caught:
        await stack.register(package)
    assert await snapshots.read_snapshots(stack.pool) == []
    artifacts = stack.settings.artifact_dir
    assert not artifacts.exists() or not any(p.is_file() for p in artifacts.rglob("*"))
    return str(caught.value)


@pytest.mark.parametrize(
    "entry",
    [
        "-r/proc/self/environ",
        "--index-url=http://127.0.0.1:1/",
        "foo @ file:///etc/passwd",
        "../x",
        "/etc/passwd",
        "--no-binary=:all:",
        "local-wheel.whl",
    ],
)
async def test_requirement_that_is_not_a_plain_index_requirement_is_refused(
    stack: Stack, tmp_path: Path, entry: str
) -> None:
    package = write_package(tmp_path / "pkg", requirements=json.dumps(["orjson>=3", entry]))
    message = await refused(stack, package)
    assert f"requirement {entry!r}" in message
    assert "manifest.yaml" in message
    assert "e.g. 'scikit-learn>=1.4'" in message


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "data/../../outside.jsonl"])
async def test_evaluation_path_outside_the_package_is_refused(
    stack: Stack, tmp_path: Path, path: str
) -> None:
    (tmp_path / "outside.jsonl").write_text('{"x": 1, "y": 1}\n')
    message = await refused(stack, write_package(tmp_path / "pkg", evaluation=path))
    assert f"evaluation.path {path!r} must be a relative path inside the package" in message


async def test_symlink_to_etc_passwd_is_refused(stack: Stack, tmp_path: Path) -> None:
    package = write_package(tmp_path / "pkg")
    (package / "data" / "notes.txt").symlink_to("/etc/passwd")
    message = await refused(stack, package)
    assert "data/notes.txt is a symbolic link to /etc/passwd, outside the package" in message
    assert "root:" not in message  # the file's content never shows


async def test_evaluation_data_linked_outside_is_refused_by_the_manifest_check(
    stack: Stack, tmp_path: Path
) -> None:
    package = write_package(tmp_path / "pkg")
    (package / "data" / "eval.jsonl").unlink()
    (package / "data" / "eval.jsonl").symlink_to("/etc/passwd")
    message = await refused(stack, package)
    assert "evaluation.path data/eval.jsonl resolves to /etc/passwd, outside the package" in message


async def test_linked_folder_and_linked_manifest_outside_are_refused(stack: Stack, tmp_path: Path) -> None:
    package = write_package(tmp_path / "pkg")
    (package / "etc").symlink_to("/etc", target_is_directory=True)
    assert "etc is a symbolic link to /etc, outside the package" in await refused(stack, package)

    other = write_package(tmp_path / "other")
    outside = tmp_path / "elsewhere.yaml"
    shutil.move(other / "manifest.yaml", outside)
    (other / "manifest.yaml").symlink_to(outside)
    assert f"the manifest manifest.yaml resolves to {outside}, outside the package" in await refused(
        stack, other
    )


async def test_fifo_is_refused_without_hanging(stack: Stack, tmp_path: Path) -> None:
    package = write_package(tmp_path / "pkg")
    os.mkfifo(package / "data" / "pipe")
    message = await refused(stack, package)
    assert "data/pipe is not a regular file" in message


async def test_a_sparse_file_past_the_unpacked_limit_is_refused_without_being_read(
    stack: Stack, tmp_path: Path
) -> None:
    """8 GiB of holes (no disk, gzip would make it a few MB): refused by its size alone."""
    package = write_package(tmp_path / "pkg")
    with (package / "data" / "huge.bin").open("wb") as huge:
        huge.truncate(8 << 30)
    started = time.monotonic()
    message = await refused(stack, package)
    assert (
        "it unpacks to more than 4,294,967,296 bytes (the limit, MLC_MAX_PACKAGE_UNPACKED_BYTES)" in message
    )
    assert time.monotonic() - started < 5, "refused before reading the file"


@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        ("MLC_MAX_PACKAGE_ARCHIVE_BYTES", "its archive is more than 20,000 bytes"),
        ("MLC_MAX_PACKAGE_UNPACKED_BYTES", "it unpacks to more than 20,000 bytes"),
        ("MLC_MAX_PACKAGE_FILES", "it holds more than 5 files and folders"),
    ],
)
async def test_packages_over_a_configured_limit_are_refused(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, expected: str
) -> None:
    package = write_package(tmp_path / "pkg")
    (package / "data" / "noise.bin").write_bytes(os.urandom(30_000))  # incompressible
    for i in range(5):
        (package / "data" / f"extra-{i}.txt").write_text("x")
    monkeypatch.setenv(variable, "5" if variable == "MLC_MAX_PACKAGE_FILES" else "20000")
    message = await refused(stack, package)
    assert message.startswith(f"{package}: {expected}") and variable in message, message


def _archive(*members: tuple[str, int, bytes | None]) -> bytes:
    """A ``.tar.gz`` of (name, declared size, content): content None writes the header only."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, size, content in members:
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, None if content is None else io.BytesIO(content))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("archive", "expected"),
    [
        # 64 MiB of zeros: a 64 KiB gzip bomb
        (
            lambda: _archive(("score.py", 1, b"x"), ("zeros.bin", 64 << 20, bytes(64 << 20))),
            "unpacks to more",
        ),
        # a header claiming a terabyte, with nothing behind it
        (lambda: _archive(("score.py", 1, b"x"), ("tera.bin", 1 << 40, None)), "unpacks to more"),
        # an inode bomb: many empty files
        (lambda: _archive(*[(f"f{i}", 0, b"") for i in range(200)]), "holds more than 100 files"),
    ],
)
def test_an_archive_bomb_in_the_store_is_refused_before_it_is_unpacked(
    tmp_path: Path, archive: Any, expected: str
) -> None:
    """An archive no registration here would have made (a host with higher limits, a
    store written by hand): the runtime refuses it member by member, writing nothing big."""
    limits = PackageLimits(archive_bytes=1 << 20, unpacked_bytes=1 << 20, files=100)
    store = ArtifactStore(tmp_path / "artifacts", limits=limits)
    sha = store.put(archive())
    dest = tmp_path / "deployment"
    with pytest.raises(InvalidPackageError, match=expected) as caught:
        store.unpack(sha, dest)
    assert str(caught.value).startswith(f"artifact {sha[:12]}: ")
    assert not dest.exists() or sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) == 0


def test_an_archive_over_the_size_limit_is_not_even_read(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts", limits=PackageLimits(archive_bytes=1000))
    sha = store.put(_archive(("noise.bin", 5000, os.urandom(5000))))
    with pytest.raises(InvalidPackageError, match="its archive is more than 1,000 bytes"):
        store.unpack(sha, tmp_path / "deployment")


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        (
            "name: hostile\nservice_tags: [hostile]\nentry_module: ..etc.passwd\n",
            "entry_module '..etc.passwd' must be a dotted Python module name",
        ),
        (
            "name: hostile\nservice_tags: [hostile]\nthresholds: &a {x: 1}\ndescription: *a\n",
            "aliases (*a) are not allowed in a manifest",
        ),
        ("name: hostile\nservice_tags: [hostile]\ndescription: '" + "x" * 1_100_000 + "'\n", "bytes is more"),
    ],
)
async def test_hostile_manifest_shapes_are_refused(
    stack: Stack, tmp_path: Path, manifest: str, expected: str
) -> None:
    message = await refused(stack, write_package(tmp_path / "pkg", manifest=manifest))
    assert expected in message


async def test_honest_package_with_an_inside_link_still_registers(stack: Stack, tmp_path: Path) -> None:
    package = write_package(
        tmp_path / "pkg", requirements='["orjson>=3", "numpy>=1.26; python_version >= \\"3.11\\""]'
    )
    (package / "data" / "latest.jsonl").symlink_to("eval.jsonl")
    snap = await stack.register(package)
    assert snap.requirements == ("orjson>=3", 'numpy>=1.26; python_version >= "3.11"')
    assert [s.version for s in await snapshots.read_snapshots(stack.pool)] == [1]
    unpacked = ArtifactStore(stack.settings.artifact_dir).unpack(snap.sha256, tmp_path / "unpacked")
    assert (unpacked / "data" / "latest.jsonl").read_text() == (package / "data" / "eval.jsonl").read_text()


# --- pip, where docker runtimes install a snapshot's requirements ----------------------


def snapshot_with(requirements: tuple[str, ...]) -> ModelSnapshot:
    """A snapshot as an older inventory may hold it: requirements never checked."""
    return ModelSnapshot(
        model="hostile", version=1, sha256="ab" * 32, service_tags=("hostile",), entry_module="score",
        requirements=requirements,
    )  # fmt: skip


def test_image_build_refuses_unchecked_requirements_and_ends_pip_options() -> None:
    with pytest.raises(DeploymentFailedError, match=r"hostile@1: requirement '-r/proc/self/environ'"):
        server_requirements(snapshot_with(("-r/proc/self/environ",)))
    requirements = server_requirements(snapshot_with(("orjson>=3",)))
    install = json.loads(render_dockerfile("base", requirements).splitlines()[3].removeprefix("RUN "))
    assert "--only-binary=:all:" in install
    assert "--no-index" in install
    assert install[install.index("--") + 1 :] == requirements


def test_streaming_consumers_never_import_the_models_packages(tmp_path: Path) -> None:
    """A model's wheels may ship modules named like the standard library's; in the image they
    sit in MODEL_SITE on PYTHONPATH, and the consumer (broker credentials, network) must not
    run them. The image's consumer command, pointed at this checkout instead of /opt, with
    the hostile folder where the image's PYTHONPATH would put MODEL_SITE."""
    lines = render_dockerfile("base", server_requirements(snapshot_with(("orjson>=3",)))).splitlines()
    assert f"COPY --from=deps {PLATFORM_SITE} {PLATFORM_SITE}" in lines
    assert MODEL_SITE not in CONSUMER_PATH
    hostile = tmp_path / "site"
    ran = tmp_path / "ran"
    for module in ("ctypes", "logging", "argparse", "json"):
        (hostile / module).mkdir(parents=True)
        (hostile / module / "__init__.py").write_text(f"open({str(ran)!r}, 'a').write({module!r})\n")
    checkout = Path(__file__).resolve().parent.parent
    site = next(p for p in map(Path, sys.path) if p.name == "site-packages")
    command = consumer_command("consume", "--help", path=(str(checkout), str(site)))
    done = subprocess.run(
        [sys.executable, *command[1:]],
        env={**os.environ, "PYTHONPATH": str(hostile)},
        cwd=hostile,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "--score-socket" in done.stdout
    assert not ran.exists(), f"model code ran in the consumer: {ran.read_text()}"


@pytest.fixture
def offline_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """Settings for real ``pip download`` runs that never reach an index (loopback only)."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("SECRET_TOKEN", SECRET)
    monkeypatch.setenv("MLC_DATABASE_URL", DATABASE_SECRET)
    return Settings.from_env(home=tmp_path / "home")


TARGET = PythonTarget(major=3, minor=11, platforms=("manylinux_2_36_x86_64",))


def test_pip_output_is_scrubbed_of_the_workers_environment(offline_pip: Settings) -> None:
    notes: list[str] = []
    with pytest.raises(DeploymentFailedError) as caught:
        download_wheelhouse(offline_pip, [SECRET], TARGET, notes.append, snapshot=snapshot_with(()))
    message = str(caught.value)
    assert "$SECRET_TOKEN" in message  # pip named the requirement; the value was replaced
    assert all(SECRET not in text for text in [message, *notes])
    assert environment_scrubber()(f"db={DATABASE_SECRET}") == "db=$MLC_DATABASE_URL"


def test_pip_takes_option_lookalikes_as_requirements(offline_pip: Settings) -> None:
    with pytest.raises(DeploymentFailedError) as caught:
        download_wheelhouse(
            offline_pip, ["-r/proc/self/environ"], TARGET, lambda note: None, snapshot=snapshot_with(())
        )
    assert "-r/proc/self/environ" in str(caught.value)
    assert "Could not open requirements file" not in str(caught.value)
    assert SECRET not in str(caught.value)


# --- what model processes see of the worker ---------------------------------------------


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[tuple[LocalDriver, Runtime]]:
    runtime = Runtime(name="local-sit", stage="SIT")
    driver = LocalDriver(Settings.from_env(home=tmp_path / "home"))
    yield driver, runtime
    await driver.cleanup(CleanupRequest(runtime=runtime))


def snapshot_of(settings: Settings, package: Path) -> ModelSnapshot:
    manifest = load_manifest(package)
    return ModelSnapshot(
        model=manifest.name,
        version=1,
        sha256=ArtifactStore(settings.artifact_dir).put(build_archive(package)),
        service_tags=manifest.service_tags,
        entry_module=manifest.entry_module,
    )


def plant_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLC_DATABASE_URL", DATABASE_SECRET)
    monkeypatch.setenv("SECRET_TOKEN", SECRET)
    monkeypatch.setenv("TEMPORAL_API_KEY", SECRET + "-temporal")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")


@pytest.mark.parametrize("hosting", [HostingMode.DEDICATED, HostingMode.SHARED])
async def test_local_model_server_gets_none_of_the_workers_environment(
    local: tuple[LocalDriver, Runtime], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hosting: HostingMode
) -> None:
    driver, runtime = local
    runtime = runtime.model_copy(update={"hosting": hosting})
    plant_secrets(monkeypatch)
    snapshot = snapshot_of(driver.settings, write_package(tmp_path / "pkg"))
    request = OnlineDeployRequest(deployment_id="env", snapshot=snapshot, runtime=runtime, stage="SIT")
    result = await driver.deploy_online(request, lambda note: None)
    environ = Path(f"/proc/{result.details['pid']}/environ").read_bytes()
    names = {entry.split(b"=", 1)[0].decode() for entry in environ.split(b"\0") if entry}
    assert SECRET.encode() not in environ
    assert b"hunter2" not in environ
    assert not any(name.startswith(("MLC_DATABASE", "TEMPORAL_", "SECRET")) for name in names)
    assert names <= {
        "PATH", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH", "LC_ALL", "HOME", "TMPDIR", "PYTHONPATH",
        "MLC_MODEL_VERSION", "MLC_SNAPSHOT_SHA256", "MLC_SERVING_MAX_BODY_BYTES",
        "MLC_SERVING_MAX_RECORDS", "MLC_SERVING_LIMIT_CONCURRENCY",
    }  # fmt: skip
    scored = (await call_model(result.endpoint, "/score", json={"x": 1})).json()
    home = (
        driver.workdir(runtime, "env")
        if hosting is HostingMode.DEDICATED
        else driver.settings.runtime_dir.resolve() / runtime.name / HOST_DIR
    )
    assert scored["home"] == str(home)
    assert "LC_ALL" in scored["keys"]
    await driver.undeploy(UndeployRequest(deployment_id="env", runtime=runtime))  # a host stops with it


async def test_local_batch_job_gets_none_of_the_workers_environment(
    local: tuple[LocalDriver, Runtime], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver, runtime = local
    plant_secrets(monkeypatch)
    snapshot = snapshot_of(driver.settings, write_package(tmp_path / "pkg"))
    request = BatchJobRequest(deployment_id="env-batch", snapshot=snapshot, runtime=runtime, stage="SIT")
    result = await driver.run_batch(request, lambda note: None)
    outputs = [json.loads(line) for line in Path(result.output_path).read_text().splitlines()]
    assert outputs and all(SECRET not in json.dumps(o) for o in outputs)
    assert not any(k.startswith(("MLC_DATABASE", "TEMPORAL_", "SECRET")) for k in outputs[0]["keys"])
    assert outputs[0]["home"] == str(driver.workdir(runtime, "env-batch"))


def test_names_and_ids_refuse_a_trailing_newline() -> None:
    """``$`` also matches before a final newline: names and ids reach file names and nginx
    configuration, so they are matched whole."""
    from activities.runtimes.base import check_deployment_id
    from mlc.domain import check_name
    from mlc.errors import RefusedError

    with pytest.raises(ValueError, match="is not valid"):
        check_name("cc-fraud\n", "model name")
    with pytest.raises(RefusedError, match="is not valid"):
        check_deployment_id("cc-fraud-v1-dev-local-dev-1a2b3c4d\n")
    assert check_name("cc-fraud", "model name") == "cc-fraud"
