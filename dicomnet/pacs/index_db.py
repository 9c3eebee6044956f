"""The database under the index: SQLite (a file, the embedded default) or PostgreSQL (a
``postgresql://`` URL, through psycopg 3, the ``postgresql`` extra), behind one small
interface: write transactions on one shared connection, reads on connections of their
own, and the schema created (or recreated, when of another version) on opening.

SQLite: WAL mode, so a query reads one snapshot and never blocks writers; writers in
several processes wait for each other (busy timeout); ``synchronous = NORMAL`` (a
commit survives a crash of the process; the files are the truth, `Index.rebuild`
restores the index from them). PostgreSQL: every node of an archive connects to the
same database; a committed write is seen by every later query on any node, and a query
streams its rows through a server-side cursor. The schema is created under an advisory
lock, so nodes starting at once create it once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from dicomnet import database
from dicomnet.database import redacted, reopened_if_dropped
from dicomnet.pacs import index_schema
from dicomnet.pacs.index_schema import TABLES, schema_statements
from dicomnet.pacs.matching import POSTGRESQL, SQLITE, SqlDialect

__all__ = [
    "SCHEMA_LOCK",
    "Database",
    "Executor",
    "PostgreSQLDatabase",
    "SQLiteDatabase",
    "SchemaTooNew",
]

log = logging.getLogger("dicomnet.index")


class SchemaTooNew(RuntimeError):
    """The index was written by a newer dicomnet (a later schema version): a node of an
    older one must not recreate what the newer nodes use."""


def _bring_to(conn: Any, found: int | None, version: int, dialect: SqlDialect, where: str) -> bool:
    """Make the index of `conn`, of schema version `found` (None: none there, or not
    whole), one of `version`: migrated (`index_schema.MIGRATIONS`), or dropped and
    created empty. Whether it was created (to be rebuilt from the files)."""
    if found is not None:
        steps = index_schema.migration_statements(found, version, dialect)
        if steps is not None:
            for statement in steps:
                conn.execute(statement)
            log.info("index %s: schema version %d migrated to %d", where, found, version)
            return False
        if found > version and dialect is POSTGRESQL:  # nodes of a newer dicomnet use it
            raise SchemaTooNew(
                f"the index at {where} has schema version {found}, newer than this "
                f"dicomnet's ({version}): upgrade dicomnet on this node"
            )
        log.warning("index %s has schema version %s, not %d: recreating it", where, found, version)
    cascade = " CASCADE" if dialect is POSTGRESQL else ""
    for name in reversed([t.name for t in TABLES]):
        conn.execute(f"DROP TABLE IF EXISTS {name}{cascade}")
    for statement in schema_statements(dialect):
        conn.execute(statement)
    return True


class Executor(Protocol):
    """What the index runs its SQL on (a connection of either database)."""

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...


class Database(Protocol):
    dialect: SqlDialect
    #: What the database raises for a value it cannot hold (only that record is lost).
    refused_value: type[Exception] | tuple[type[Exception], ...]
    #: True when opening created the schema: the caller rebuilds the index from files.
    created: bool
    #: The file's path or the database's URL.
    location: str

    #: What a transaction may end in when another node's contends for the same rows
    #: (a deadlock): worth trying again.
    contended: type[Exception] | tuple[type[Exception], ...]
    #: Every error the database may raise.
    errors: type[Exception]

    def write(self, *, adding: bool = False) -> AbstractContextManager[Executor]:
        """One write transaction (serialised with the other writes of this process).
        `adding`: it only adds and updates rows (no delete), and may run beside other
        nodes' adding transactions; any other runs alone."""
        ...

    def read(self) -> AbstractContextManager[Executor]:
        """A connection of its own for one query, closed after."""
        ...

    def insert_each(self, conn: Executor, sql: str, rows: list[list[Any]]) -> list[bool]:
        """Run the ``INSERT ... RETURNING`` `sql` for each of `rows` (in a write
        transaction): whether each inserted a row."""
        ...

    def one_record(self, conn: Executor) -> AbstractContextManager[object]:
        """Around the statements of one record in a write transaction: undone alone
        when it raises `refused_value`."""
        ...

    def close(self) -> None: ...

    @property
    def closed(self) -> bool: ...


class _Connected:
    """One write connection, shared by the threads of a process under a lock."""

    _conn: Any

    def __init__(self) -> None:
        self._lock = threading.RLock()

    @property
    def closed(self) -> bool:
        return self._conn is None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _open(self) -> Any:
        """The write connection (the caller holds the lock)."""
        if self._conn is None:
            raise RuntimeError("the index is closed")
        return self._conn


class _NeverRaised(Exception):
    pass


class SQLiteDatabase(_Connected):
    """The index's SQLite file (created with its folder if missing)."""

    dialect = SQLITE
    refused_value: type[Exception] | tuple[type[Exception], ...] = _NeverRaised  # any value fits
    contended: type[Exception] | tuple[type[Exception], ...] = _NeverRaised  # writers queue
    errors: type[Exception] = sqlite3.Error

    def one_record(self, conn: Executor) -> AbstractContextManager[object]:
        return contextlib.nullcontext()

    def insert_each(self, conn: Executor, sql: str, rows: list[list[Any]]) -> list[bool]:
        return [conn.execute(sql, row).fetchone() is not None for row in rows]

    def __init__(self, path: Path, version: int, timeout: float) -> None:
        super().__init__()
        self.path = path
        self.location = str(path)
        self.timeout = timeout
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(
            path, timeout=timeout, check_same_thread=False, isolation_level=None
        )
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self.created = False
        with self.write() as conn:
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'").fetchone()
            if found != version or tables is None:
                self.created = _bring_to(
                    conn, found if tables else None, version, SQLITE, str(path)
                )
                conn.execute(f"PRAGMA user_version = {version}")

    @contextmanager
    def write(self, *, adding: bool = False) -> Iterator[Executor]:
        with self._lock:  # SQLite's writers take turns, adding or not
            conn = self._open()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[Executor]:
        # check_same_thread=False: successive next() calls of a query iterator may run
        # on different worker threads (never two at once). mode=rw: never creates the file.
        self._open()
        conn = sqlite3.connect(
            f"{Path(os.path.abspath(self.path)).as_uri()}?mode=rw",
            uri=True,
            timeout=self.timeout,
            check_same_thread=False,
            isolation_level=None,
        )
        try:
            conn.execute("PRAGMA query_only = ON")
            yield conn
        finally:
            conn.close()


#: Rows a query fetches from its server-side cursor per round trip (about 0.5 KB each).
_FETCH_ROWS = 500
#: Reader connections kept open between queries (PostgreSQL starts a process for each).
_IDLE_READERS = 8
#: The advisory lock under which a node creates (or recreates) the schema.
SCHEMA_LOCK = 0x44434D4E  # "DCMN"
#: Seconds a write waits for its turn at most (PostgreSQL's ``lock_timeout``).
WRITE_WAIT = 10.0
#: The advisory lock each write transaction holds to its end: shared by those that only
#: add, exclusive for the others.
_WRITE_LOCK = 0x44434D57  # "DCMW"


class _Reader:
    """A PostgreSQL connection for one query: each statement on a server-side cursor."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._cursors = 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        self._cursors += 1
        cursor = self._conn.cursor(name=f"dicomnet_{self._cursors}")
        cursor.itersize = _FETCH_ROWS
        cursor.execute(sql, params)
        return cursor


class PostgreSQLDatabase(_Connected):
    """The index in a PostgreSQL database (and schema: the URL's ``search_path``)."""

    dialect = POSTGRESQL

    def __init__(self, url: str, version: int, timeout: float) -> None:
        psycopg = database.psycopg()
        super().__init__()
        self._idle: list[Any] = []  # reader connections between queries
        self._idle_lock = threading.Lock()
        self.refused_value: type[Exception] | tuple[type[Exception], ...] = (
            psycopg.DataError,
            UnicodeEncodeError,
        )
        self.contended: type[Exception] | tuple[type[Exception], ...] = (
            psycopg.errors.DeadlockDetected
        )
        self.errors: type[Exception] = psycopg.Error
        self.location = url
        self._timeout = timeout
        self._conn = self._connect(autocommit=True)
        try:
            self.created = self._create_schema(version)  # waits as long as a rebuild
            self._wait_at_most(self._conn)
        except BaseException:
            self._conn.close()
            raise

    def _connect(self, autocommit: bool) -> Any:
        return database.connect(self.location, autocommit=autocommit, timeout=self._timeout)

    def _create_schema(self, version: int) -> bool:
        with self.write() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            kept = conn.execute("SELECT to_regclass('dicomnet_schema')").fetchone()[0]
            found = conn.execute("SELECT version FROM dicomnet_schema").fetchone() if kept else None
            tables = [
                name
                for name in (t.name for t in TABLES)
                if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()[0] is not None
            ]
            whole = len(tables) == len(TABLES)
            if found is not None and found[0] == version and whole:
                return False
            # This version without its tables, or tables without a version: made anew.
            # Another version (a newer one may have none of these tables): migrated,
            # recreated or refused, as it says.
            known = found[0] if found is not None and found[0] != version else None
            where = redacted(self.location)
            created = _bring_to(conn, known, version, POSTGRESQL, where)
            conn.execute("DROP TABLE IF EXISTS dicomnet_schema")
            conn.execute("CREATE TABLE dicomnet_schema (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO dicomnet_schema VALUES (%s)", (version,))
            return created

    @contextmanager
    def write(self, *, adding: bool = False) -> Iterator[Executor]:
        """One write transaction, holding an advisory lock to its commit: shared by the
        adding transactions of every node (they run side by side; rows they both touch
        are locked row by row), exclusive for any other: pruning a parent that another
        node's transaction is giving a child waits for that transaction, so it cannot
        delete that child. A connection lost (the server restarted, a failover) is
        opened again for the next write."""
        lock = "pg_advisory_xact_lock_shared" if adding else "pg_advisory_xact_lock"
        with self._lock:
            conn = self._conn = reopened_if_dropped(self._open(), self._connect_writer)
            with conn.transaction():
                conn.execute(f"SELECT {lock}(%s)", (_WRITE_LOCK,))
                yield conn

    def _connect_writer(self) -> Any:
        """The write connection: a write waits `WRITE_WAIT` at most for its turn (for a
        rebuild, say, that holds every node's writes): then it fails, and the stores
        it was for are refused, to be sent again, rather than left hanging."""
        return self._wait_at_most(self._connect(autocommit=True))

    @staticmethod
    def _wait_at_most(conn: Any) -> Any:
        conn.execute(f"SET lock_timeout = {int(WRITE_WAIT * 1000)}")
        return conn

    def _connect_reader(self) -> Any:
        return self._connect(autocommit=False)

    def insert_each(self, conn: Executor, sql: str, rows: list[list[Any]]) -> list[bool]:
        """All of `rows` in one round trip (psycopg's pipeline), their results after."""
        if not rows:
            return []
        cursor = conn.cursor()  # type: ignore[attr-defined]
        cursor.executemany(sql, rows, returning=True)
        inserted = []
        while True:
            inserted.append(cursor.fetchone() is not None)
            if not cursor.nextset():
                return inserted

    def one_record(self, conn: Executor) -> AbstractContextManager[object]:
        transaction: AbstractContextManager[object] = conn.transaction()  # type: ignore[attr-defined]
        return transaction  # a savepoint

    @contextmanager
    def read(self) -> Iterator[Executor]:
        self._open()
        with self._idle_lock:
            kept = self._idle.pop() if self._idle else None
        if kept is None:
            conn = self._connect_reader()
        else:
            conn = reopened_if_dropped(kept, self._connect_reader)
        try:
            with conn.transaction():
                yield _Reader(conn)
        except BaseException:
            conn.close()
            raise
        with self._idle_lock:  # kept for the next query: a new connection costs milliseconds
            if self._conn is not None and len(self._idle) < _IDLE_READERS:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._idle_lock:
            for conn in self._idle:
                conn.close()
            self._idle.clear()
        super().close()
