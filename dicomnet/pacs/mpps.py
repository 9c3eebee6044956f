"""MPPS instances of `dicomnet serve`, kept in the index database (PS3.4 Annex F).

Each instance is one row of table `mpps` in the index's database, its SQLite file or
its PostgreSQL database (a table of its own: rebuilding the index from the stored files
leaves it alone), with its data set as DICOM JSON (PS3.18 §F.2) and the attributes one
looks for as columns. Several `--workers` processes, or nodes, share it; an N-SET is a
compare-and-set on the status, so two at once cannot both pass the IN PROGRESS check.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicomnet.database import SharedConnection, is_database_url
from dicomnet.pacs.index_db import SCHEMA_LOCK
from dicomnet.pacs.matching import POSTGRESQL, SQLITE

__all__ = ["MPPSRecords"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mpps (
    sop_instance_uid TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    patient_id TEXT,
    study_instance_uid TEXT,
    modality TEXT,
    station_ae_title TEXT,
    start_date TEXT,
    updated {real} NOT NULL,
    dataset TEXT NOT NULL
)
"""


def _columns(dataset: Dataset) -> tuple[str, str, str, str, str, str]:
    steps = dataset.get("ScheduledStepAttributesSequence", None) or [Dataset()]
    return (
        str(dataset.get("PerformedProcedureStepStatus", "")).strip(),
        str(dataset.get("PatientID", "") or ""),
        str(steps[0].get("StudyInstanceUID", "") or ""),
        str(dataset.get("Modality", "") or ""),
        str(dataset.get("PerformedStationAETitle", "") or "").strip(),
        str(dataset.get("PerformedProcedureStepStartDate", "") or ""),
    )


class MPPSRecords:
    """The `mpps` table of an index database (an SQLite file, or a ``postgresql://``
    URL): an `MPPSStore`, and queries on it."""

    def __init__(self, database: Path | str, *, timeout: float = 30.0) -> None:
        self._lock = threading.Lock()
        self._conn: Any
        location = str(database)
        self._shared: SharedConnection | None = None
        if is_database_url(location):
            import psycopg

            self._shared = SharedConnection(location)
            self._duplicate: type[Exception] = psycopg.errors.UniqueViolation
            self._dialect = POSTGRESQL
            # Under the schema lock: nodes starting at once create it once.
            with self._shared.use() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                conn.execute(_SCHEMA.format(real="DOUBLE PRECISION"))
        else:
            self._conn = sqlite3.connect(
                database, timeout=timeout, check_same_thread=False, isolation_level=None
            )
            self._duplicate = sqlite3.IntegrityError
            self._dialect = SQLITE
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute(_SCHEMA.format(real="REAL"))

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
            return
        with self._lock:
            self._conn.close()

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        if self._shared is not None:
            with self._shared.use() as conn:
                yield conn
            return
        with self._lock:
            yield self._conn

    def create(self, sop_instance_uid: str, dataset: Dataset) -> bool:
        row = (sop_instance_uid, *_columns(dataset), time.time(), dataset.to_json())
        with self._cursor() as conn:
            try:
                conn.execute(
                    self._dialect.sql("INSERT INTO mpps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"), row
                )
            except self._duplicate:
                return False
        return True

    def get(self, sop_instance_uid: str) -> Dataset | None:
        with self._cursor() as conn:
            row = conn.execute(
                self._dialect.sql("SELECT dataset FROM mpps WHERE sop_instance_uid = ?"),
                (sop_instance_uid,),
            ).fetchone()
        return None if row is None else Dataset.from_json(row[0])

    def replace(self, sop_instance_uid: str, dataset: Dataset, status_was: str) -> bool:
        status, patient, study, modality, station, start = _columns(dataset)
        with self._cursor() as conn:
            changed: int = conn.execute(
                self._dialect.sql(
                    "UPDATE mpps SET status = ?, patient_id = ?, study_instance_uid = ?,"
                    " modality = ?, station_ae_title = ?, start_date = ?, updated = ?,"
                    " dataset = ? WHERE sop_instance_uid = ? AND status = ?"
                ),
                (
                    status,
                    patient,
                    study,
                    modality,
                    station,
                    start,
                    time.time(),
                    dataset.to_json(),
                    sop_instance_uid,
                    status_was,
                ),
            ).rowcount
        return bool(changed == 1)

    def find(
        self,
        *,
        status: str | None = None,
        patient_id: str | None = None,
        study_instance_uid: str | None = None,
    ) -> list[Dataset]:
        """The instances with these values (None: any), oldest change first."""
        conditions, values = [], []
        for column, value in (
            ("status", status),
            ("patient_id", patient_id),
            ("study_instance_uid", study_instance_uid),
        ):
            if value is not None:
                conditions.append(f"{column} = {self._dialect.placeholder}")
                values.append(value)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._cursor() as conn:
            rows = conn.execute(f"SELECT dataset FROM mpps{where} ORDER BY updated", values)
            return [Dataset.from_json(row[0]) for row in rows.fetchall()]
