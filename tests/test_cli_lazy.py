"""The CLI loads only what a command needs: the command map is complete, reads stay light."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cli.app import COMMAND_MODULES, app, register_commands


def test_the_command_map_names_every_registered_command() -> None:
    register_commands(["--help"])  # help registers every module
    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert names == set(COMMAND_MODULES)


@pytest.mark.parametrize("argv", [["status"], ["deployments"], ["--home", "/tmp/x", "deployments", "--json"]])
def test_inventory_reads_do_not_import_temporal_or_kafka(argv: list[str]) -> None:
    probe = (
        "import sys\n"
        "from cli.app import register_commands\n"
        f"register_commands({argv!r})\n"
        "heavy = ('temporalio', 'confluent_kafka', 'cryptography', 'httpx')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd="/")
    assert done.stdout.strip() == "", f"{argv} imported {done.stdout.strip()}"
