"""The queue of `dicomnet route` in PostgreSQL (``[queue] database = "postgresql://..."``):
several route nodes share one queue folder (a shared mount) and one database, and each
copy is sent by one of them.

    QUEUE/
      .tmp/nodes/<node>/             what a node is writing (cleared when it starts)
      <destination>/<sequence>.dcm   the copies, queued or dead (their rows say which)

A row of ``route_queue`` per copy: destination, file, attempts, state (``queued`` or
``dead``, with the reason), and the node that has taken it with the end of its lease. A
copy is linked into its destination's folder, the folder fsynced and its row committed
before its C-STORE is answered. The node that queues a copy takes it at once (the file
is in its cache); a node takes copies that no node has, or whose lease ended, with
``FOR UPDATE SKIP LOCKED``: two nodes never take the same row. A node renews its leases
every third of a lease: one that stops (killed, cut off from the database) loses its
copies to the others when the lease ends; one that could not renew in time sends
nothing until it has renewed, and then only the copies its renewal found still its
own. A copy's row is deleted, only by the node that holds it, once its destination
confirmed it, then its file (a confirmation the database could not take is given to it
before the next renewal). A copy is sent twice only when it was on its way as its node
lost it: the node killed between the confirmation and the deletion (as in the folder
queue), or cut off from the database for longer than the lease while sending it.
Node names must differ (two nodes of one name would take each other's copies for
their own): a node's name is held in the database while it runs (`NodeName`), and a
second one given it is refused. Blocking: call from a worker thread.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from dicomnet.database import NODES_TABLE, NodeName, SharedConnection, node_folder, redacted
from dicomnet.route.queue import (
    DestinationStatus,
    Entry,
    QueueFull,
    Removals,
    fsync_folder,
    new_sequence,
)

__all__ = ["QueueUnavailable", "SharedQueue"]

log = logging.getLogger("dicomnet")

#: The advisory lock under which a node creates the queue's table.
_SCHEMA_LOCK = 0x44434D51  # "DCMQ"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS route_queue (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        destination TEXT NOT NULL,
        sequence TEXT NOT NULL,
        size BIGINT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL DEFAULT 'queued',
        reason TEXT,
        owner TEXT,
        lease_until TIMESTAMPTZ,
        queued_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        UNIQUE (destination, sequence))""",
    "CREATE INDEX IF NOT EXISTS route_queue_waiting ON route_queue (destination, state, id)",
    "CREATE INDEX IF NOT EXISTS route_queue_owner ON route_queue (owner)",
)

# Copies of `destination` that no node holds, or whose lease ended, and (`own`) those
# this node holds (taken back after a restart, or let out of memory), oldest first:
# taken for `lease` seconds.
_TAKE = """UPDATE route_queue SET owner = %(node)s,
        lease_until = now() + %(lease)s * interval '1 second'
    WHERE id IN (
        SELECT id FROM route_queue
        WHERE destination = %(destination)s AND state = 'queued'
            AND (owner IS NULL OR lease_until < now() OR (%(own)s AND owner = %(node)s))
        ORDER BY id LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED)
    RETURNING id, sequence, attempts"""

_STATUS = """SELECT destination,
        count(*) FILTER (WHERE state = 'queued'),
        count(*) FILTER (WHERE state = 'dead'),
        extract(epoch FROM min(queued_at) FILTER (WHERE state = 'queued')),
        coalesce(sum(size) FILTER (WHERE state = 'queued'), 0)
    FROM route_queue GROUP BY destination"""


class QueueUnavailable(OSError):
    """The queue's database could not be reached: nothing was queued (0xA700)."""


class SharedQueue:
    """The queue of `destinations` in `root` and the database at `url` (module
    docstring), as node `node`. `lease`: seconds a node keeps copies it took without
    renewing them (`renew`, every third of it); another node takes them after that."""

    def __init__(
        self,
        root: Path,
        url: str,
        node: str,
        destinations: Iterable[str] | None = None,
        *,
        lease: float = 30.0,
        fsync: bool = True,
        max_queued: int | None = None,
        recover: bool = True,
    ) -> None:
        self._db = SharedConnection(url)
        self._error = self._db.error
        self.root = Path(root)
        self.url = url
        self.node = node
        self.lease = lease
        self.rescan_every = min(1.0, lease / 4)
        self.fsync = fsync
        self.max_queued = max_queued
        self._tag = node_folder(node)
        self._running = recover  # a node's router (not a look at the queue from outside)
        self.tmp = self.root / ".tmp" / "nodes" / self._tag
        if recover:
            shutil.rmtree(self.tmp, ignore_errors=True)  # never acknowledged
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._removals = Removals()
        self._renewed = -float("inf")  # time.monotonic() of the last renewal sent
        # The rows this node surely holds: those its last renewal renewed, and those it
        # took since (`_since`, while a renewal is under way). A copy is sent only then.
        self._held: set[int] = set()
        self._since: set[int] | None = None
        self._state = threading.Lock()
        # What the database could not be told (a confirmation, a dead letter): told
        # before the next renewal, so that a copy sent is not sent again.
        self._owed: list[tuple[str, tuple[Any, ...], Path | None]] = []
        try:
            self._create_table()
            names = list(destinations) if destinations is not None else self._known_destinations()
        except self._error as exc:
            raise QueueUnavailable(f"the database at {redacted(url)}: {exc}") from None
        self.destinations = names
        for name in names:
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self._name = NodeName(self._db, "route", node, lease)
        if recover:
            try:  # before anything of the queue is taken as this node's
                self._name.claim(wait=lease * 1.5)
            except self._error as exc:
                raise QueueUnavailable(f"the database at {redacted(url)}: {exc}") from None
            self.renew()

    def _create_table(self) -> None:
        with self._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in (*_SCHEMA, NODES_TABLE):
                conn.execute(statement)

    def __repr__(self) -> str:
        return f"SharedQueue({str(self.root)!r}, {redacted(self.url)!r}, node={self.node!r})"

    def _connection(self) -> AbstractContextManager[Any]:
        """The node's connection (opened again when the server dropped it), to itself."""
        return self._db.use()

    def _known_destinations(self) -> list[str]:
        with self._connection() as conn:
            rows = conn.execute("SELECT DISTINCT destination FROM route_queue").fetchall()
        return sorted({r[0] for r in rows} | {p.parent.name for p in self.root.glob("*/*.dcm")})

    def temp_path(self) -> Path:
        """Where to write an instance (or a coerced copy) before `put`."""
        return self.tmp / f"{new_sequence()}.dcm"

    def has_room(self, destinations: Iterable[str]) -> bool:
        if self.max_queued is None:
            return True
        names = list(destinations)
        try:
            with self._connection() as conn:
                rows = conn.execute(
                    "SELECT destination, count(*) FROM route_queue WHERE state = 'queued' "
                    "AND destination = ANY(%s) GROUP BY destination",
                    (names,),
                ).fetchall()
        except self._error:
            return True  # `put` says what is wrong
        return all(count < self.max_queued for _, count in rows)

    def put(self, copies: Mapping[str, Path]) -> list[Entry]:
        """Queue the files of `copies` (destination -> a file written under `temp_path`,
        fsynced by its writer when `fsync`) and take them for this node. When this
        returns, every copy is durable. `QueueUnavailable` when the database is not
        there (nothing queued)."""
        if not self.has_room(copies):
            raise QueueFull(f"a queue of {', '.join(copies)} is full ({self.max_queued})")
        sequence = f"{new_sequence()}-{self._tag}"
        targets = {name: self.root / name / f"{sequence}.dcm" for name in copies}
        for name, source in copies.items():
            os.link(source, targets[name])
        if self.fsync:
            for target in targets.values():
                fsync_folder(target.parent)
        try:
            rows = self._insert(sequence, copies)
        except self._error as exc:
            for target in targets.values():
                target.unlink(missing_ok=True)
            raise QueueUnavailable(f"the queue's database: {exc}") from None
        for source in set(copies.values()):
            source.unlink()
        self._hold(rows.values())
        return [Entry(name, targets[name], sequence, 0, rows[name]) for name in copies]

    def _hold(self, rows: Iterable[int]) -> None:
        with self._state:
            self._held.update(rows)
            if self._since is not None:
                self._since.update(rows)

    def _insert(self, sequence: str, copies: Mapping[str, Path]) -> dict[str, int]:
        values = ", ".join("(%s, %s, %s, %s, now() + %s * interval '1 second')" for _ in copies)
        params: list[Any] = []
        for name, source in copies.items():
            params += [name, sequence, source.stat().st_size, self.node, self.lease]
        with self._connection() as conn:
            cursor = conn.execute(
                "INSERT INTO route_queue (destination, sequence, size, owner, lease_until) "
                f"VALUES {values} RETURNING destination, id",
                params,
            )
            return {name: row for name, row in cursor.fetchall()}

    def pending(
        self, destination: str, limit: int | None = None, *, own: bool = True
    ) -> list[Entry]:
        """Take the copies for `destination` that no node has, oldest first, `limit` at
        most (None: all), with (`own`) those this node has taken before.
        `QueueUnavailable` when the database is not there."""
        params = {"node": self.node, "lease": self.lease, "destination": destination, "own": own}
        try:
            with self._connection() as conn:
                rows = conn.execute(_TAKE, {**params, "limit": limit}).fetchall()
        except self._error as exc:
            raise QueueUnavailable(f"queue {destination}: could not take copies: {exc}") from None
        self._hold(row for row, _, _ in rows)
        folder = self.root / destination
        return [
            Entry(destination, folder / f"{sequence}.dcm", sequence, attempts, row)
            for row, sequence, attempts in sorted(rows)
        ]

    def _update(self, sql: str, params: tuple[Any, ...]) -> int:
        """Run `sql` on a copy of this node; how many rows it changed (0: the copy is no
        longer this node's: another took it after its lease ended)."""
        with self._connection() as conn:
            count: int = conn.execute(sql, params).rowcount
        return count

    def done(self, entry: Entry) -> None:
        """The destination confirmed `entry` (or its file is gone): its row goes, then its
        file (made durable by `sync_removals`). A confirmation the database could not
        record is recorded before the next renewal."""
        sql, params = "DELETE FROM route_queue WHERE id = %s AND owner = %s", (entry.row, self.node)
        try:
            gone = self._update(sql, params)
        except self._error as exc:
            log.warning("sent %s; recorded once the database is back (%s)", entry, exc)
            with self._state:
                self._owed.append((sql, params, entry.path))
            return
        if not gone:
            log.warning("%s was taken by another node before it was sent: sent twice", entry)
            return
        self._removed(entry.path)

    def _removed(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        if self.fsync:
            self._removals.add(path.parent)

    def sync_removals(self) -> int:
        """Make the removals so far durable (fsync their folders); how many folders."""
        return self._removals.sync()

    def failed(self, entry: Entry) -> Entry:
        """One more attempt of `entry` failed."""
        try:
            self._update(
                "UPDATE route_queue SET attempts = attempts + 1 WHERE id = %s AND owner = %s",
                (entry.row, self.node),
            )
        except self._error as exc:
            log.warning("could not count a failed attempt of %s: %s", entry, exc)
        return Entry(entry.destination, entry.path, entry.sequence, entry.attempts + 1, entry.row)

    def give_up(self, entry: Entry, reason: str) -> Entry:
        """`entry` becomes a dead letter, with `reason` (its file stays where it is; the
        database told before the next renewal if it cannot be now)."""
        sql = (
            "UPDATE route_queue SET state = 'dead', reason = %s, attempts = %s, "
            "owner = NULL, lease_until = NULL WHERE id = %s AND owner = %s"
        )
        params = (reason, entry.attempts + 1, entry.row, self.node)
        try:
            self._update(sql, params)
        except self._error as exc:
            log.warning("gave up %s; recorded once the database is back (%s)", entry, exc)
            with self._state:
                self._owed.append((sql, params, None))
        return entry

    def retry_dead(self, destination: str) -> int:
        """Put `destination`'s dead letters back in its queue (attempts from zero)."""
        return self._update(
            "UPDATE route_queue SET state = 'queued', reason = NULL, attempts = 0 "
            "WHERE destination = %s AND state = 'dead'",
            (destination,),
        )

    def last_reason(self, destination: str) -> str | None:
        """Why the latest dead letter of `destination` was given up."""
        with self._connection() as conn:
            row = conn.execute(
                "SELECT reason FROM route_queue WHERE destination = %s AND state = 'dead' "
                "ORDER BY id DESC LIMIT 1",
                (destination,),
            ).fetchone()
        return None if row is None else str(row[0])

    def renew(self) -> None:
        """Tell the database what it was owed, then renew the leases of every copy this
        node holds (the router's task, every third of a lease). One that fails is
        logged: the copies are let go when their leases end, and `holds` says so before
        then; the rows renewed are those still this node's (after a lapse, others may
        have taken some)."""
        started = time.monotonic()
        with self._state:
            self._since = set()
        try:
            self._settle()
            if not self._name.renew():
                log.error("queue: another router took the node name %r", self.node)
            with self._connection() as conn:
                rows = conn.execute(
                    "UPDATE route_queue SET lease_until = now() + %s * interval '1 second' "
                    "WHERE owner = %s AND state = 'queued' RETURNING id",
                    (self.lease, self.node),
                ).fetchall()
        except self._error as exc:
            log.warning("queue: could not renew this node's leases: %s", exc)
            with self._state:
                self._since = None
            return
        with self._state:
            self._held = {row for (row,) in rows} | (self._since or set())
            self._since = None
            self._renewed = started

    def _settle(self) -> None:
        """Run what the database was owed, in order."""
        while self._owed:
            sql, params, path = self._owed[0]
            if self._update(sql, params) and path is not None:
                self._removed(path)
            with self._state:
                self._owed.pop(0)

    def holds(self, entry: Entry) -> bool:
        """Whether this node surely holds `entry` for a while yet (a copy is sent only
        then): renewed lately, and among the rows renewed or taken since."""
        if time.monotonic() >= self._renewed + self.lease * 5 / 6:
            return False
        with self._state:
            return entry.row in self._held

    def status(self, now: float | None = None) -> dict[str, DestinationStatus]:
        """Per destination: copies queued, dead letters, the oldest one's age."""
        now = time.time() if now is None else now
        try:
            with self._connection() as conn:
                rows = conn.execute(_STATUS).fetchall()
        except self._error as exc:
            raise QueueUnavailable(f"the queue's database: {exc}") from None
        out = {name: DestinationStatus(0, 0, None, 0) for name in self.destinations}
        for name, queued, dead, oldest, size in rows:
            age = None if oldest is None else max(0.0, now - float(oldest))
            out[name] = DestinationStatus(queued, dead, age, int(size))
        return out

    def close(self) -> None:
        """Let go of the copies this node holds (another node may take them at once);
        a look from outside (`recover=False`: `route status`) lets go of nothing."""
        if not self._running:
            self._db.close()
            return
        try:
            self._update(
                "UPDATE route_queue SET owner = NULL, lease_until = NULL WHERE owner = %s",
                (self.node,),
            )
            self._name.release()
        except self._error as exc:
            log.warning("queue: could not let go of this node's copies: %s", exc)
        self._db.close()
