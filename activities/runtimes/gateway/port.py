"""Who holds a gateway's TCP port: a stable endpoint answered by another program (any
local account can listen on a free port while the gateway is down) is refused, naming it."""

from __future__ import annotations

import errno
import os
import pwd
import socket
from pathlib import Path

_LISTEN = "0A"
"""``st`` of a listening socket in ``/proc/net/tcp``."""


def taken(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails because something holds it (as the gateway's
    ``listen`` would); an address this user may not bind counts as free here (nginx's
    own error says why)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no holder
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def holder(port: int) -> str | None:
    """``pid N (COMMAND, user NAME)`` of a process listening on TCP ``port`` in this network
    namespace, when this user can see it (root sees all), else None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _holds(entry, inodes):
            return _describe(entry)
    return None


def _holds(proc: Path, inodes: set[str]) -> bool:
    try:
        return any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir())
    except OSError:  # gone, or not ours to look into
        return False


def _describe(proc: Path) -> str:
    try:
        command = (proc / "comm").read_text().strip()
        uid = proc.stat().st_uid
    except OSError:
        return f"pid {proc.name}"
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return f"pid {proc.name} ({command}, user {user})"
