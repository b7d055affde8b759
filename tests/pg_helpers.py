"""A throwaway PostgreSQL server for tests: `initdb` into a temporary folder, `pg_ctl start` on a free
local port, password authentication, torn down (and deleted) at the end.

PostgreSQL refuses to run as root, and tests here and in CI run as root: then the server runs as an
unprivileged user (`postgres`, as Debian's package creates it, else `nobody`), in a folder that
user owns. `start_postgres()` raises pytest's Skipped, with the reason, where the server binaries
(PATH, /usr/lib/postgresql/<version>/bin, /usr/local/bin) or such a user are missing.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

USER, PASSWORD, DATABASE = "slm", "pg-s3cret", "postgres"
SERVER_USERS = ("postgres", "nobody")


def server_bin_dir() -> Path | None:
    """A folder holding initdb, pg_ctl and postgres: PATH first, then Debian's versioned folders
    (newest first), then /usr/local/bin."""
    candidates = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(p) for p in sorted(versions, key=lambda p: [int(x) for x in Path(p).parent.name.split(".")
                                                                      if x.isdigit()], reverse=True)]
    candidates.append(Path("/usr/local/bin"))
    for d in candidates:
        if all(os.access(d / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return d
    return None


def _server_user() -> pwd.struct_passwd | None:
    """The unprivileged account the server runs as when the tests run as root."""
    for name in SERVER_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Postgres:
    port: int
    folder: Path

    def url(self, database: str = DATABASE, password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def log(self) -> str:
        p = self.folder / "server.log"
        return p.read_text(errors="replace")[-3000:] if p.is_file() else ""


@contextmanager
def start_postgres() -> Iterator[Postgres]:
    bin_dir = server_bin_dir()
    if bin_dir is None:
        pytest.skip("needs a PostgreSQL server (initdb, pg_ctl, postgres on PATH, in /usr/lib/postgresql/*/bin "
                    "or /usr/local/bin; Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="needs the psycopg driver (pip install -e '.[test]')")
    run_as: dict = {}
    # /tmp where there is one: a short path (the server's socket path must fit in 107 bytes) that the
    # server's user can reach, which a $TMPDIR under /root may not be.
    folder = Path(tempfile.mkdtemp(prefix="slmkit-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
    try:
        if os.geteuid() == 0:
            user = _server_user()
            if user is None:
                pytest.skip(f"PostgreSQL will not run as root and none of the users {', '.join(SERVER_USERS)} exists")
            # The server's user must reach its folder: mkdtemp's folder is private to root, so it is given away.
            os.chown(folder, user.pw_uid, user.pw_gid)
            run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        password_file = folder / "password"
        password_file.write_text(PASSWORD + "\n")
        if run_as:
            os.chown(password_file, run_as["user"], run_as["group"])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}

        def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
            return subprocess.run([str(bin_dir / argv[0]), *argv[1:]], cwd=folder, env=env, capture_output=True,
                                  text=True, timeout=timeout, **run_as)

        data = folder / "data"
        init = run("initdb", "-D", str(data), "-U", USER, "--pwfile", str(password_file), "--auth", "scram-sha-256",
                   "-E", "UTF8", "--no-locale", "--no-sync")
        if init.returncode != 0:
            pytest.fail(f"initdb failed: {(init.stderr or init.stdout)[-2000:]}")
        server = None
        for _ in range(3):  # a port taken between choosing and binding it: choose again
            port = _free_port()
            # Durability is not what the tests are about: no fsync makes the server's writes cheap.
            options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
            start = run("pg_ctl", "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "60",
                        "-o", options, "start", timeout=90)
            if start.returncode == 0:
                server = Postgres(port, folder)
                break
        if server is None:
            pytest.fail(f"pg_ctl start failed: {start.stderr[-1000:]}\n{Postgres(0, folder).log()}")
        try:
            yield server
        finally:
            run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def wait_for(condition, timeout: float, what: str, step: float = 0.05):
    """Poll `condition()` until it returns something truthy (which is returned), or fail after `timeout` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(step)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
