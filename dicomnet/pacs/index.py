"""The embedded Query/Retrieve index behind `dicomnet serve`: SQLite, in the storage folder.

`Index` keeps, for every stored instance, the attributes of the Patient Root and
Study Root Query/Retrieve information models (PS3.4 §C.6.1.1, §C.6.2.1) that are
Unique or Required keys at some level, plus a few common optional ones, and the
instance's file (path relative to the storage folder), transfer syntax and size.

- `Index.query(model, level, identifier)` answers a C-FIND: hierarchical (baseline)
  search per PS3.4 §C.4.1.2.1 / §C.4.1.3.1, or relational search (§C.4.1.3.2.2)
  when the SCU negotiated it (``relational=True``), attribute matching per §C.2.2.2 done
  in SQLite (`dicomnet.pacs.matching`), one response identifier per match, streamed from
  a cursor. Return keys the index does not hold are read from a stored file of the
  matching entity, and only when asked for (matching on them is then done in
  Python on that file, §C.2.2.2.6 sequence matching included). When the SCU
  negotiated combined date-time matching (``combined_datetime=True``), a Date key
  and its Time key that are both ranges are one date-time range
  (§C.2.2.2.5.4, `dicomnet.pacs.combined`): in SQL for the indexed pairs (Study,
  Series Date / Time), on each response for the others. Empty Value Matching
  (``""``, §C.2.2.2.7) of a derived key (ModalitiesInStudy, SOPClassesInStudy)
  matches the studies where no series / instance has a value.
- `Index.files(model, level, identifier)` lists what a C-MOVE / C-GET retrieves
  (PS3.4 §C.4.2.2.1, §C.4.3.2.1: unique keys at and above the level, a list of UIDs
  allowed at the level; with relational retrieve, ``relational=True``,
  §C.4.2.3.2.1 / §C.4.3.3.2.1, the unique keys above the level may be left out).
- `Index.add` / `add_many` / `remove` / `rebuild` keep it up to date.

Where baseline hierarchical search leaves the SCP a choice, this one is lenient:
Required / Optional keys of levels above the query level (which an SCU should not
send) are matched and returned like the others; the unique key of the query level
may be absent; a key whose level is not known (a private or rare attribute) is
taken as an Optional key of the query level, read from the files. Keys of levels
below the query level are refused.

With relational queries (§C.4.1.3.2.1), keys of any level above the query level
may be given without the unique keys of those levels: every key is matched, a
level without keys matching every entity. The unique keys above that an SCU does
send are matched like other keys (a list or a pattern included).

Errors in an identifier raise `QueryError(status, message)`: 0xA900 (Identifier
does not match SOP Class) for a missing or wrong Query/Retrieve Level, keys below
the level, or, unless relational queries / retrieves were negotiated, missing or
non-single unique keys of the levels above; 0xC000 (Unable to process) for a key
value that cannot be matched (a DA range that is not a date range, ...).

The parts: `dicomnet.pacs.index_schema` (the tables and how each key reads in SQL),
`dicomnet.pacs.index_plan` (identifiers checked and planned into SQL, `QueryError`),
`dicomnet.pacs.index_files` and `index_records` (the values stored and the rows of an
instance, read from data sets and files), `dicomnet.pacs.index_responses` (C-FIND
responses from rows), `dicomnet.pacs.index_db` (SQLite or PostgreSQL), and `Index` here
(adding, removing, querying, retrieving).

Threads: nothing here is async (the async SCP runs these calls in worker threads,
``anyio.to_thread.run_sync``). Writes go through one connection opened with
``check_same_thread=False`` and serialised by a lock, each in its own
``BEGIN IMMEDIATE`` transaction. Every `query` / `files` iterator opens its own
read connection (also ``check_same_thread=False``, since successive ``next()``
calls may run on different worker threads; a generator is never run by two
threads at once), closed when the iterator is exhausted or closed: a query reads
one consistent snapshot (WAL mode) and never blocks writers or other queries.
Several processes may use one database: writers wait for each other (busy
timeout), readers never wait. ``synchronous = NORMAL``: a commit is atomic and
survives a crash of the process, but a power loss may lose the last few additions
(the files are the truth; `rebuild` restores the index from them).

Schema (version `SCHEMA_VERSION`, in ``PRAGMA user_version`` or PostgreSQL's
``dicomnet_schema``): an index of an older version is migrated in place by the steps
of `index_schema.MIGRATIONS`, or, older than any step, dropped and recreated empty,
with `Index.created` set so the caller rebuilds it from the files. A newer version is
recreated in SQLite (one archive's own file) and refused in PostgreSQL (`SchemaTooNew`:
nodes of a newer dicomnet use it)::

    patient (pk, patient_id NOT NULL (UNIQUE where not ''), patient_name,
             issuer_of_patient_id, patient_birth_date, patient_sex)
    study   (pk, patient_pk -> patient, study_instance_uid UNIQUE, study_date,
             study_time, accession_number, study_id, referring_physician_name,
             study_description)
    series  (pk, study_pk -> study, series_instance_uid UNIQUE, modality,
             series_number, series_description, series_date, series_time)
    instance(pk, series_pk -> series, sop_instance_uid UNIQUE, sop_class_uid,
             instance_number, path, transfer_syntax, size)

Each PN, DA, TM, DT, IS and DS column ``x`` has a companion ``x_key`` holding its
match key (`matching.match_key`: lower-case PN, canonical sortable date/time,
numeric IS), which is what conditions and indexes use. ModalitiesInStudy,
SOPClassesInStudy, AvailableTransferSyntaxUID and the Number of ... Related ...
counts are derived in SQL at query time. When an instance arrives whose study,
series or patient attributes differ from those indexed, the newest values win
(attributes it lacks keep their indexed value), and entities left without
instances are deleted.

Patients are identified by Patient ID alone (the unique key of the Patient Root
model). An instance without Patient ID (absent, empty or spaces) says nothing of
its patient, so it is never merged with another patient on that missing ID: it
goes to the patient of its study if the study is indexed (an identified patient
is then left as it is), else to a new patient of its own. So each study without
a Patient ID has a patient of its own, with an empty Patient ID and that study's
patient attributes; an instance of the study that has a Patient ID moves the
study to that patient (the patient left without studies goes). This is what
dcm4chee-arc does (an object without Patient ID whose study is not known gets a
new patient); DCMTK's dcmqrscp, which keeps one record per instance, matches a
study-level query on each instance's own patient attributes but shows every
instance without ID as one patient at the PATIENT level. Here such patients are
PATIENT-level matches of their own (empty Patient ID, their own name); their
studies are found by a study-level query on the other patient keys (Study Root,
or Patient Root with relational queries), or, in Patient Root, with Patient ID
``""`` (Empty Value Matching: the patients without ID).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnet.database import is_database_url, redacted
from dicomnet.pacs.index_db import (
    Database,
    Executor,
    PostgreSQLDatabase,
    SQLiteDatabase,
)
from dicomnet.pacs.index_files import (
    walk_files,
)
from dicomnet.pacs.index_plan import (
    STATUS_IDENTIFIER_DOES_NOT_MATCH,
    STATUS_UNABLE_TO_PROCESS,
    FindPlan,
    QueryError,
    plan_find,
    plan_retrieve,
)
from dicomnet.pacs.index_records import Record, RecordReader
from dicomnet.pacs.index_responses import find_response
from dicomnet.pacs.index_schema import (
    LEVELS,
    PARENT_TABLES,
    SPECIFIC_CHARACTER_SET,
    TABLES,
    Level,
    Model,
    statements,
)
from dicomnet.pacs.matching import (
    SqlDialect,
    normalize,
)

__all__ = [
    "INDEX_FILE_NAME",
    "LEVELS",
    "SCHEMA_VERSION",
    "STATUS_IDENTIFIER_DOES_NOT_MATCH",
    "STATUS_UNABLE_TO_PROCESS",
    "Index",
    "IndexCounts",
    "Level",
    "Model",
    "QueryError",
]

log = logging.getLogger("dicomnet.index")

#: The index's file name inside the storage folder (hidden: `rebuild` skips it).
INDEX_FILE_NAME = ".dicomnet-index.sqlite"
SCHEMA_VERSION = 2


class IndexCounts(NamedTuple):
    patients: int
    studies: int
    series: int
    instances: int


RECONCILE_BATCH = 1024  # files indexed per transaction by `Index.reconcile`
#: Times a batch is tried when the database ended it in a deadlock with another node's.
_ATTEMPTS = 3

#: Series, studies and patients (their pks) that may have been left empty.
Parents = tuple[set[int], set[int], set[int]]


def _lock_order(item: tuple[str, Record]) -> tuple[str, str, str]:
    """The order a batch is stored in: by patient, study and series."""
    rows = item[1].rows
    return (str(rows["patient"][0] or ""), str(rows["study"][0]), str(rows["series"][0]))


# -- the index ---------------------------------------------------------------------------------


class Index:
    """The index of a storage folder (see the module docstring), in SQLite or PostgreSQL.

    `path` is the SQLite database file (conventionally
    ``<storage>/.dicomnet-index.sqlite``, `INDEX_FILE_NAME`), or a ``postgresql://`` URL
    (`dicomnet.pacs.index_db`); `root`, the folder instance paths are stored relative
    to, defaults to the database file's folder (a URL needs it). `timeout` is how long
    a writer waits for another process's write transaction (seconds; with PostgreSQL,
    for the connection). `created` is True when this opening created the schema (a new
    database, or one of another schema version that was dropped): the caller should
    `rebuild` it from the files."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        root: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        location = os.fspath(path)
        self._db: Database
        if is_database_url(location):
            if root is None:
                raise ValueError("an index in PostgreSQL needs the storage folder (root)")
            #: The SQLite file (None for PostgreSQL).
            self.path: Path | None = None
            self._db = PostgreSQLDatabase(location, SCHEMA_VERSION, timeout)
        else:
            self.path = Path(location)
            self._db = SQLiteDatabase(self.path, SCHEMA_VERSION, timeout)
        self.root = Path(root) if root is not None else Path(location).parent
        self.timeout = timeout
        self.created = self._db.created
        self._statements = statements(self._db.dialect)
        root_abs = os.path.abspath(self.root)
        self._root_prefix = root_abs if root_abs.endswith(os.sep) else root_abs + os.sep
        self._records = RecordReader(self._relative)

    @property
    def location(self) -> str:
        """The SQLite file's path or the PostgreSQL database's URL."""
        return self._db.location

    @property
    def dialect(self) -> SqlDialect:
        """The SQL dialect of the database (`dicomnet.pacs.matching.SQLITE` or `POSTGRESQL`)."""
        return self._db.dialect

    # -- lifetime --

    def close(self) -> None:
        """Close the write connection (running query iterators keep their own)."""
        self._db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Index({redacted(self.location)!r})"

    def _write(self, *, adding: bool = False) -> AbstractContextManager[Executor]:
        return self._db.write(adding=adding)

    def _check_open(self) -> None:
        if self._db.closed:
            raise RuntimeError("the index is closed")

    # -- counts --

    def __len__(self) -> int:
        """The number of indexed instances."""
        return self.counts().instances

    def counts(self) -> IndexCounts:
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT (SELECT COUNT(*) FROM patient), (SELECT COUNT(*) FROM study),"
                " (SELECT COUNT(*) FROM series), (SELECT COUNT(*) FROM instance)"
            ).fetchone()
        return IndexCounts(*row)

    # -- writing --

    def _relative(self, path: str) -> str:
        """`path` relative to `root`, with forward slashes; absolute if it is elsewhere."""
        absolute = os.path.abspath(path)
        prefix = self._root_prefix
        if os.path.normcase(absolute[: len(prefix)]) != os.path.normcase(prefix):
            return absolute
        relative = absolute[len(prefix) :]
        return relative if os.sep == "/" else relative.replace(os.sep, "/")

    def _absolute(self, stored: str) -> Path:
        return self.root / stored

    def add(self, path: str | os.PathLike[str], dataset: Dataset | None = None) -> None:
        """Index the Part-10 file `path` (read up to the pixel data, and only the indexed
        attributes, unless its `dataset` is given). Re-adding an instance (same SOP
        Instance UID) replaces it. Raises `ValueError` for an instance without SOP
        Instance, Study Instance or Series Instance UID, and pydicom's / the OS's
        errors for a file that cannot be read."""
        self._add_records([(os.fspath(path), self._record(os.fspath(path), dataset))])

    def add_many(
        self,
        items: Iterable[str | os.PathLike[str] | tuple[str | os.PathLike[str], Dataset | None]],
    ) -> int:
        """`add` each of `items` (paths, or (path, dataset) pairs) in one transaction;
        files that cannot be indexed are logged and skipped. Returns how many were."""
        return self._add_records(list(self._readable(items)))  # read before the lock

    def _add_records(self, records: list[tuple[str, Record]]) -> int:
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
                with self._write(adding=True) as conn:
                    count, old = self._store_all(conn, ordered)
                break
            except self._db.refused_value:  # a value the database cannot hold: one by one
                with self._write(adding=True) as conn:
                    count, old = self._store_all(conn, ordered, guarded=True)
                break
            except self._db.contended:
                if attempt == _ATTEMPTS - 1:
                    raise
                log.info("index: a deadlock with another node's transaction: again")
        if any(old):
            try:
                with self._write() as conn:
                    self._prune(conn, *old)
            except self._db.errors as exc:  # indexed all the same: pruned by a reconcile
                log.warning("index: parents left empty stay until a reconcile: %s", exc)
        return count + replaced

    def _readable(
        self,
        items: Iterable[str | os.PathLike[str] | tuple[str | os.PathLike[str], Dataset | None]],
    ) -> Iterator[tuple[str, Record]]:
        """(path, record) of each item that can be read; the others are logged."""
        for item in items:
            path, dataset = item if isinstance(item, tuple) else (item, None)
            try:
                yield os.fspath(path), self._record(os.fspath(path), dataset)
            except Exception as exc:  # a damaged file must not stop a rebuild
                log.warning("not indexed: %s: %s", path, exc)

    def _store_all(
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

    def remove(self, sop_instance_uid: str) -> bool:
        """Forget an instance (its file is not touched); series, studies and patients
        left empty go too. Returns whether it was indexed."""
        with self._write() as conn:
            row = conn.execute(
                self._statements.instance_parents, (normalize("UI", sop_instance_uid),)
            ).fetchone()
            if row is None:
                return False
            conn.execute(self._statements.delete_instance, (row[0],))
            self._prune(conn, {row[1]}, {row[2]}, {row[3]})
            return True

    def rebuild(self, storage_folder: str | os.PathLike[str] | None = None) -> int:
        """Empty the index and add every ``*.dcm`` file under `storage_folder` (default:
        `root`), skipping hidden folders such as ``.tmp``, in one transaction (queries
        meanwhile see the old index). Returns the number of instances indexed."""
        folder = Path(storage_folder) if storage_folder is not None else self.root
        with self._write() as conn:
            for table in reversed(TABLES):
                conn.execute(f"DELETE FROM {table.name}")
            count, old = self._store_all(conn, self._readable(walk_files(folder)), guarded=True)
            self._prune(conn, *old)
            return count

    def reconcile(self, storage_folder: str | os.PathLike[str] | None = None) -> int:
        """Index the ``*.dcm`` files under `storage_folder` (default: `root`) that the
        index lacks, or holds with another size (replaced since), in transactions of
        `RECONCILE_BATCH`: what a crash left stored but not indexed; and remove the
        series, studies and patients left without instances (a crash between an
        addition and its prune). Returns how many were indexed."""
        folder = Path(storage_folder) if storage_folder is not None else self.root
        with self._db.read() as conn:
            known = dict(conn.execute("SELECT path, size FROM instance").fetchall())
        missing: list[str] = []
        for path in walk_files(folder):
            size = known.get(self._relative(str(path)))
            try:
                if size is not None and size == path.stat().st_size:
                    continue
            except OSError:  # removed meanwhile
                continue
            missing.append(str(path))
        count = 0
        for start in range(0, len(missing), RECONCILE_BATCH):
            count += self.add_many(missing[start : start + RECONCILE_BATCH])
        with self._write() as conn:  # left empty by a node stopped before its prune
            for sql in self._statements.prune_all:
                conn.execute(sql)
        return count

    def _record(self, path: str, dataset: Dataset | None) -> Record:
        return self._records.read(path, dataset)

    def _store(
        self,
        conn: Executor,
        records: list[Record],
        cache: dict[str, tuple[object, int]],
        old: Parents,
    ) -> None:
        """Upsert instances and their parents; add to `old` the parents they may have
        left empty (pruned after, by the caller: `_prune`).

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

    def _prune(
        self, conn: Executor, series: set[int], studies: set[int], patients: set[int]
    ) -> int:
        """Delete the given entities that no longer have children, bottom up; returns
        how many rows went."""
        deleted = 0
        for sql, pks in zip(self._statements.prune, (series, studies, patients), strict=True):
            for pk in pks:
                deleted += conn.execute(sql, (pk, pk)).rowcount
        return deleted

    # -- C-FIND --

    def query(
        self,
        model: Model,
        level: Level | None,
        identifier: Dataset,
        *,
        relational: bool = False,
        combined_datetime: bool = False,
    ) -> Iterator[Dataset]:
        """Answer a C-FIND: one response identifier per matching entity, streamed.

        `model` is the information model of the negotiated SOP class; `level` the
        Query/Retrieve Level, or None to take it from the identifier (which must then
        hold it; if both are given they must agree). `relational`: relational queries
        were negotiated (PS3.4 §C.4.1.3.2; no unique keys needed above the level);
        `combined_datetime`: combined date-time matching was (§C.2.2.2.5.4, a Date and
        a Time key matched as one date-time range). Each response holds exactly the
        attributes of the identifier (Query/Retrieve Level set, Instance Availability
        ``ONLINE``, Query/Retrieve View, Retrieve AE Title and Timezone Offset From UTC
        returned as sent), plus Specific Character Set when needed: the identifier's
        when every value fits it, else ``ISO_IR 192``.

        The identifier is checked now (`QueryError`); the rows are read as the returned
        iterator is advanced, on a connection of its own that closing the iterator
        closes."""
        plan = plan_find(model, level, identifier, relational, combined_datetime, self._db.dialect)
        self._check_open()
        return self._run_find(plan)

    def _run_find(self, plan: FindPlan) -> Iterator[Dataset]:
        with self._db.read() as conn:
            for row in conn.execute(plan.sql, plan.params):
                source = self._read_file(row[0], plan.file_tags) if plan.file_tags else None
                response = find_response(plan, row, source)
                if response is not None:
                    yield response

    def _read_file(self, stored: str | None, tags: list[int]) -> Dataset | None:
        if stored is None:
            return None
        path = self._absolute(stored)
        try:
            return dcmread(
                path, stop_before_pixels=True, specific_tags=[SPECIFIC_CHARACTER_SET, *tags]
            )
        except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
            log.warning("cannot read %s for a query: %s", path, exc)
            return None

    # -- C-MOVE / C-GET --

    def files(
        self, model: Model, level: Level | None, identifier: Dataset, *, relational: bool = False
    ) -> Iterator[tuple[Path, str, str, str]]:
        """The instances a C-MOVE or C-GET of `identifier` retrieves, as (file path,
        SOP Class UID, SOP Instance UID, transfer syntax UID), streamed. The path is
        `root` joined with the stored relative path (absolute for files added from
        outside `root`). `model` and `level` as for `query`; `relational`: relational
        retrieve was negotiated (PS3.4 §C.4.2.3.2.1, §C.4.3.3.2.1: no unique keys
        needed above the level). The identifier is checked now (`QueryError`)."""
        sql, params = plan_retrieve(
            model,
            level,
            identifier,
            "i.path, i.sop_class_uid, i.sop_instance_uid, i.transfer_syntax",
            relational,
            self._db.dialect,
        )
        self._check_open()
        return self._run_files(sql, params)

    def count_files(
        self, model: Model, level: Level | None, identifier: Dataset, *, relational: bool = False
    ) -> int:
        """How many instances `files` would yield (for the C-MOVE / C-GET counts)."""
        sql, params = plan_retrieve(
            model, level, identifier, "COUNT(*)", relational, self._db.dialect
        )
        with self._db.read() as conn:
            return int(conn.execute(sql, params).fetchone()[0])

    def _run_files(self, sql: str, params: list[str]) -> Iterator[tuple[Path, str, str, str]]:
        with self._db.read() as conn:
            for path, sop_class, sop_instance, transfer_syntax in conn.execute(sql, params):
                yield self._absolute(path), sop_class or "", sop_instance, transfer_syntax or ""
