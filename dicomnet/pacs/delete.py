"""Removing patients, studies and series from a storage folder of `dicomnet serve`: the
files and their index rows, together.

`delete(index, selection)` runs in one write transaction of the index (``BEGIN
IMMEDIATE``: the indexer of a running `serve` waits meanwhile, its queries go on reading
the snapshot before): the matching instance rows go, the series, studies and patients
left without instances go with them, and each file is first moved aside into a folder of
its own under ``.tmp`` (same file system: a rename). If a file cannot be moved, the moved
ones are put back and the transaction is rolled back: nothing is removed. Once the
transaction is committed the moved files are deleted. A C-FIND or C-MOVE that starts
after that no longer finds them, and the same instances can be stored again (`serve`
decides what is a duplicate by the file, which is gone).

An instance stored while a delete runs, not indexed yet when its rows are selected (its
C-STORE answered within the last few milliseconds), stays.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from dicomnet.pacs.index import Index
from dicomnet.pacs.index_db import Executor
from dicomnet.pacs.index_schema import statements
from dicomnet.pacs.matching import SqlDialect, normalize

__all__ = ["Deleted", "Selection", "delete"]

# Where the files being deleted wait for the commit (hidden: `rebuild` and `reconcile`
# skip it); a folder of its own per delete.
TRASH_FOLDER = ".tmp"
TRASH_PREFIX = "deleting-"


@dataclass(frozen=True, slots=True)
class Selection:
    """What to delete: every instance of the patient, study and series given (those given
    must all hold: a study UID with a patient ID selects that study only if it is that
    patient's)."""

    patient_id: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None

    def __post_init__(self) -> None:
        if not any(
            (self.patient_id, self.study_instance_uid, self.series_instance_uid)
        ):  # an empty selection would be everything
            raise ValueError("a patient ID, study or series instance UID is needed")

    def describe(self) -> str:
        parts = []
        if self.patient_id:
            parts.append(f"PatientID {self.patient_id}")
        if self.study_instance_uid:
            parts.append(f"StudyInstanceUID {self.study_instance_uid}")
        if self.series_instance_uid:
            parts.append(f"SeriesInstanceUID {self.series_instance_uid}")
        return ", ".join(parts)

    def where(self) -> tuple[str, list[str]]:
        conditions: list[str] = []
        params: list[str] = []
        if self.patient_id:
            conditions.append("p.patient_id = ?")
            params.append(normalize("LO", self.patient_id))
        if self.study_instance_uid:
            conditions.append("st.study_instance_uid = ?")
            params.append(normalize("UI", self.study_instance_uid))
        if self.series_instance_uid:
            conditions.append("se.series_instance_uid = ?")
            params.append(normalize("UI", self.series_instance_uid))
        return " AND ".join(conditions), params


@dataclass(frozen=True, slots=True)
class SeriesInfo:
    """One series that goes (wholly or in part): its UIDs, patient and instance count."""

    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    instances: int


@dataclass(slots=True)
class Deleted:
    """What a delete removed (or, `dry_run`, would remove)."""

    dry_run: bool = False
    patients: int = 0
    studies: int = 0
    series: int = 0
    instances: int = 0
    bytes: int = 0
    files: list[Path] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)  # indexed, but no file any more
    by_series: list[SeriesInfo] = field(default_factory=list)


class _DryRun(Exception):
    """Rolls the transaction of a dry run back."""


class _Row(NamedTuple):
    pk: int
    path: str
    size: int | None
    series_pk: int
    study_pk: int
    patient_pk: int
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str


_SELECT = (
    "SELECT i.pk, i.path, i.size, se.pk, st.pk, p.pk, p.patient_id,"
    " st.study_instance_uid, se.series_instance_uid FROM instance AS i"
    " JOIN series AS se ON se.pk = i.series_pk JOIN study AS st ON st.pk = se.study_pk"
    " JOIN patient AS p ON p.pk = st.patient_pk WHERE "
)


def delete(index: Index, selection: Selection, *, dry_run: bool = False) -> Deleted:
    """Remove the selected instances' files and index rows in one transaction (see the
    module docstring); with `dry_run`, only say what would go. Raises `OSError` (nothing
    removed) when a file cannot be moved aside."""
    result = Deleted(dry_run=dry_run)
    trash: Path | None = None
    moved: list[tuple[Path, Path]] = []
    committed = False
    try:
        with index._write() as written:
            conn = _InDialect(written, index.dialect)
            rows = _select(conn, selection)
            if not rows:
                return result
            _count(conn, rows, result)
            if dry_run:
                result.files = [index._absolute(row.path) for row in rows]
                raise _DryRun
            trash = Path(tempfile.mkdtemp(prefix=TRASH_PREFIX, dir=_trash_parent(index.root)))
            for number, row in enumerate(rows):
                path = index._absolute(row.path)
                aside = trash / f"{number}-{path.name}"
                try:
                    os.rename(path, aside)
                except FileNotFoundError:
                    result.missing.append(path)
                    continue
                moved.append((path, aside))
            done = statements(index.dialect)
            for row in rows:
                written.execute(done.delete_instance, (row.pk,))
            for prune, column in zip(done.prune, _PARENTS, strict=True):
                for pk in sorted({int(getattr(row, column)) for row in rows}):
                    written.execute(prune, (pk, pk))
        committed = True
    except _DryRun:
        return result
    except BaseException:
        _put_back(moved)  # rolled back: the files return
        raise
    finally:
        if trash is not None:
            if committed:
                shutil.rmtree(trash, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    trash.rmdir()  # empty once every file is back
    result.files = [path for path, _ in moved]
    return result


class _InDialect:
    """The SQL here, written with ``?`` placeholders, run in the index's dialect."""

    def __init__(self, conn: Executor, dialect: SqlDialect) -> None:
        self._conn = conn
        self._dialect = dialect

    def execute(self, sql: str, params: Any = ()) -> Any:
        return self._conn.execute(self._dialect.sql(sql), params)


# The columns of `_Row` naming a deleted instance's parents, bottom up, as the index's
# prune statements take them: each parent goes once it has no child.
_PARENTS = ("series_pk", "study_pk", "patient_pk")


def _trash_parent(root: Path) -> Path:
    parent = root / TRASH_FOLDER
    parent.mkdir(exist_ok=True)
    return parent


def _put_back(moved: list[tuple[Path, Path]]) -> None:
    for path, aside in reversed(moved):
        try:
            os.rename(aside, path)
        except OSError as exc:  # pragma: no cover - the folder went meanwhile
            if exc.errno != errno.ENOENT:
                raise


def _select(conn: Executor, selection: Selection) -> list[_Row]:
    where, params = selection.where()
    return [_Row(*row) for row in conn.execute(_SELECT + where + " ORDER BY i.pk", params)]


# How many instances a series, study or patient holds (by pk).
_HOLDS = {
    "series_pk": "SELECT COUNT(*) FROM instance WHERE series_pk = ?",
    "study_pk": "SELECT COUNT(*) FROM instance AS i JOIN series AS se ON se.pk = i.series_pk"
    " WHERE se.study_pk = ?",
    "patient_pk": "SELECT COUNT(*) FROM instance AS i JOIN series AS se ON se.pk = i.series_pk"
    " JOIN study AS st ON st.pk = se.study_pk WHERE st.patient_pk = ?",
}


def _count(conn: Executor, rows: list[_Row], result: Deleted) -> None:
    """The counts of what goes: instances, and the series, studies and patients all of
    whose instances go."""
    result.instances = len(rows)
    result.bytes = sum(row.size or 0 for row in rows)
    per_series: dict[int, list[_Row]] = {}
    for row in rows:
        per_series.setdefault(row.series_pk, []).append(row)
    for members in per_series.values():
        first = members[0]
        result.by_series.append(
            SeriesInfo(
                first.patient_id, first.study_instance_uid, first.series_instance_uid, len(members)
            )
        )
    gone: dict[str, int] = {}
    for column, sql in _HOLDS.items():
        going: dict[int, int] = {}
        for row in rows:
            pk = int(getattr(row, column))
            going[pk] = going.get(pk, 0) + 1
        gone[column] = sum(
            1 for pk, n in going.items() if conn.execute(sql, (pk,)).fetchone()[0] == n
        )
    result.series = gone["series_pk"]
    result.studies = gone["study_pk"]
    result.patients = gone["patient_pk"]
