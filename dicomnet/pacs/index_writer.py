"""How the index is written: a batch of records (`index_records.Record`) into the
tables of `index_schema`, in either database (`index_db`). `Index` reads the files and
calls this; nothing here reads a file.

A batch goes in one adding transaction: the parents of each record upserted in place
(a study or series that moves reads, and in PostgreSQL locks, the parent it leaves),
then the instance rows at once; then, in a transaction that runs alone, the parents
that moved or replaced instances left empty are pruned. Adding transactions of several
nodes run side by side (`Database.write(adding=True)`), and lock shared rows in one
order, by patient, study and series.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import cast

from dicomnet.pacs.index_db import Database, Executor
from dicomnet.pacs.index_records import Record
from dicomnet.pacs.index_schema import PARENT_TABLES, Statements

__all__ = ["IndexWriter", "Parents"]

log = logging.getLogger("dicomnet.index")

#: Times a batch is tried when the database ended it in a deadlock with another node's.
_ATTEMPTS = 3

#: Series, studies and patients (their pks) that may have been left empty.
Parents = tuple[set[int], set[int], set[int]]


def _lock_order(item: tuple[str, Record]) -> tuple[str, str, str]:
    """The order a batch is stored in: by patient, study and series."""
    rows = item[1].rows
    return (str(rows["patient"][0] or ""), str(rows["study"][0]), str(rows["series"][0]))


class IndexWriter:
    """Writes batches of records into the index database `db` with its dialect's
    `statements` (module docstring)."""

    def __init__(self, db: Database, statements: Statements) -> None:
        self._db = db
        self._statements = statements

    def add_records(self, records: list[tuple[str, Record]]) -> int:
        """Store `records` in one adding transaction (beside other nodes' adding ones),
        then, in one that runs alone, prune the parents that moved or replaced
        instances left empty. In the order of their patient, study and series, so that
        transactions of several nodes lock shared rows in one order (a deadlock, should
        one happen all the same, is tried again). Of one instance given twice, the
        later is stored (the earlier counts as indexed, replaced at once)."""
        latest = {record.sop_instance_uid: (path, record) for path, record in records}
        replaced = len(records) - len(latest)
        ordered = sorted(latest.values(), key=_lock_order)
        for attempt in range(_ATTEMPTS):
            try:
                with self._db.write(adding=True) as conn:
                    count, old = self.store_all(conn, ordered)
                break
            except self._db.refused_value:  # a value the database cannot hold: one by one
                with self._db.write(adding=True) as conn:
                    count, old = self.store_all(conn, ordered, guarded=True)
                break
            except self._db.contended:
                if attempt == _ATTEMPTS - 1:
                    raise
                log.info("index: a deadlock with another node's transaction: again")
        if any(old):
            try:
                with self._db.write() as conn:
                    self.prune(conn, *old)
            except self._db.errors as exc:  # indexed all the same: pruned by a reconcile
                log.warning("index: parents left empty stay until a reconcile: %s", exc)
        return count + replaced

    def store_all(
        self, conn: Executor, records: Iterable[tuple[str, Record]], guarded: bool = False
    ) -> tuple[int, Parents]:
        """Store `records`, at once; `guarded`: each in a savepoint of its own, so that
        one the database refuses is logged and left out (a round trip more per record,
        so taken only when a batch was refused). How many, and the parents to prune."""
        cache: dict[str, tuple[object, int]] = {}
        old: Parents = (set(), set(), set())
        if not guarded:
            batch = [record for _, record in records]
            self._store(conn, batch, cache, old)
            return len(batch), old
        count = 0
        for path, record in records:
            try:
                with self._db.one_record(conn):
                    self._store(conn, [record], cache, old)
            except self._db.refused_value as exc:  # the others of the batch go in
                log.warning("not indexed: %s: %s", path, exc)
                cache.clear()
                continue
            count += 1
        return count, old

    def _store(
        self,
        conn: Executor,
        records: list[Record],
        cache: dict[str, tuple[object, int]],
        old: Parents,
    ) -> None:
        """Upsert instances and their parents; add to `old` the parents they may have
        left empty (pruned after, by the caller: `prune`).

        The parents of every record first (`_parents`), then the instance rows all at
        once (in PostgreSQL, one round trip for all: `Database.insert_each`); only an
        instance indexed before (a conflict) is looked up, to be updated, and the
        series, study and patient it may have left noted."""
        rows = [
            [self._parents(conn, record, cache, old), *record.rows["instance"]]
            for record in records
        ]
        inserted = self._db.insert_each(conn, self._statements.insert_instance, rows)
        for record, instance, new in zip(records, rows, inserted, strict=True):
            if new:
                continue
            # Indexed before: it may leave its series (and their parents) empty.
            row = conn.execute(
                self._statements.instance_parents, (record.sop_instance_uid,)
            ).fetchone()
            if row is not None:
                for pks, pk in zip(old, row[1:4], strict=True):
                    pks.add(pk)
            conn.execute(self._statements.upserts["instance"][0], instance)

    def _parents(
        self,
        conn: Executor,
        record: Record,
        cache: dict[str, tuple[object, int]],
        old: Parents,
    ) -> int:
        """Upsert the patient, study and series of `record`; its series' pk.

        `cache` (per transaction) remembers the last patient / study / series row
        written: an instance whose parents are the same as the previous one's skips
        their upserts (a rebuild walks folders series by series). A study or series that
        moves to another parent adds the one it leaves to `old` (series, studies,
        patients) to be pruned. An instance without Patient ID goes to the patient of
        its study (`_patient_without_id`)."""
        parent: int | None = None
        study_uid = cast(str, record.rows["study"][0])
        for table in PARENT_TABLES:
            values = record.rows[table.name]
            without_id = table.name == "patient" and not values[0]
            key = (study_uid if without_id else parent, *values)
            hit = cache.get(table.name)
            if hit is not None and hit[0] == key:
                parent = hit[1]
                continue
            if without_id:
                parent = self._patient_without_id(conn, values, study_uid)
                cache[table.name] = (key, parent)
                continue
            params = [parent, *values] if table.parent else values
            row = None
            if table.parent:  # the usual case: new, or under the same parent as before
                row = conn.execute(self._statements.upserts_in_place[table.name], params)
                row = row.fetchone()
            if row is None and table.parent:  # under another parent: it moves
                self._leaving(conn, table.name, values[0], old)
            if row is None:
                row = conn.execute(self._statements.upserts[table.name][0], params).fetchone()
            parent = row[0]
            cache[table.name] = (key, cast(int, parent))
        return cast(int, parent)

    def _leaving(self, conn: Executor, level: str, uid: object, old: Parents) -> None:
        """Note the parents that the study or series of `uid` leaves (to be pruned if
        left empty). The row is read, and in PostgreSQL locked, only now: a row another
        node has just added is seen with the parent it committed."""
        _, old_studies, old_patients = old
        for parents in conn.execute(self._statements.parent_of[level], (uid,)):
            if level == "series":
                old_studies.add(parents[0])
            old_patients.add(parents[-1])

    def _patient_without_id(
        self, conn: Executor, values: list[str | int | None], study_uid: str
    ) -> int:
        """The patient of an instance without Patient ID: the patient of its study if
        that is indexed (updated with the instance's values unless it has an ID, of
        which the instance says nothing), else a new patient of its own."""
        row = conn.execute(self._statements.study_patient, (study_uid,)).fetchone()
        if row is not None and row[1]:
            return int(row[0])
        pk = None if row is None else row[0]
        upsert = self._statements.upsert_patient_by_pk
        return int(conn.execute(upsert, [pk, *values]).fetchone()[0])

    def prune(self, conn: Executor, series: set[int], studies: set[int], patients: set[int]) -> int:
        """Delete the given entities that no longer have children, bottom up; returns
        how many rows went."""
        deleted = 0
        for sql, pks in zip(self._statements.prune, (series, studies, patients), strict=True):
            for pk in pks:
                deleted += conn.execute(sql, (pk, pk)).rowcount
        return deleted

    def prune_all(self, conn: Executor) -> None:
        """Delete every series, study and patient left without instances."""
        for sql in self._statements.prune_all:
            conn.execute(sql)
