"""The embedded PostgreSQL of ``mlc dev`` (and of the test session): a password for every
connection, no TCP listener, and a socket no other user can reach. Real servers."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from cli.stack.dev_postgres import DevPostgres
from mlc import isolation
from tests.conftest import missing


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[DevPostgres, str]]:
    postgres = DevPostgres(tmp_path / "home" / "postgres", tmp_path / "home" / "postgres.log")
    uri = postgres.start(die_with_parent=False)
    yield postgres, uri
    postgres.stop()


def socket_of(uri: str) -> Path:
    folder = Path(parse_qs(urlsplit(uri).query)["host"][0])
    return folder / ".s.PGSQL.5432"


async def test_connections_need_the_generated_password(server: tuple[DevPostgres, str]) -> None:
    postgres, uri = server
    assert postgres.password() in uri
    assert stat.S_IMODE(postgres.password_file.stat().st_mode) == 0o600
    conn = await asyncpg.connect(uri)
    try:
        assert await conn.fetchval("SELECT current_setting('listen_addresses')") == ""
        assert await conn.fetchval("SELECT current_setting('password_encryption')") == "scram-sha-256"
        rules = await conn.fetch("SELECT type, auth_method FROM pg_hba_file_rules")
        assert rules and {r["auth_method"] for r in rules} == {"scram-sha-256"}
    finally:
        await conn.close()
    host = str(socket_of(uri).parent)
    with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)):
        await asyncpg.connect(host=host, user="postgres", database="postgres", password="wrong")
    with pytest.raises(Exception, match="password"):  # no password: asked for one, has none
        await asyncpg.connect(host=host, user="postgres", database="postgres", password="")


def test_the_socket_is_not_reachable_by_other_users(server: tuple[DevPostgres, str]) -> None:
    _, uri = server
    path = socket_of(uri)
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    if not isolation.isolating():
        missing("checking another user's access needs root")
    stranger = isolation.ModelUser(isolation.UID_RANGE[0] + 7, isolation.UID_RANGE[0] + 7)
    pid = os.fork()
    if pid == 0:  # a model's user: uid and gid of its own, no groups
        code = 3
        try:
            isolation.drop_privileges(stranger)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
            code = 0
        except PermissionError:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1, "another user reached the socket"


async def test_a_trust_data_folder_from_an_older_mlc_dev_gets_the_password(tmp_path: Path) -> None:
    postgres = DevPostgres(tmp_path / "pg", tmp_path / "pg.log")
    postgres.start(die_with_parent=False)
    postgres.stop()
    (postgres.data_dir / "pg_hba.conf").write_text("local all all trust\n")
    postgres.password_file.unlink()  # as an older mlc dev left it: trust, no password file
    uri = postgres.start(die_with_parent=False)
    try:
        conn = await asyncpg.connect(uri)
        await conn.close()
        host = str(socket_of(uri).parent)
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(host=host, user="postgres", database="postgres", password="x")
    finally:
        postgres.stop()


def _as_stranger(make: Path) -> None:
    """Create the folder ``make`` as another local user (a model's uid), as a squatter would."""
    stranger = isolation.ModelUser(isolation.UID_RANGE[0] + 8, isolation.UID_RANGE[0] + 8)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            isolation.drop_privileges(stranger)
            make.mkdir(mode=0o777, parents=True)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


async def test_a_long_data_path_gets_a_socket_folder_nobody_could_take_first(tmp_path: Path) -> None:
    """Too long a path for a socket: the folder has a random name, not the old guessable
    ``/tmp/mlc-pg-<digest>`` (or the wheel's ``/tmp/mlc-pg/<hash>``), which a local user
    made first changes nothing; a replaced recorded folder is not used either."""
    if not isolation.isolating():
        missing("squatting as another user needs root")
    data_dir = tmp_path / ("d" * 90) / "postgres"
    data_dir.parent.mkdir()
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    squatted = [Path(tempfile.gettempdir()) / f"mlc-pg-{digest}", Path(tempfile.gettempdir()) / "mlc-pg"]
    made = [folder for folder in squatted if not folder.exists()]
    for folder in made:
        _as_stranger(folder)
    postgres = DevPostgres(data_dir, tmp_path / "pg.log")
    first = socket_of(postgres.start(die_with_parent=False)).parent
    try:
        assert first not in squatted and first.parent not in squatted, first
        info = first.stat()
        assert info.st_uid != isolation.UID_RANGE[0] + 8 and stat.S_IMODE(info.st_mode) == 0o700
        assert len(first.name) > len("mlc-pg-") + 6, "a random name"
        conn = await asyncpg.connect(host=str(first), user="postgres", password=postgres.password())
        await conn.close()
    finally:
        postgres.stop()
    assert socket_of(postgres.start(die_with_parent=False)).parent == first, "the recorded one, reused"
    postgres.stop()
    # someone replaces it (after a reboot cleared /tmp, say): a new random folder, not theirs
    shutil.rmtree(first)
    _as_stranger(first)
    again = first
    try:
        again = socket_of(postgres.start(die_with_parent=False)).parent
        assert again != first and stat.S_IMODE(again.stat().st_mode) == 0o700
    finally:
        postgres.stop()
        for folder in (first, again, *made):
            shutil.rmtree(folder, ignore_errors=True)
