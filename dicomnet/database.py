"""Databases that several processes and nodes share (PostgreSQL, through psycopg 3, the
``postgresql`` extra), for `serve`'s index and `route`'s queue alike: telling a URL from
a file, keeping its password out of logs, one connection that the threads of a process
take in turn and that is opened again when the server dropped it, and a node's name as
a folder name."""

from __future__ import annotations

import select
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "DEAD_PEER",
    "SharedConnection",
    "is_database_url",
    "node_folder",
    "redacted",
    "reopened_if_dropped",
]


#: libpq settings that notice a server gone without a word (a host down, a network cut):
#: TCP keepalives, and unacknowledged data given up after 30 s, instead of the kernel's
#: quarter of an hour of retransmissions.
DEAD_PEER: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
#: Milliseconds a statement on a `SharedConnection` may take (theirs are all short).
STATEMENT_TIMEOUT = 30_000


def is_database_url(location: str) -> bool:
    """Whether `location` names a PostgreSQL database rather than an SQLite file."""
    return location.startswith(("postgresql://", "postgres://"))


def redacted(location: str) -> str:
    """`location` without the password a database URL may hold (for logs and reprs)."""
    if not is_database_url(location):
        return location
    parts = urllib.parse.urlsplit(location)
    if parts.password is None:
        return location
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def node_folder(node: str) -> str:
    """A node's name (of those sharing a folder and a database) as one folder name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in node).strip(".") or "node"


def reopened_if_dropped(conn: Any, connect: Callable[[], Any]) -> Any:
    """The idle psycopg connection `conn`, or a new one from `connect` when the server
    dropped it (a restart, a failover). An idle connection expects nothing from the
    server: a socket with something to read is a server that said goodbye, or closed it
    (one system call, no round trip)."""
    if not (conn.broken or conn.closed):
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
        if not readable:
            return conn
    conn.close()
    return connect()


class SharedConnection:
    """One psycopg connection (autocommit) to the database at `url`, for the threads of
    a process in turn, opened again when the server dropped it. Raises `RuntimeError`
    when psycopg is not installed."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        try:
            import psycopg
        except ImportError:
            raise RuntimeError(
                "a database in PostgreSQL needs psycopg: pip install 'dicomnet[postgresql]'"
            ) from None
        self.url = url
        self.error: type[Exception] = psycopg.Error
        self._psycopg = psycopg
        self._timeout = timeout
        self._lock = threading.Lock()
        self._conn: Any = None

    def _connect(self) -> Any:
        conn = self._psycopg.connect(
            self.url,
            autocommit=True,
            connect_timeout=max(1, int(self._timeout)),
            prepare_threshold=None,
            **DEAD_PEER,
        )
        conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT}")
        return conn

    @contextmanager
    def use(self) -> Iterator[Any]:
        """The connection, to the caller alone until the block ends."""
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
            else:
                self._conn = reopened_if_dropped(self._conn, self._connect)
            yield self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
