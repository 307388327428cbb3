"""A deployment's package on a local runtime: unpacked into its folder, owned by its user."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from activities.runtimes.base import (
    RuntimeDriver,
)
from activities.runtimes.local.layout import PACKAGE_DIR, STAGING_DIR, TMP_DIR
from activities.runtimes.local.servers import networked, project_root
from mlc import isolation
from mlc.artifacts import ArtifactStore
from mlc.domain import ModelSnapshot, Runtime
from mlc.errors import DeploymentFailedError
from mlc.isolation import ModelUser


class LocalPackages(RuntimeDriver):
    """How the local driver puts a snapshot's package into a deployment folder, owned by
    the deployment's own user when the worker is root (see :mod:`mlc.isolation`)."""

    def model_user(self, runtime: Runtime, workdir: Path) -> ModelUser | None:
        """The user the deployment's processes run as: its own when the worker is root
        (the owner of its folder, or a new one), else None (the worker's user)."""
        if not isolation.isolating():
            return None
        return isolation.user_for(workdir, taken=isolation.users_in(self.settings.runtime_dir))

    def prepare(
        self,
        runtime: Runtime,
        snapshot: ModelSnapshot,
        workdir: Path,
        *,
        fresh: bool = True,
        own_network: bool = True,
    ) -> tuple[ModelUser | None, Path]:
        """Make the deployment folder ready for model processes; return their user and the
        unpacked package.

        As root: nothing of the deployment's user still runs, ``MLC_HOME`` is locked
        (:func:`mlc.isolation.lock_home`), the user will reach the Python installation, the
        project and the folder (:func:`mlc.isolation.bind_unreachable`),
        the folder is the user's (0700) with a ``tmp`` of its own, and the package is
        unpacked by root into a folder the user cannot have redirected. ``fresh=False``
        (streaming consumers of the deployment keep running) kills nothing and unpacks
        nothing: the package is already there. ``own_network`` keeps the processes off the
        network as the runtime's ``model_network`` says (:func:`networked`); without it
        they share the host's (streaming consumers).
        """
        user = self.model_user(runtime, workdir)
        if user is not None:
            if fresh:
                isolation.kill_user(user)
            self.settings.runtime_dir.mkdir(parents=True, exist_ok=True)
            isolation.lock_home(self.settings.home, self.settings.runtime_dir)
            python = (sys.prefix, sys.base_prefix, Path(sys.executable).resolve().parent)
            reach = tuple(str(p) for p in (*python, project_root(), workdir))
            user = replace(user, reach=reach)
            user = networked(runtime, user) if own_network else user
        isolation.prepare_folder(workdir, user)
        isolation.private_folder(workdir / TMP_DIR, user)
        if not fresh and (workdir / PACKAGE_DIR).is_dir():
            return user, workdir / PACKAGE_DIR
        return user, self._unpack(snapshot, workdir)

    def _unpack(self, snapshot: ModelSnapshot, workdir: Path) -> Path:
        """Extract the snapshot's archive into ``workdir/package`` (kept when it holds it).

        ``workdir`` may belong to the model's user, whose processes may be running (a
        shared host), so root never writes through a path there the model could swap for
        a link meanwhile: the archive is extracted into a root-only staging folder beside
        the runtimes' folders and renamed into place. rename(2) does not follow a link at
        its target, and fails on a folder planted there after the old package was removed.
        """
        package = workdir / PACKAGE_DIR
        if isolation.holds_package(package, snapshot.sha256):
            return package
        staging_root = self.settings.runtime_dir / STAGING_DIR
        staging_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=staging_root))
        try:
            ArtifactStore(self.settings.artifact_dir).unpack(snapshot.sha256, staging / PACKAGE_DIR)
            workdir.mkdir(parents=True, exist_ok=True)
            isolation.remove(package)
            try:
                os.rename(staging / PACKAGE_DIR, package)
            except OSError as exc:
                raise DeploymentFailedError(
                    f"could not put {snapshot.ref}'s package into {workdir}: something else "
                    f"appeared at {package} while it was unpacked ({exc.strerror})"
                ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return package
