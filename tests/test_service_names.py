"""Programs that take user names only (nginx's ``user``) see the service users'
names, and nothing of the host changes: :func:`mlc.isolation.naming` is a command prefix
(a mount namespace of the program's own), not Python run between fork and exec (which
can deadlock a child of the threaded worker while it holds the gateway's file lock).

Making a mount namespace needs root: under CI=true the test fails without it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from mlc import isolation
from tests.conftest import missing

USER = isolation.ModelUser(uid=1999999901, gid=1999999901)


def test_the_prefix_names_the_service_user_for_its_program_only(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        missing("a mount namespace for service names needs root")
    name = isolation.service_name(USER)
    prefix = isolation.naming([USER], tmp_path)
    inside = subprocess.run(
        [*prefix, "sh", "-c", f"getent passwd {name} && getent group {name} && echo pid=$$"],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    assert f"{name}:x:{USER.uid}:{USER.gid}:" in inside.stdout
    assert f"{name}:x:{USER.gid}:" in inside.stdout
    # the host's files are untouched, so its name resolves nowhere else
    outside = subprocess.run(["getent", "passwd", name], capture_output=True, text=True, check=False)
    assert outside.returncode != 0
    assert name not in Path("/etc/passwd").read_text()


def test_the_program_keeps_the_prefix_pid(tmp_path: Path) -> None:
    """Each step execs the next, so the pid a caller records is the program's own (the
    gateway's state file and its signals depend on it)."""
    if os.geteuid() != 0:
        missing("a mount namespace for service names needs root")
    prefix = isolation.naming([USER], tmp_path)
    child = subprocess.Popen([*prefix, "sh", "-c", "echo $$"], stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    assert int(out.strip()) == child.pid
