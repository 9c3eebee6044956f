"""A private PostgreSQL server for the tests: `initdb` and `pg_ctl` on a free port and a
folder of its own, stopped and removed after.

The binaries come from Debian's `postgresql` package (`/usr/lib/postgresql/<version>/bin`,
not on PATH) or from PATH. The server refuses to run as root: when the tests are root
(CI), it runs as `nobody` through `setpriv`. The Python driver is psycopg 3 (the
`postgresql` extra).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path


def bin_dir() -> Path | None:
    """Where `initdb` and `pg_ctl` are: PATH first, else Debian's newest version."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return debian[-1].parent if debian else None


def missing() -> str | None:
    """Why a server cannot be started here, or None."""
    if bin_dir() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'dicomnet[postgresql]')"
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "running as root, and setpriv (util-linux) is missing to run PostgreSQL"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One PostgreSQL server; `dsn` connects to its `postgres` database as `postgres`."""

    def __init__(self) -> None:
        found = bin_dir()
        assert found is not None, missing()
        self.bin = found
        self.folder = Path(tempfile.mkdtemp(prefix="dicomnet-pg-"))
        self.port = _free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.folder, nobody.pw_uid, nobody.pw_gid)
            self._as_user = [
                "setpriv",
                f"--reuid={nobody.pw_uid}",
                f"--regid={nobody.pw_gid}",
                "--clear-groups",
            ]

    def _run(self, *argv: str) -> None:
        done = subprocess.run(
            [*self._as_user, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.folder,
            env={**os.environ, "LC_ALL": "C.UTF-8"},
        )
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        data = self.folder / "data"
        # C.UTF-8: the server's own default collation orders by code point, as the
        # index's columns (COLLATE "C") do anyway.
        self._run(
            str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
            "--no-sync", "-E", "UTF8", "--locale=C.UTF-8",
        )  # fmt: skip
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.folder / "server.log"),
            "-w", "-t", "60", "-o", options, "start",
        )  # fmt: skip

    def restart(self) -> None:
        """Stop and start again (what a failover looks like to a client)."""
        data, log = str(self.folder / "data"), str(self.folder / "server.log")
        self._run(str(self.bin / "pg_ctl"), "-D", data, "-l", log, "-m", "fast", "-w", "restart")

    def stop(self) -> None:
        try:
            if (self.folder / "data" / "postmaster.pid").exists():
                self._run(
                    str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"),
                    "-m", "fast", "-w", "-t", "60", "stop",
                )  # fmt: skip
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def fresh_schema(server: Server) -> str:
    """A new, empty schema in `server`'s database: the URL of a connection that uses it."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{server.dsn}?options=-csearch_path%3D{schema}"
