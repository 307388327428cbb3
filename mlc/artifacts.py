"""Content-addressed storage of model packages as immutable archives.

An archive is a gzip'd tar with sorted entries and zeroed metadata, so the same
directory content always gives the same sha256: that is what makes registering the
same package twice return the same snapshot.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

from mlc.errors import InvalidPackageError, NotFoundError

_SKIP_DIRS = {"__pycache__", ".git", ".ipynb_checkpoints", ".venv"}


def build_archive(package_dir: Path) -> bytes:
    """Return a deterministic ``.tar.gz`` of ``package_dir`` (caches and VCS dirs left out)."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in _walk(package_dir):
                rel = path.relative_to(package_dir).as_posix()
                info = tarfile.TarInfo(rel)
                info.size = path.stat().st_size
                info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
    return buffer.getvalue()


def _walk(root: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".pyc"):
                files.append(Path(dirpath) / name)
    return sorted(files)


def sha256_of(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    """A directory of archives named by their sha256; writes are atomic, never overwritten."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, sha256: str) -> Path:
        """Where the archive with this digest lives (whether or not it exists)."""
        return self.root / "sha256" / sha256[:2] / f"{sha256}.tar.gz"

    def put(self, data: bytes) -> str:
        """Store ``data`` and return its sha256 (a no-op when already stored)."""
        digest = sha256_of(data)
        path = self.path_for(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return digest

    def unpack(self, sha256: str, dest: Path) -> Path:
        """Extract the archive into ``dest`` (idempotent) after checking its digest."""
        path = self.path_for(sha256)
        if not path.is_file():
            raise NotFoundError(
                f"artifact {sha256[:12]} is missing from {self.root}; "
                "was the snapshot registered against another MLC_HOME?"
            )
        marker = dest / ".mlc-sha256"
        if marker.is_file() and marker.read_text() == sha256:
            return dest
        data = path.read_bytes()
        if sha256_of(data) != sha256:
            raise InvalidPackageError(f"artifact {path} is corrupt: its sha256 does not match")
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            _safe_extract(tar, dest)
        marker.write_text(sha256)
        return dest


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract only regular files and folders that stay inside ``dest``.

    Uses tarfile's "data" filter where it exists (Python >= 3.11.4); older 3.11 builds
    (Debian bookworm's python3 in model images) get the same checks done here.
    """
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for member in tar.getmembers():
        target = (root / member.name).resolve()
        if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
            raise InvalidPackageError(f"archive member {member.name!r} is not allowed in a model package")
    tar.extractall(dest)
