"""A throwaway PostgreSQL server for tests (Debian's binaries, a temporary cluster).

``PgServer.start(directory)`` runs ``initdb`` into *directory* as an unprivileged user
(``nobody`` when the tests run as root: PostgreSQL refuses to run as root), then
``pg_ctl start`` listening on 127.0.0.1 at a free port and on a socket inside the
directory, trust authentication (loopback only, nothing else can reach it). ``stop()``
runs ``pg_ctl stop -m immediate``. ``new_database()`` gives each test its own empty
database (``CREATE DATABASE``), so tests never see each other's rows.

Fixtures (``pytest_plugins = ["pgkit"]`` or import them): ``pg_server`` (one per test
session, stopped at the end) and ``pg_url`` (a fresh database per test). When the
binaries are missing the fixtures skip with a message saying what to install.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

PG_BIN_CANDIDATES = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin",
                     "/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/14/bin")
SUPERUSER = "ee"


def pg_bin() -> Path | None:
    """The directory of ``initdb``/``pg_ctl`` (``$EE_PG_BIN`` first), or None."""
    env = os.environ.get("EE_PG_BIN")
    for candidate in ((env,) if env else ()) + PG_BIN_CANDIDATES:
        if candidate and (Path(candidate) / "initdb").exists() \
                and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_user() -> tuple[list[str], int | None, int | None]:
    """(command prefix, uid, gid) to run the server unprivileged."""
    if os.geteuid() != 0:
        return [], None, None
    nobody = pwd.getpwnam("nobody")
    return ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
            "--clear-groups", "--"], nobody.pw_uid, nobody.pw_gid


@attrs.define
class PgServer:
    directory: Path
    port: int
    bin: Path
    prefix: list[str]

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{name}"

    @classmethod
    def start(cls, directory: Path) -> PgServer:
        """A new cluster in *directory* (made; when running as root, its parents must be
        traversable by ``nobody``: use ``tempfile.mkdtemp()`` directly under /tmp)."""
        binary = pg_bin()
        if binary is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found; "
                                    "install Debian's 'postgresql' package")
        prefix, uid, gid = _as_user()
        directory.mkdir(parents=True, exist_ok=True)
        if uid is not None and gid is not None:
            os.chown(directory, uid, gid)
        data = directory / "data"
        port = _free_port()
        run = dict(check=True, capture_output=True, text=True, cwd="/", timeout=120)
        subprocess.run([*prefix, str(binary / "initdb"), "-D", str(data), "-U", SUPERUSER,
                        "--auth=trust", "-E", "UTF8", "--no-sync"], **run)  # type: ignore[call-overload]
        options = (f"-c listen_addresses=127.0.0.1 -c port={port} "
                   f"-c unix_socket_directories={directory} -c fsync=off "
                   "-c max_connections=50")
        subprocess.run([*prefix, str(binary / "pg_ctl"), "-D", str(data), "-l",
                        str(directory / "log"), "-o", options, "-w", "-t", "60", "start"],
                       **run)  # type: ignore[call-overload]
        server = cls(directory, port, binary, prefix)
        server.wait()
        return server

    def wait(self, timeout: float = 30.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def new_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.database_url(name)

    def stop(self) -> None:
        subprocess.run([*self.prefix, str(self.bin / "pg_ctl"), "-D",
                        str(self.directory / "data"), "-m", "immediate", "-w", "stop"],
                       capture_output=True, cwd="/", timeout=60)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    if pg_bin() is None:
        pytest.skip("PostgreSQL is not installed (Debian package 'postgresql'; tools/test "
                    "installs it): the PostgreSQL backend is not tested")
    directory = Path(tempfile.mkdtemp(prefix="ee-pg-"))
    server = PgServer.start(directory)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    return pg_server.new_database()
