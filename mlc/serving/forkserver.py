"""A warm parent that forks model servers, so a local deploy skips the interpreter's imports.

Most of a local deploy's second went into a fresh interpreter importing the server
(starlette, uvicorn, pydantic: ~0.15 s) and the model's libraries (scikit-learn alone:
~0.6 s), before the model itself loaded in a few milliseconds. This process imports
them once (:data:`DEFAULT_PRELOAD`, those installed) and then forks one child per request:
the child starts its own session, drops to the deployment's unprivileged user when the
runtime names one (see :mod:`mlc.isolation`: groups cleared, gid and uid set, no new
privileges), takes the environment, working folder and log file the runtime chose for it
(the log opened as that user), and runs ``python -m mlc.serving serve`` with the given
arguments, exactly as a spawned server would. The runtime records the child's pid as it
would a spawned server's.

Requests come over a unix socket in a private folder (0700, the forkserver's user: root
when the worker is root, so no model process can ask it for anything), one JSON line each:
``{"argv": [...], "cwd": ..., "env": {...}, "log": ..., "die_with_parent": bool,
"user": {"uid": N, "gid": N, "reach": [...], "own_network": bool} | null, "stdout": PATH | null}``
(``stdout``: a file the child's standard output goes to instead of the log, opened as
the child's user; a batch job prints its summary there), answered with ``{"pid": N}`` or ``{"error": "..."}``.
Children are reaped as they exit, so a dead server never looks alive to the runtime, and
each exit code is left in ``exits/PID`` next to the socket (written before the pid
disappears) for the runtime's error messages. A child's own imports (the model package's
modules) happen after the fork and stay in the child.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

DEFAULT_PRELOAD = ("numpy", "scipy", "sklearn", "sklearn.linear_model", "sklearn.pipeline", "joblib")
"""Libraries imported before forking when installed (models listing others still work: they
import them in the child, as a spawned server would)."""
TITLE_ROOM = 4096
"""Bytes of padding the forkserver's own command line carries, so a child can write its
``python -m mlc.serving serve --package ...`` over it (see :func:`retitle`)."""
PRELOAD_ENV = "MLC_FORKSERVER_PRELOAD"
"""Comma-separated module names that replace :data:`DEFAULT_PRELOAD`."""


def serve_forks(socket_path: Path, preload: Sequence[str], main: Callable[[list[str]], int]) -> None:
    """Import the server and ``preload``, then fork a model server per request until killed.

    ``main`` is ``python -m mlc.serving``'s, which each child runs with its request's
    arguments (passed in by that entry point, so this module does not import it back)."""
    for name in preload:
        with contextlib.suppress(Exception):  # a missing or broken library is the child's problem
            import_module(name)
    import uvicorn  # noqa: F401 (warm: the children run it)

    import mlc.serving.app  # noqa: F401

    for name in ("uvloop", "httptools", "uvicorn.loops.auto", "uvicorn.protocols.http.auto"):
        with contextlib.suppress(Exception):
            import_module(name)
    global _exits
    _exits = socket_path.parent / "exits"
    _exits.mkdir(exist_ok=True)
    signal.signal(signal.SIGCHLD, _reap)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    socket_path.unlink(missing_ok=True)
    listener.bind(str(socket_path))
    listener.listen(16)
    print(f"forkserver ready on {socket_path}", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                request = json.loads(conn.makefile("rb").readline())
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    conn.close()
                    _child(request, main)
                reply: dict[str, Any] = {"pid": pid}
            except Exception as exc:  # a bad request must not end the server
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")


_exits: Path | None = None


def _reap(signum: int, frame: Any) -> None:
    """Record each exited child's code, then reap it (peek first: the pid must not vanish first)."""
    with contextlib.suppress(ChildProcessError):
        while (info := os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)) is not None:
            if info.si_pid == 0:
                break
            code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
            if _exits is not None:
                with contextlib.suppress(OSError):
                    (_exits / str(info.si_pid)).write_text(str(code))
            os.waitpid(info.si_pid, 0)


def _child(request: dict[str, Any], main: Callable[[list[str]], int]) -> None:
    """Become the requested server (never returns)."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        from mlc.isolation import ModelUser, enter, no_new_privs, open_log

        if request.get("user"):  # before anything of the model's: its folder, its log, its code
            user = request["user"]
            enter(
                ModelUser(
                    int(user["uid"]),
                    int(user["gid"]),
                    tuple(user.get("reach", ())),
                    own_network=bool(user.get("own_network", False)),
                )
            )
        no_new_privs()
        if request.get("die_with_parent"):  # after the drop, which clears the signal
            from mlc.processes import die_with_parent_now

            die_with_parent_now(signal.SIGTERM)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # as a spawned server's: never blocked by a FIFO the model left there, never a link
        # or another user's file (see open_log); opened as the child's user
        log = open_log(Path(request["log"]), None)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        if request.get("stdout"):
            with open_log(Path(request["stdout"]), None) as out:
                os.ftruncate(out.fileno(), 0)
                os.dup2(out.fileno(), 1)
        else:
            os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        log.close()
        os.close(null)
        sys.argv = ["python -m mlc.serving", *request["argv"]]
        retitle([sys.executable, "-m", "mlc.serving", *request["argv"]])
        code = main(list(request["argv"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def retitle(args: Sequence[str]) -> bool:
    """Make ``/proc/self/cmdline`` read ``args``, as if this process had been started with them.

    Operators (``ps``), the runtime and tests find model servers by their command line
    (``--package DIR``); a forked child would otherwise show its forkserver's. The kernel
    reads the command line from the process's own argument area (``arg_start``..``arg_end``
    in ``/proc/self/stat``), so the new arguments are written there, NUL-padded, cut to fit.
    Returns False where that is not possible.
    """
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # fields 48 and 49 of proc(5)
    except (OSError, IndexError, ValueError):
        return False
    room = end - start
    if room <= 1:
        return False
    title = b"\0".join(a.encode() for a in args)[: room - 1]
    ctypes.memmove(start, title + b"\0" * (room - len(title)), room)
    return True


class ForkClient:
    """Asks a forkserver for a model server; ``None`` from :meth:`fork` means "spawn instead"."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    def ready(self) -> bool:
        """Whether the server listens yet (it imports for about a second after its start)."""
        return self.socket_path.exists()

    def exit_code(self, pid: int) -> int | None:
        """The exit code of a forked server that has exited (negative: killed by that signal)."""
        try:
            return int((self.socket_path.parent / "exits" / str(pid)).read_text())
        except (OSError, ValueError):
            return None

    def fork(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: dict[str, str],
        log: Path,
        die_with_parent: bool,
        user: dict[str, Any] | None = None,
        stdout: Path | None = None,
    ) -> int | None:
        """The pid of a new server run with ``argv`` (as ``user``, the fields of a
        :class:`mlc.isolation.ModelUser`, when given; its standard output in ``stdout``
        when given, else in ``log``), or None when the forkserver cannot help."""
        if not self.ready():
            return None
        request = {
            "argv": list(argv),
            "cwd": str(cwd),
            "env": env,
            "log": str(log),
            "die_with_parent": die_with_parent,
            "user": user,
            "stdout": None if stdout is None else str(stdout),
        }
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(5.0)
                conn.connect(str(self.socket_path))
                conn.sendall(json.dumps(request).encode() + b"\n")
                reply = json.loads(conn.makefile("rb").readline() or b"{}")
        except (OSError, ValueError):
            return None
        pid = reply.get("pid")
        return pid if isinstance(pid, int) and pid > 0 else None


def preload_modules(environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """:data:`DEFAULT_PRELOAD`, or the modules ``MLC_FORKSERVER_PRELOAD`` names."""
    raw = (os.environ if environ is None else environ).get(PRELOAD_ENV, "").strip()
    return tuple(n.strip() for n in raw.split(",") if n.strip()) if raw else DEFAULT_PRELOAD
