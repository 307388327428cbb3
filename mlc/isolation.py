"""Model code gets only what it needs: its own user, its own folder, nothing of ``MLC_HOME``.

A local runtime runs untrusted model code (servers, batch jobs, streaming consumers) on
the worker's host. When the worker runs as root, each deployment gets its own user and
group, ``uid = gid`` in :data:`UID_RANGE` (no ``/etc/passwd`` entry needed), and:

- its deployment folder belongs to that user, mode 0700, so no other model reads it;
- ``MLC_HOME``, the runtimes folder and the runtime's folder are 0711 (traversable, not
  listable), and everything else directly under ``MLC_HOME`` (keys, the platform key,
  artifacts, the trust root, the embedded servers' data, logs, ``dev.json``) loses every
  permission for "others" (:func:`lock_home`), so a model can neither list nor open it;
- the process drops to that user before any model code is imported: supplementary
  groups cleared, gid and uid set (real, effective and saved), ``PR_SET_NO_NEW_PRIVS`` on
  (no setuid binary gives privileges back), in a spawned child (:func:`popen_options`) as
  in a forked one (:func:`enter`);
- what it needs behind a folder others cannot search (the Python installation or the
  checkout under ``/root``, 0700; a 0700 parent of ``MLC_HOME``) is bound into a private
  mount namespace over an empty tmpfs (:func:`bind_unreachable`), so nothing is opened up
  on the host and the rest of that folder does not exist for the model;
- with ``own_network`` (model servers, shared hosts, batch jobs) the process gets a
  network namespace of its own (:func:`leave_network`): it serves on a unix socket in its
  folder and reaches no host port (Temporal, PostgreSQL, other models), nor binds one;
- every process it starts stays in a cgroup of its user where the host offers one
  (:mod:`mlc.cgroups`), and whatever the deployment leaves running under its user is
  killed when the runtime is done with it (:func:`kill_user`: the group frozen and killed,
  then every process of the uid): a daemonised grandchild cannot outlive its deployment.

The user owns its folder, so it can replace any file in it. The runtime therefore reads
and writes there only through :func:`write_file`, :func:`read_own_file`, :func:`open_log`
and :func:`read_tail`, which never follow a symbolic link, never open a FIFO or device,
refuse hard links and (for the runtime's own records) files it did not write itself.

A runtime's shared model host (``hosting: shared``, the default of local runtimes below
PROD, see :mod:`activities.runtimes.local`) is one process with one such user for the host
as a whole, which owns the folder of every deployment hosted in it: models hosted together
can read and disturb each other (their packages, folders, requests and answers), a weaker
boundary than a user per deployment. They are still kept from everything above, and from
models outside their host. Nor can one of them be killed alone (one process has one uid
and one cgroup): a model leaving the host is unloaded and every process of the host's
user but the host's own is killed (:func:`kill_user` with ``spare``); threads it started
inside the host's process run on until the host's next restart.

When the worker is not root it cannot give a model another user: model processes then
run as the worker's user, and what separates them from the worker's files is only the
allow-listed environment and the folder layout (see the README's "Trust model").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mlc import cgroups
from mlc.errors import DeploymentFailedError

UID_RANGE = (2_000_000_000, 1_000_000)
"""First uid (= gid) given to deployments, and how many there are. Far above login users,
system users and the usual ``/etc/subuid`` ranges (100000 + 65536 * n)."""
_PR_SET_NO_NEW_PRIVS = 38
"""From <linux/prctl.h>."""
KILL_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class ModelUser:
    """The unprivileged user and group one deployment's processes run as."""

    uid: int
    gid: int
    reach: tuple[str, ...] = ()
    """Folders its processes must reach (the Python installation, the project, the
    deployment folder); those behind a folder others cannot search are bound into a
    private view (see :func:`enter`)."""
    own_network: bool = False
    """Its processes get a network namespace of their own (:func:`leave_network`): no
    interface but a loopback of their own, so nothing of the host's network (its
    loopback services, other models) is reachable, and no host port can be bound."""


def isolating() -> bool:
    """True when model processes get their own user: the worker is root (on Linux)."""
    return sys.platform.startswith("linux") and os.geteuid() == 0


def in_range(uid: int) -> bool:
    """Whether ``uid`` is one the runtime gives deployments."""
    first, count = UID_RANGE
    return first <= uid < first + count


def user_of(workdir: Path) -> ModelUser | None:
    """The user a deployment folder belongs to, if it is a deployment's user."""
    try:
        info = os.lstat(workdir)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(info.st_mode) or not in_range(info.st_uid):
        return None
    return ModelUser(info.st_uid, info.st_gid)


def user_for(workdir: Path, *, taken: Iterable[int] = ()) -> ModelUser:
    """The deployment's user: the owner of its folder when it has one already, else one
    derived from the folder's path and not ``taken`` by another deployment."""
    existing = user_of(workdir)
    if existing is not None:
        return existing
    first, count = UID_RANGE
    used = set(taken)
    offset = int.from_bytes(hashlib.sha256(str(workdir).encode()).digest()[:8], "big") % count
    for step in range(count):
        uid = first + (offset + step) % count
        if uid not in used:
            return ModelUser(uid, uid)
    raise DeploymentFailedError(f"every model user id in {first}..{first + count - 1} is taken")


def users_in(runtime_dir: Path) -> set[int]:
    """The uids that deployment folders under ``runtime_dir`` (all runtimes) belong to."""
    found = set()
    for folder in runtime_dir.glob("*/*") if runtime_dir.is_dir() else []:
        with contextlib.suppress(OSError):
            uid = os.lstat(folder).st_uid
            if in_range(uid):
                found.add(uid)
    return found


# --- the folders -------------------------------------------------------------------------


def lock_home(home: Path, keep: Path) -> None:
    """Make ``home`` traversable but not listable by others (0711), and take every
    permission for others from what lies directly under it except ``keep`` (the runtimes
    folder), so a model user can reach its own deployment folder and nothing beside it.

    Run before every model start: files written under ``home`` since the last start (a
    new key, ``dev.json``) are locked as well.
    """
    _set_mode(home, 0o711)
    for entry in os.scandir(home):
        if Path(entry.path) == keep or entry.is_symlink():
            continue
        with contextlib.suppress(OSError):
            mode = entry.stat(follow_symlinks=False).st_mode
            if mode & 0o007:
                os.chmod(entry.path, stat.S_IMODE(mode) & ~0o007)


def prepare_folder(workdir: Path, user: ModelUser | None) -> None:
    """Create the deployment folder and hand it to ``user`` (mode 0700); fix its parents
    (0711) up to ``MLC_HOME``'s runtimes folder. Without a user: only create it."""
    workdir.mkdir(parents=True, exist_ok=True)
    if user is None:
        return
    for parent in (workdir.parent, workdir.parent.parent):
        _set_mode(parent, 0o711)
    os.chown(workdir, user.uid, user.gid, follow_symlinks=False)
    os.chmod(workdir, 0o700)


def give(path: Path, user: ModelUser | None) -> None:
    """Hand a folder or file the runtime made inside a deployment folder to its user."""
    if user is not None:
        os.chown(path, user.uid, user.gid, follow_symlinks=False)


def private_folder(path: Path, user: ModelUser | None) -> None:
    """Make ``path`` a folder of ``user``'s (its ``tmp``), replacing whatever else is there."""
    with contextlib.suppress(FileNotFoundError):
        info = os.lstat(path)
        owner = os.geteuid() if user is None else user.uid
        if stat.S_ISDIR(info.st_mode) and info.st_uid == owner:
            return
        remove(path)
    path.mkdir(mode=0o700)
    give(path, user)


def clear_for_root(path: Path) -> None:
    """Remove ``path`` unless it is a real folder the runtime (this process's user) owns.

    Before the runtime writes into a folder inside a deployment folder (unpacking the
    package), for the model's user could have left a symbolic link there pointing at
    a folder of root's.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid():
        return
    remove(path)


def holds_package(package: Path, sha256: str) -> bool:
    """True when ``package`` is a real folder of this process's user holding the snapshot
    ``sha256`` (its marker a regular file of ours): looked at without following links."""
    marker = package / ".mlc-sha256"
    try:
        folder, mark = os.lstat(package), os.lstat(marker)
    except FileNotFoundError:
        return False
    ours = os.geteuid()
    if not (stat.S_ISDIR(folder.st_mode) and folder.st_uid == ours):
        return False
    if not (stat.S_ISREG(mark.st_mode) and mark.st_uid == ours):
        return False
    return marker.read_text() == sha256


def private_temp_folder(record: Path, *, prefix: str, owners: Iterable[int] = ()) -> Path:
    """A folder in the system temp dir under a random name (``mkdtemp``, 0700), the same one
    on every call while it stays a real folder of this process's user (or of ``owners``)
    that nobody else can write: its path is kept in ``record`` (a file in a private folder,
    say under ``MLC_HOME``). No name is guessable before it exists, and one that another
    local user made after ours was gone (say after a reboot) is never used: a new one is.
    Short, for unix socket paths (108 bytes).
    """
    recorded = read_own_file(record)
    if recorded:
        path = Path(recorded.strip())
        with contextlib.suppress(OSError):
            info = os.lstat(path)
            mine = info.st_uid in {os.geteuid(), *owners}
            if stat.S_ISDIR(info.st_mode) and mine and not stat.S_IMODE(info.st_mode) & 0o022:
                return path
    path = Path(tempfile.mkdtemp(prefix=prefix))
    write_file(record, str(path))
    return path


def remove(path: Path) -> None:
    """Remove whatever ``path`` is (a folder with its content; a link, not its target)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            path.unlink()


def link_fd(fd: int, path: Path) -> None:
    """Give the file ``fd`` refers to (an ``O_PATH`` handle) the new name ``path``: a hard
    link made from the handle, so it names exactly the file that was opened and checked,
    whatever replaced its old name meanwhile (``linkat`` with ``AT_EMPTY_PATH``; as root).

    Raises:
        OSError: the link could not be made (another filesystem, not root).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(path), _AT_EMPTY_PATH) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"cannot link {path}: {os.strerror(code)}")


def blocked(path: Path) -> Path | None:
    """The outermost folder on the way to ``path`` (``path`` itself excluded: a deployment
    folder is its user's, 0700) that others cannot search (``/root`` is usually 0700), or
    None when the deployment's user can walk to ``path``."""
    for folder in reversed(path.parents):
        try:
            info = os.stat(folder)
        except OSError:
            return None
        if stat.S_ISDIR(info.st_mode) and not info.st_mode & stat.S_IXOTH:
            return folder
    return None


def _set_mode(path: Path, mode: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_IMODE(path.lstat().st_mode) != mode:
            path.chmod(mode)


# --- files in a folder the model owns ----------------------------------------------------

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _plain(fd: int, owners: tuple[int, ...] | None) -> bool:
    """A regular file with one name, owned by one of ``owners`` (any when None)."""
    info = os.fstat(fd)
    return stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and (owners is None or info.st_uid in owners)


def write_file(path: Path, text: str, *, mode: int = 0o600) -> None:
    """Atomically replace ``path`` with ``text``, never writing through a link planted there."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def read_own_file(path: Path) -> str | None:
    """The text of a file this process wrote (``deployment.json``), None when it is missing
    or is not exactly that: a link, a FIFO or a file of another user is never read."""
    try:
        fd = os.open(path, _READ)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not _plain(fh.fileno(), (os.geteuid(),)):
            return None
        return fh.read().decode(errors="replace")


def read_tail(path: Path, *, offset: int = 0, limit: int = 1 << 20) -> str | None:
    """The text of a log the model's process writes, from ``offset`` (at most the last
    ``limit`` bytes); None when it is missing or is not a plain file."""
    try:
        fd = os.open(path, _READ)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not _plain(fh.fileno(), None):
            return None
        size = os.fstat(fh.fileno()).st_size
        fh.seek(max(offset, size - limit))
        return fh.read().decode(errors="replace")


def open_log(path: Path, user: ModelUser | None) -> IO[bytes]:
    """Open a log for a child's output (appending), owned by ``user``.

    Whatever the model's user left under that name that is not a plain file of its own
    or of this process (a link to a root file, a hard link, a FIFO) is replaced first.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    owners = (os.geteuid(),) if user is None else (os.geteuid(), user.uid)
    for _ in range(3):
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise
        else:
            if _plain(fd, owners):
                if user is not None:
                    os.fchown(fd, user.uid, user.gid)
                os.set_blocking(fd, True)
                return os.fdopen(fd, "ab")
            os.close(fd)
        remove(path)
    raise DeploymentFailedError(f"{path} keeps being replaced while the runtime opens it")


def check_output(path: Path) -> None:
    """Refuse a job's output that is not a plain file (a link to a file of root's, say),
    before the runtime or anyone reading the output as root opens it.

    Raises:
        DeploymentFailedError: naming the file.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        raise DeploymentFailedError(
            f"the batch job left {path} as something other than a plain file (a link or a "
            "device); its output is refused"
        )


# --- processes -----------------------------------------------------------------------------


def no_new_privs() -> None:
    """``PR_SET_NO_NEW_PRIVS``: execve never grants privileges again (setuid binaries, file
    capabilities); a no-op off Linux."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_AT_FDCWD, _AT_EMPTY_PATH = -100, 0x1000
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000


def bind_unreachable(reach: Sequence[str]) -> None:
    """In a child still root: make the folders of ``reach`` that sit behind a folder others
    cannot search (say the Python installation under ``/root``, 0700) reachable, without
    changing that folder. The child gets its own mount namespace in which an empty tmpfs
    (0755) covers that folder and only the needed folders are bound back at their paths:
    the rest of it (``/root``'s other files) does not exist for the child. Nothing is done
    when everything is reachable already.

    Raises:
        PermissionError: no mount namespace could be made (no ``CAP_SYS_ADMIN``), naming
            the folder to make traversable instead.
    """
    wanted = sorted({Path(p).resolve() for p in reach}, key=lambda p: len(p.parts))
    covers: dict[Path, list[Path]] = {}
    for path in wanted:
        cover = blocked(path)
        if cover is not None and not any(path.is_relative_to(p) for ps in covers.values() for p in ps):
            covers.setdefault(cover, []).append(path)
    if not covers:
        return
    libc = ctypes.CDLL(None, use_errno=True)

    def call(result: int, what: str) -> None:
        if result != 0:
            code = ctypes.get_errno()
            folders = ", ".join(str(c) for c in covers)
            raise PermissionError(
                code,
                f"{what} failed ({os.strerror(code)}): model code cannot reach {folders} "
                f"(no search permission for others). Let others traverse it without listing it "
                f"(chmod o+x, mode 0711) or move the project, its Python and MLC_HOME elsewhere",
            )

    call(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    call(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "making mounts private")
    # Handles on the folders in the new namespace (a bind's source must be in it), taken
    # before the tmpfs hides them.
    flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    fds = {path: os.open(path, flags) for paths in covers.values() for path in paths}
    for cover, paths in covers.items():
        call(
            libc.mount(b"tmpfs", str(cover).encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0755"),
            f"mounting a tmpfs on {cover}",
        )
        for path in paths:
            path.mkdir(parents=True, exist_ok=True)
            source = f"/proc/self/fd/{fds[path]}".encode()
            call(libc.mount(source, str(path).encode(), None, _MS_BIND | _MS_REC, None), f"binding {path}")
    for fd in fds.values():
        os.close(fd)


def leave_network() -> None:
    """In a child still root: a network namespace of its own, holding only a loopback
    interface that is down. The host's loopback services and every other address are
    unreachable and no port of the host can be bound; path-named unix sockets (the
    model's endpoint in its folder) work, for they are not bound to a namespace.

    Raises:
        PermissionError: no namespace could be made (the child must not go on).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise PermissionError(code, f"unshare(CLONE_NEWNET) failed: {os.strerror(code)}")


FIREWALLS = ("iptables", "ip6tables")


def _host_rule(uid: int) -> list[str]:
    """Refuse ``uid``'s packets to the host itself: every local address goes out on ``lo``."""
    return ["OUTPUT", "-o", "lo", "-m", "owner", "--uid-owner", str(uid), "-j", "REJECT"]


def _firewall(path: str, action: str, rule: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([path, "-w", action, *rule], capture_output=True, text=True, check=False)


def keep_off_host(user: ModelUser) -> None:
    """Let ``user`` reach other hosts but not this one (a runtime's ``model_network:
    outbound``): a firewall rule per address family refuses its connections to any of
    the host's own addresses, its loopback included (Temporal, PostgreSQL, gateways, other
    models). Nothing is started without the rules.

    Raises:
        DeploymentFailedError: ``iptables``/``ip6tables`` are missing or refused the rule.
    """
    for tool in FIREWALLS:
        path = shutil.which(tool)
        rule = _host_rule(user.uid)
        if path is not None and _firewall(path, "-C", rule).returncode == 0:
            continue
        added = None if path is None else _firewall(path, "-I", rule)
        if added is None or added.returncode != 0:
            why = f"{tool} is not installed" if added is None else added.stderr.strip()
            raise DeploymentFailedError(
                f"model user {user.uid} may reach other hosts (model_network: outbound) only once "
                f"its connections to this host are refused, and {tool} could not do that: {why}. "
                "Install iptables, or set the runtime's model_network to none"
            )


def drop_host_rules(uid: int) -> None:
    """Remove what :func:`keep_off_host` added for ``uid`` (none when it added nothing)."""
    for tool in FIREWALLS:
        path = shutil.which(tool)
        while path is not None:
            if _firewall(path, "-D", _host_rule(uid)).returncode != 0:
                break


def enter(user: ModelUser) -> None:
    """In a child still root, before any model code: enter its user's cgroup
    (:func:`mlc.cgroups.join`), reach what it needs (:func:`bind_unreachable`), leave the
    host's network when it must (:func:`leave_network`), then become ``user`` for good
    (:func:`drop_privileges`)."""
    cgroups.join(user.uid)
    bind_unreachable(user.reach)
    if user.own_network:
        leave_network()
    drop_privileges(user)


def drop_privileges(user: ModelUser) -> None:
    """In a forked child, before any model code: become ``user`` for good.

    Raises:
        PermissionError: the drop did not take (the child must not go on).
    """
    os.setgroups([])
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    no_new_privs()
    if 0 in (*os.getresuid(), *os.getresgid()) or os.getgroups():
        raise PermissionError(f"could not drop to uid {user.uid}")


def popen_options(user: ModelUser | None, *, arm: Callable[[], None] | None = None) -> dict[str, Any]:
    """:class:`subprocess.Popen` keywords that start a child as ``user`` (:func:`enter`:
    groups cleared, gid and uid set, no new privileges), then run ``arm`` (a parent-death
    signal: it must be armed after the uid changes, which clears it)."""

    def preexec() -> None:
        if user is not None:
            enter(user)
        no_new_privs()
        if arm is not None:
            arm()

    return {"preexec_fn": preexec}


def spawn(
    args: Sequence[str],
    *,
    log: IO[bytes],
    user: ModelUser | None,
    die_with_parent: bool,
    **options: Any,
) -> subprocess.Popen[bytes]:
    """:func:`mlc.processes.spawn` for model code: its own session, stdin closed, output to
    ``log``, running as ``user``."""
    from mlc.processes import parent_death_signal

    arm = parent_death_signal(signal.SIGTERM) if die_with_parent else None
    return subprocess.Popen(
        list(args),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        **popen_options(user, arm=arm),
        **options,
    )


def processes_of(uid: int) -> list[int]:
    """Pids of live processes whose real or effective uid is ``uid`` (Linux)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Uid:"):
                real, effective = (int(v) for v in line.split()[1:3])
                if uid in (real, effective) and "State:\tZ" not in status:
                    found.append(int(entry.name))
                break
    return found


def kill_user(user: ModelUser | None, *, spare: int | None = None) -> None:
    """SIGKILL every process of a deployment's user, until none is left (only a
    deployment's own user: never the worker's): its cgroup first, frozen so nothing forks
    meanwhile (:func:`mlc.cgroups.kill`), then whatever ``/proc`` still shows of the uid.
    With ``spare`` (a shared host's pid) every process but that one: the host serves on,
    whatever its models started ends.

    Raises:
        DeploymentFailedError: some would not die within ``KILL_TIMEOUT_SECONDS``.
    """
    if user is None or not in_range(user.uid):
        return
    if spare is None:
        cgroups.kill(user.uid, timeout=KILL_TIMEOUT_SECONDS)
    else:
        cgroups.kill_others(user.uid, spare, timeout=KILL_TIMEOUT_SECONDS)
    deadline = time.monotonic() + KILL_TIMEOUT_SECONDS
    while pids := [pid for pid in processes_of(user.uid) if pid != spare]:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise DeploymentFailedError(f"processes {pids} of model user {user.uid} do not die")
        time.sleep(0.02)


# --- MLC's own unprivileged services ------------------------------------------------------

SERVICE_UID_RANGE = (UID_RANGE[0] + UID_RANGE[1], 1_000_000)
"""uids (= gids) of MLC's own unprivileged services, right above the models' range."""


def service_user(home: Path, role: str) -> ModelUser:
    """The user (and group, ``uid = gid``) one of an installation's services runs as:
    ``temporal-proxy`` (the nginx workers in front of ``mlc dev``'s Temporal) or
    ``gateway`` (the nginx workers of its local gateways). One per home and role, in
    :data:`SERVICE_UID_RANGE`: not ``nobody`` (every local account's fallback), not a
    model's, and the two roles share no group, so neither reaches the other's sockets."""
    first, count = SERVICE_UID_RANGE
    key = f"{home.resolve()}\0{role}".encode()
    uid = first + int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % count
    return ModelUser(uid, uid)


def service_name(user: ModelUser) -> str:
    """The name ``user`` has for a program that takes names only (:func:`naming`)."""
    return f"mlc-{user.uid}"


NAMING_SCRIPT = 'mount --bind "$1" /etc/passwd && mount --bind "$2" /etc/group && shift 2 && exec "$@"'
"""Run by :func:`naming`'s prefix inside its new mount namespace (arguments, never text)."""


def naming(users: Sequence[ModelUser], folder: Path) -> list[str]:
    """For a child still root whose program takes user names only (nginx's ``user``):
    write ``folder/names.passwd`` and ``folder/names.group`` (the host's, plus
    :func:`service_name` for each of ``users``) and return the command prefix that runs
    the program in a mount namespace of its own in which they cover ``/etc/passwd`` and
    ``/etc/group``. Nothing of the host changes; the program's children (nginx's workers)
    inherit the view.

    A prefix of programs (util-linux's ``unshare``, ``mount``, ``sh``), not Python run
    between fork and exec: the worker forks from threads, and a child of a threaded
    process that runs Python before exec can deadlock on a lock another thread held at
    the fork, holding every file lock it inherited (the gateway's, so no traffic change
    of that runtime would ever run again). The pid stays the program's (each step execs).
    """
    lines = {
        "passwd": "{n}:x:{u}:{g}::/nonexistent:/usr/sbin/nologin\n",
        "group": "{n}:x:{g}:\n",
    }
    files = []
    for name, line in lines.items():
        host = Path("/etc", name).read_text()
        extra = "".join(line.format(n=service_name(u), u=u.uid, g=u.gid) for u in users)
        target = folder / f"names.{name}"
        write_file(target, host + ("" if host.endswith("\n") else "\n") + extra, mode=0o644)
        files.append(str(target))
    # unshare --mount makes every mount private to the new namespace (its default propagation)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", NAMING_SCRIPT, "naming", *files]
