"""Databases that several processes and nodes share (PostgreSQL, through psycopg 3, the
``postgresql`` extra), for `serve`'s index and `route`'s queue alike: telling a URL from
a file, keeping its password out of logs, one connection that the threads of a process
take in turn and that is opened again when the server dropped it, and a node's name as
a folder name."""

from __future__ import annotations

import os
import secrets
import select
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "DEAD_PEER",
    "NODES_TABLE",
    "NodeInUse",
    "NodeName",
    "SharedConnection",
    "connect",
    "is_database_url",
    "node_folder",
    "psycopg",
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


def psycopg() -> Any:
    """The psycopg module; `RuntimeError` saying how to install it when it is not."""
    try:
        import psycopg
    except ImportError:
        raise RuntimeError(
            "a database in PostgreSQL needs psycopg: pip install 'dicomnet[postgresql]'"
        ) from None
    return psycopg


def connect(url: str, *, autocommit: bool = True, timeout: float = 10.0) -> Any:
    """A psycopg connection to `url` as dicomnet's are: statements sent as they are
    (behind a pooler too), a server gone without a word noticed (`DEAD_PEER`)."""
    return psycopg().connect(
        url,
        autocommit=autocommit,
        connect_timeout=max(1, int(timeout)),
        prepare_threshold=None,
        **DEAD_PEER,
    )


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
        self.url = url
        self.error: type[Exception] = psycopg().Error
        self._timeout = timeout
        self._lock = threading.Lock()
        self._conn: Any = None

    def _connect(self) -> Any:
        conn = connect(self.url, timeout=self._timeout)
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


class NodeInUse(OSError):
    """Another running process holds this node name."""


#: The table of `NodeName`, to create (under a lock of the caller's) before a claim.
NODES_TABLE = """CREATE TABLE IF NOT EXISTS dicomnet_node (
    kind TEXT NOT NULL,
    node TEXT NOT NULL,
    token TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    seen TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (kind, node))"""

# Taken when free: nobody holds it, its holder has not been seen for a lease, or the
# holder is named (`token`) as a process of this host that is gone (or this one).
_CLAIM = """INSERT INTO dicomnet_node VALUES (%(kind)s, %(node)s, %(token)s, %(host)s,
        %(pid)s, now())
    ON CONFLICT (kind, node) DO UPDATE SET token = excluded.token, host = excluded.host,
        pid = excluded.pid, seen = now()
    WHERE dicomnet_node.seen < now() - %(lease)s * interval '1 second'
        OR dicomnet_node.token = %(gone)s
    RETURNING token"""


def _gone(host: str, pid: int) -> bool:
    """Whether process `pid` of `host` is this one, or no longer runs (as far as this
    host can tell: another host's processes cannot be seen from here)."""
    if host != socket.gethostname():
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it runs, as another user
        return False
    return False


class NodeName:
    """A node's name among those sharing a database, held there while the node runs
    (table ``dicomnet_node``, per `kind` of node): a second process given a name in
    use (a mistake that would make both take the same work for their own) is refused
    (`NodeInUse`). A node restarted on the same host takes its name back at once; one
    that vanished lets it go `lease` seconds after it was last seen (`renew`)."""

    def __init__(self, db: SharedConnection, kind: str, node: str, lease: float) -> None:
        self._db = db
        self.kind, self.node, self.lease = kind, node, lease
        self._token = secrets.token_hex(8)

    def claim(self, wait: float) -> None:
        """Take the name, waiting `wait` seconds at most for its holder to let it go."""
        params = {
            "kind": self.kind,
            "node": self.node,
            "token": self._token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "lease": self.lease,
        }
        deadline = time.monotonic() + wait
        while True:
            with self._db.use() as conn:
                holder = conn.execute(
                    "SELECT token, host, pid, extract(epoch FROM now() - seen)"
                    " FROM dicomnet_node WHERE kind = %s AND node = %s",
                    (self.kind, self.node),
                ).fetchone()
                gone = holder[0] if holder is not None and _gone(holder[1], holder[2]) else ""
                if conn.execute(_CLAIM, {**params, "gone": gone}).fetchone() is not None:
                    return
            if time.monotonic() >= deadline:
                raise NodeInUse(
                    f"node name {self.node!r} is in use by a running process (on "
                    f"{holder[1]}, seen {float(holder[3]):.0f} s ago): give each node a "
                    "name of its own"
                )
            time.sleep(min(1.0, self.lease / 4))

    def renew(self) -> bool:
        """Say this node still runs; False if another process has taken the name."""
        with self._db.use() as conn:
            cursor = conn.execute(
                "UPDATE dicomnet_node SET seen = now() WHERE kind = %s AND node = %s"
                " AND token = %s",
                (self.kind, self.node, self._token),
            )
            return bool(cursor.rowcount)

    def release(self) -> None:
        with self._db.use() as conn:
            conn.execute(
                "DELETE FROM dicomnet_node WHERE kind = %s AND node = %s AND token = %s",
                (self.kind, self.node, self._token),
            )
