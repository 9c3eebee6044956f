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
responses from rows), `dicomnet.pacs.index_db` (SQLite or PostgreSQL),
`dicomnet.pacs.index_writer` (batches of records into the tables), and `Index` here
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
from typing import NamedTuple

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
    SPECIFIC_CHARACTER_SET,
    TABLES,
    Level,
    Model,
    statements,
)
from dicomnet.pacs.index_writer import IndexWriter
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
        self._writer = IndexWriter(self._db, self._statements)

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
        self._writer.add_records([(os.fspath(path), self._record(os.fspath(path), dataset))])

    def add_many(
        self,
        items: Iterable[str | os.PathLike[str] | tuple[str | os.PathLike[str], Dataset | None]],
    ) -> int:
        """`add` each of `items` (paths, or (path, dataset) pairs) in one transaction;
        files that cannot be indexed are logged and skipped. Returns how many were."""
        return self._writer.add_records(list(self._readable(items)))  # read before the lock

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
            self._writer.prune(conn, {row[1]}, {row[2]}, {row[3]})
            return True

    def rebuild(self, storage_folder: str | os.PathLike[str] | None = None) -> int:
        """Empty the index and add every ``*.dcm`` file under `storage_folder` (default:
        `root`), skipping hidden folders such as ``.tmp``, in one transaction (queries
        meanwhile see the old index). Returns the number of instances indexed."""
        folder = Path(storage_folder) if storage_folder is not None else self.root
        with self._write() as conn:
            for table in reversed(TABLES):
                conn.execute(f"DELETE FROM {table.name}")
            records = self._readable(walk_files(folder))
            count, old = self._writer.store_all(conn, records, guarded=True)
            self._writer.prune(conn, *old)
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
            self._writer.prune_all(conn)
        return count

    def _record(self, path: str, dataset: Dataset | None) -> Record:
        return self._records.read(path, dataset)

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
