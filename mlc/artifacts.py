"""Content-addressed storage of model packages as immutable archives.

An archive is a gzip'd tar with sorted entries and zeroed metadata, so the same
directory content always gives the same sha256: that is what makes registering the
same package twice return the same snapshot.

Archives hold regular files only, read from inside the package: a symbolic link that
leads out of it (``data.csv -> /etc/passwd``) or a FIFO or device would otherwise put
the registering host's files into the archive, or hang the registration.

Packages are bounded (:class:`PackageLimits`): the archive's size, what it unpacks to and
how many files it holds are checked when a package is registered (before anything is read
past the limit) and again before an archive is unpacked (member by member, before the
content of one past the limit is even decompressed), so a sparse 1 TB file or a gzip bomb
of zeros is refused with the limit's name instead of filling memory or a disk.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from mlc.errors import InvalidPackageError, NotFoundError

_SKIP_DIRS = {"__pycache__", ".git", ".ipynb_checkpoints", ".venv"}
GIB = 1 << 30


@dataclass(frozen=True)
class PackageLimits:
    """How big a model package may be (``MLC_MAX_PACKAGE_*`` variables, in bytes and files)."""

    archive_bytes: int = 1 * GIB
    """The stored ``.tar.gz`` (``MLC_MAX_PACKAGE_ARCHIVE_BYTES``)."""
    unpacked_bytes: int = 4 * GIB
    """What it unpacks to, all files together (``MLC_MAX_PACKAGE_UNPACKED_BYTES``)."""
    files: int = 20_000
    """Files and folders in it (``MLC_MAX_PACKAGE_FILES``)."""

    @classmethod
    def from_env(cls) -> PackageLimits:
        """The defaults, overridden by the variables that are set."""
        default = cls()
        return cls(
            archive_bytes=_env_int("MLC_MAX_PACKAGE_ARCHIVE_BYTES", default.archive_bytes),
            unpacked_bytes=_env_int("MLC_MAX_PACKAGE_UNPACKED_BYTES", default.unpacked_bytes),
            files=_env_int("MLC_MAX_PACKAGE_FILES", default.files),
        )

    def check(self, where: str, *, files: int, unpacked: int, archive: int = 0) -> None:
        """Refuse (:class:`InvalidPackageError` naming ``where`` and the variable) what is over."""
        for value, limit, variable, what in (
            (archive, self.archive_bytes, "MLC_MAX_PACKAGE_ARCHIVE_BYTES", "its archive is"),
            (unpacked, self.unpacked_bytes, "MLC_MAX_PACKAGE_UNPACKED_BYTES", "it unpacks to"),
            (files, self.files, "MLC_MAX_PACKAGE_FILES", "it holds"),
        ):
            if value > limit:
                unit = "files and folders" if variable == "MLC_MAX_PACKAGE_FILES" else "bytes"
                raise InvalidPackageError(
                    f"{where}: {what} more than {limit:,} {unit} (the limit, {variable}); "
                    "leave data and caches out of the package, or raise the limit on the workers "
                    "and the registering host"
                )


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidPackageError(f"{name}={raw!r} is not a whole number of bytes or files") from None
    if value <= 0:
        raise InvalidPackageError(f"{name}={raw!r} must be positive")
    return value


def build_archive(package_dir: Path, *, limits: PackageLimits | None = None) -> bytes:
    """Return a deterministic ``.tar.gz`` of ``package_dir`` (caches and VCS dirs left out).

    Raises:
        InvalidPackageError: a symbolic link leads outside the package, an entry is not a
            regular file or folder, or the package is over ``limits`` (default: from the
            environment); the message names it.
    """
    limits = limits or PackageLimits.from_env()
    inside = package_dir.resolve()
    files = _walk(package_dir, inside)
    limits.check(str(package_dir), files=len(files), unpacked=0)
    unpacked = 0
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in files:
                rel = path.relative_to(package_dir).as_posix()
                with _open_regular(path, package_dir, inside) as fh:
                    info = tarfile.TarInfo(rel)
                    info.size = os.fstat(fh.fileno()).st_size
                    info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
                    unpacked += info.size  # checked before the file is read
                    limits.check(str(package_dir), files=len(files), unpacked=unpacked, archive=buffer.tell())
                    tar.addfile(info, fh)
    limits.check(str(package_dir), files=len(files), unpacked=unpacked, archive=buffer.tell())
    return buffer.getvalue()


def _walk(root: Path, inside: Path) -> list[Path]:
    """Files to archive (folders linked from inside the package are not followed)."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in dirnames:
            if (Path(dirpath) / name).is_symlink():
                _resolve_inside(Path(dirpath) / name, root, inside)
        for name in sorted(filenames):
            if not name.endswith(".pyc"):
                files.append(Path(dirpath) / name)
    return sorted(files)


def _resolve_inside(path: Path, root: Path, inside: Path) -> Path:
    """``path`` with links resolved, refused when it leads outside the package ``inside``."""
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # a dangling link or a loop
        raise InvalidPackageError(
            f"{root}: {path.relative_to(root)} cannot be resolved ({exc}); "
            "if it is a dangling symbolic link, remove it or replace it with the file"
        ) from None
    if not target.is_relative_to(inside):
        raise InvalidPackageError(
            f"{root}: {path.relative_to(root)} is a symbolic link to {target}, outside the package; "
            "model packages may not link outside themselves: copy the file into the package"
        )
    return target


def _open_regular(path: Path, root: Path, inside: Path) -> io.BufferedReader:
    """Open ``path`` (or the in-package file it links to) for reading.

    The link check happens here, right before the open, and the open does not follow a
    link, so a file swapped for a link after the walk is refused too. FIFOs, devices
    and sockets are refused without blocking on them.
    """
    real = _resolve_inside(path, root, inside)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise InvalidPackageError(f"{root}: cannot read {path.relative_to(root)}: {exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidPackageError(
            f"{root}: {path.relative_to(root)} is not a regular file (a FIFO, socket or device); "
            "model packages hold regular files and folders only"
        )
    return os.fdopen(fd, "rb")


def sha256_of(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    """A directory of archives named by their sha256; writes are atomic, never overwritten."""

    def __init__(self, root: Path, *, limits: PackageLimits | None = None) -> None:
        self.root = root
        self.limits = limits or PackageLimits.from_env()

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

    def incoming(self) -> Path:
        """A folder on the store's file system for archives being received (then moved in)."""
        folder = self.root / "incoming"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def put_file(self, received: Path, sha256: str) -> None:
        """Move an archive received into :meth:`incoming` (its ``sha256`` checked by the
        receiver while it was written) into place, without reading it into memory."""
        path = self.path_for(sha256)
        if path.exists():
            received.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(received, path)

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
        where = f"artifact {sha256[:12]}"
        self.limits.check(where, files=0, unpacked=0, archive=path.stat().st_size)
        data = path.read_bytes()
        if sha256_of(data) != sha256:
            raise InvalidPackageError(f"artifact {path} is corrupt: its sha256 does not match")
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            _safe_extract(tar, dest, _bounded_members(tar, self.limits, where))
        marker.write_text(sha256)
        return dest


def _bounded_members(tar: tarfile.TarFile, limits: PackageLimits, where: str) -> list[tarfile.TarInfo]:
    """The archive's members, refused as soon as their count or declared sizes pass
    ``limits``: each header is checked before the content behind it is decompressed."""
    members: list[tarfile.TarInfo] = []
    unpacked = 0
    for member in tar:
        members.append(member)
        unpacked += max(member.size, 0)
        limits.check(where, files=len(members), unpacked=unpacked)
    return members


def _safe_extract(tar: tarfile.TarFile, dest: Path, members: list[tarfile.TarInfo]) -> None:
    """Extract only regular files and folders that stay inside ``dest``.

    Uses tarfile's "data" filter where it exists (Python >= 3.11.4); older 3.11 builds
    (Debian bookworm's python3 in model images) get the same checks done here.
    """
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, members=members, filter="data")
        return
    root = dest.resolve()
    for member in members:
        target = (root / member.name).resolve()
        if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
            raise InvalidPackageError(f"archive member {member.name!r} is not allowed in a model package")
    tar.extractall(dest, members=members)
