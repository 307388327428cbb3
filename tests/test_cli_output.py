"""What the ``mlc`` command prints for people and scripts: sentences rather than tracebacks
(those go to the worker's log), help texts whole, and lines a pipe gets unbroken. The
real CLI in a subprocess."""

from __future__ import annotations

import asyncio
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from typer.main import get_command

from cli.app import app, register_commands
from mlc.domain import Runtime
from tests.conftest import FIXTURES, Stack
from tests.faults.harness import PROJECT, free_port


def _mlc(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m mlc ARGS`` with output piped, as a script runs it."""
    return subprocess.run(
        [sys.executable, "-m", "mlc", *args],
        env=env or dict(os.environ),
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _fake_nginx(folder: Path) -> Path:
    """An "nginx" that passes the start-up check (``-v``) and fails every runtime gateway
    (their files sit under ``_gateways``), so a run fails in an activity (routing the stable
    endpoint), as a broken nginx would; anything else (the mutual-TLS proxy in front of
    Temporal) runs the real nginx."""
    real = shutil.which("nginx") or "/usr/sbin/nginx"
    path = folder / "nginx"
    path.write_text(
        "#!/bin/sh\n"
        '[ "$1" = -v ] && exit 0\n'
        'case "$*" in *_gateways*) echo "nginx: [emerg] broken on purpose" >&2; exit 1 ;; esac\n'
        f'exec {real} "$@"\n'
    )
    path.chmod(0o755)
    return path


def _demo_env(tmp_path: Path, name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLC_DATABASE_URL", "TEMPORAL_ADDRESS")}
    return {
        **env,
        "MLC_HOME": str(tmp_path / name),
        "MLC_SIGNING_KEY": str(tmp_path / f"{name}.pem"),
        "MLC_NGINX": str(_fake_nginx(tmp_path)),
    }


def _demo(env: dict[str, str], *options: str) -> subprocess.CompletedProcess[str]:
    ports = ("--temporal-port", str(free_port()), "--ui-port", str(free_port()))
    return _mlc(*options, "demo", "--yes", *ports, env=env, timeout=300)


def test_a_failed_activity_is_one_line_and_its_traceback_is_in_the_worker_log(tmp_path: Path) -> None:
    env = _demo_env(tmp_path, "home")
    done = _demo(env)
    shown = done.stdout + done.stderr
    assert done.returncode == 1, shown
    assert "Traceback" not in shown
    log = Path(env["MLC_HOME"]) / "worker.log"
    failed = [line for line in shown.splitlines() if "activity route_traffic failed" in line]
    assert failed, shown
    assert all(
        re.fullmatch(
            r"run mlc-cc-fraud-v1: activity route_traffic failed \(attempt \d+\): DeploymentFailedError: "
            r"the gateway configuration of runtime local-dev .* nginx: \[emerg\] broken on purpose "
            rf"\(traceback in {re.escape(str(log))}\)",
            line,
        )
        for line in failed
    ), failed
    assert "cc-fraud@1 (ModelLifecycle): failed in DEV" in done.stdout
    assert "[emerg] broken on purpose" in done.stdout.split("reason:")[1], "brackets in the reason are text"
    assert f"the worker's log, with the tracebacks of failed activities: {log}" in done.stdout
    written = log.read_text()
    assert "Traceback (most recent call last)" in written and "Completing activity as failed" in written


def test_debug_puts_the_tracebacks_in_the_terminal_too(tmp_path: Path) -> None:
    env = _demo_env(tmp_path, "home")
    done = _demo(env, "--debug")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert "Completing activity as failed" in done.stderr
    assert "Traceback (most recent call last)" in (Path(env["MLC_HOME"]) / "worker.log").read_text()


def _commands(command: typer.core.TyperGroup | object, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command's path below ``command`` (groups included)."""
    found = [path]
    for name, sub in getattr(command, "commands", {}).items():
        found += _commands(sub, (*path, name))
    return found


def test_every_help_text_is_shown_whole_brackets_included() -> None:
    register_commands(["--help"])
    root = get_command(app)
    checked = 0
    for path in _commands(root):
        command = root
        for name in path:
            command = command.commands[name]  # type: ignore[attr-defined]
        texts = [p.help for p in command.params if getattr(p, "help", None)]
        if not any("[" in text for text in texts):
            continue
        shown = "".join(_mlc(*path, "--help").stdout.split())  # click wraps at words and hyphens
        for text in texts:
            assert "".join(text.split()) in shown, f"mlc {' '.join(path)} --help lost: {text}"
            checked += 1
    assert checked, "some help text has brackets (e.g. lifecycle start's [default: ModelLifecycle])"
    start = "".join(_mlc("lifecycle", "start", "--help").stdout.split())
    assert "Lifecycle(workflowtype)torun[default:ModelLifecycle]." in start


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_piped_output_is_never_wrapped(stream: str, tmp_path: Path) -> None:
    long_ref = "m" * 300
    refused = _mlc("approve", long_ref, "--stage", "DEV", env={**os.environ, "MLC_HOME": str(tmp_path)})
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"error: '{long_ref}' is not MODEL@VERSION (for example cc-fraud@1)"
    ], "the error line a script greps is one line"
    sentence = " ".join(["a long sentence with [brackets] in it"] * 20)
    printed = subprocess.run(
        [sys.executable, "-c", f"from cli.context import console, err_console\n"
         f"({stream == 'stderr'} and err_console or console).print({sentence!r}, markup=False)"],
        capture_output=True, text=True, timeout=60, cwd=PROJECT,
    )  # fmt: skip
    assert getattr(printed, stream) == sentence + "\n"


def _read_terminal(master: int, until: Callable[[str], bool], timeout: float) -> str:
    """What a program wrote to the terminal ``master`` leads to, ANSI codes removed, once
    ``until`` holds for it (or ``timeout`` seconds pass)."""
    shown = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                shown += os.read(master, 65536)
            except OSError:  # the program closed the terminal
                break
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))
        if until(text):
            return text
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))


async def test_worker_in_a_terminal_shows_a_failed_activity_as_one_line(stack: Stack) -> None:
    queue = f"{stack.task_queue}-terminal"
    await stack.add_runtime(Runtime(name="local-dev", stage="DEV", task_queue=queue))
    snap = await stack.register(FIXTURES / "models" / "crash-model")
    master, terminal = os.openpty()
    worker = subprocess.Popen(
        [sys.executable, "-m", "mlc", "worker", "--runtime", "local-dev"],
        env={**stack.cli_env, "COLUMNS": "1000"},
        stdin=terminal, stdout=terminal, stderr=terminal, cwd=PROJECT,
    )  # fmt: skip
    os.close(terminal)
    try:
        started = await asyncio.to_thread(
            _read_terminal, master, lambda t: "serving runtime local-dev" in t, 60
        )
        handle = await stack.start(snap)
        shown = await asyncio.to_thread(_read_terminal, master, lambda t: " failed (attempt" in t, 120)
    finally:
        worker.send_signal(signal.SIGINT)
        await asyncio.to_thread(worker.wait, 60)
        os.close(master)
    log = stack.settings.home / "worker.log"
    said = f"serving runtime local-dev on task queue {queue}; tracebacks of failed activities go to {log}"
    assert said in started, started
    failed = [line.strip() for line in shown.splitlines() if " failed (attempt" in line]
    assert failed, shown
    assert re.fullmatch(
        rf"run {handle.id}: activity \S+ failed \(attempt 1\): .*crash-model: init\(\) fails on purpose.* "
        rf"\(traceback in {re.escape(str(log))}\)",
        failed[0],
    ), failed
    assert "Traceback" not in shown
    assert "Traceback (most recent call last)" in log.read_text()
