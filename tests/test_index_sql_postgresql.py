"""The index's SQL in PostgreSQL's dialect gives the rows SQLite's gives: the schema, the
upserts, every kind of C-FIND key and the C-MOVE / C-GET retrieve queries, run on both
databases holding the same instances."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from test_index_matching import ident

from dicomnet.pacs.index import Index, Level, Model
from dicomnet.pacs.index_plan import plan_find, plan_retrieve
from dicomnet.pacs.index_schema import TABLES, schema_statements, statements
from dicomnet.pacs.matching import POSTGRESQL, SQLITE

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"

# (patient id, name, birth date, study, date, time, accession, modality, series, number)
INSTANCES = [
    ("P1", "Doe^John", "19700101", "1.2.1", "20240105", "101500", "A100", "CT", "1.2.1.1", "1"),
    ("P1", "Doe^John", "19700101", "1.2.1", "20240105", "101500", "A100", "MR", "1.2.1.2", "2"),
    ("P1", "Doe^John", "19700101", "1.2.2", "20240310", "235959", "A_1%", "CT", "1.2.2.1", "1"),
    ("P2", "DOE^JANE", "19851224", "1.2.3", "20231231", "000000", "B200", "US", "1.2.3.1", "10"),
    ("P3", "Smith^Ann^^Dr", None, "1.2.4", None, None, None, "CT", "1.2.4.1", "3"),
    ("", "Nobody^Known", "20000229", "1.2.5", "20240229", "120000", "C300", "CR", "1.2.5.1", "7"),
    ("P4", "Müller^Jörg", "19600615", "1.2.6", "20240601", "080000.5", "[X]", "MR", "1.2.6.1", "1"),
]


def _write(folder: Path, number: int, row: tuple[Any, ...]) -> Path:
    patient_id, name, birth, study, day, time, accession, modality, series, snum = row
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    values: dict[str, object] = {
        "PatientID": patient_id,
        "PatientName": name,
        "PatientBirthDate": birth,
        "StudyInstanceUID": study,
        "StudyDate": day,
        "StudyTime": time,
        "AccessionNumber": accession,
        "Modality": modality,
        "SeriesInstanceUID": series,
        "SeriesNumber": snum,
        "SeriesDate": day,
        "SOPClassUID": MR if modality == "MR" else CT,
        "SOPInstanceUID": f"{series}.{number}",
        "InstanceNumber": str(number),
    }
    for keyword, value in values.items():
        if value is not None:
            setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"{number}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


class Both:
    """The same index in SQLite and in a PostgreSQL schema of its own."""

    def __init__(self, lite: sqlite3.Connection, pg: Any) -> None:
        self.lite, self.pg = lite, pg

    def rows(
        self, lite_sql: str, lite_params: list[str], pg_sql: str, pg_params: list[str]
    ) -> tuple[list[Any], list[Any]]:
        a = [tuple(r) for r in self.lite.execute(lite_sql, lite_params).fetchall()]
        b = [tuple(r) for r in self.pg.execute(pg_sql, pg_params).fetchall()]
        return sorted(a, key=repr), sorted(b, key=repr)


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory, postgresql_server: Any) -> Iterator[Both]:
    import psycopg

    folder = tmp_path_factory.mktemp("both")
    with Index(folder / "index.sqlite", root=folder) as index:
        for number, row in enumerate(INSTANCES, 1):
            index.add(_write(folder, number, row))
    lite = sqlite3.connect(folder / "index.sqlite")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgresql_server.dsn, autocommit=True) as pg:
        pg.execute(f"CREATE SCHEMA {schema}")
        pg.execute(f"SET search_path TO {schema}")
        for statement in schema_statements(POSTGRESQL):
            pg.execute(statement)
        for table in TABLES:  # parents first
            cursor = lite.execute(f"SELECT * FROM {table.name}")
            columns = [d[0] for d in cursor.description]
            marks = ", ".join(["%s"] * len(columns))
            for row in cursor:
                pg.execute(f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({marks})", row)
            # Rows copied with their keys: new ones are numbered after them.
            pg.execute(
                f"SELECT setval(pg_get_serial_sequence('{table.name}', 'pk'),"
                f" (SELECT max(pk) FROM {table.name}))"
            )
        yield Both(lite, pg)
        pg.execute(f"DROP SCHEMA {schema} CASCADE")
    lite.close()


FINDS: list[tuple[Model, Level, dict[str, object], dict[str, bool]]] = [
    ("patient", "PATIENT", {"PatientID": "", "PatientName": ""}, {}),
    ("patient", "PATIENT", {"PatientName": "doe*"}, {}),
    ("patient", "PATIENT", {"PatientName": "D?E^J*", "PatientBirthDate": "-19800101"}, {}),
    ("patient", "PATIENT", {"PatientID": '""', "PatientName": ""}, {}),
    ("patient", "PATIENT", {"PatientID": "P1\\P2", "NumberOfPatientRelatedStudies": ""}, {}),
    ("patient", "PATIENT", {"PatientName": "*ü*", "NumberOfPatientRelatedInstances": ""}, {}),
    ("study", "STUDY", {"StudyInstanceUID": "", "ModalitiesInStudy": ""}, {}),
    ("study", "STUDY", {"ModalitiesInStudy": "MR", "SOPClassesInStudy": ""}, {}),
    ("study", "STUDY", {"ModalitiesInStudy": "CT\\US", "StudyDate": ""}, {}),
    ("study", "STUDY", {"StudyDate": "20240101-20240331", "StudyTime": ""}, {}),
    ("study", "STUDY", {"StudyDate": "20240105", "StudyTime": "1000-1100"}, {}),
    (
        "study",
        "STUDY",
        {"StudyDate": "20240101-", "StudyTime": "1200-"},
        {"combined_datetime": True},
    ),
    ("study", "STUDY", {"AccessionNumber": "A_1%"}, {}),
    ("study", "STUDY", {"AccessionNumber": "A?1*"}, {}),
    ("study", "STUDY", {"AccessionNumber": "[X]*"}, {}),
    ("study", "STUDY", {"AccessionNumber": '""', "StudyDate": '""'}, {}),
    (
        "study",
        "STUDY",
        {"StudyInstanceUID": "1.2.1\\1.2.4\\9.9", "NumberOfStudyRelatedSeries": ""},
        {},
    ),
    ("study", "SERIES", {"StudyInstanceUID": "1.2.1", "Modality": "", "SeriesNumber": "2"}, {}),
    ("study", "SERIES", {"Modality": "C*", "SeriesNumber": ""}, {"relational": True}),
    ("patient", "STUDY", {"PatientID": "P1", "StudyInstanceUID": ""}, {}),
    (
        "patient",
        "IMAGE",
        {
            "PatientID": "P1",
            "StudyInstanceUID": "1.2.1",
            "SeriesInstanceUID": "1.2.1.2",
            "SOPInstanceUID": "",
            "InstanceNumber": "",
        },
        {},
    ),
    ("study", "IMAGE", {"SOPClassUID": CT, "InstanceNumber": "1"}, {"relational": True}),
    ("study", "STUDY", {"PatientName": "*^*^*^dr", "StudyDate": ""}, {}),
]


@pytest.mark.parametrize(("model", "level", "keys", "options"), FINDS)
def test_a_find_gives_the_same_rows(
    both: Both, model: Model, level: Level, keys: dict[str, object], options: dict[str, bool]
) -> None:
    query = ident(level, **keys)
    lite = plan_find(model, level, query, **options)
    pg = plan_find(model, level, query, **options, dialect=POSTGRESQL)
    a, b = both.rows(lite.sql, lite.params, pg.sql, pg.params)
    assert a == b
    assert a, "a case that finds nothing proves little"


RETRIEVES: list[tuple[Model, Level, dict[str, object], bool]] = [
    ("patient", "PATIENT", {"PatientID": "P1"}, False),
    ("study", "STUDY", {"StudyInstanceUID": "1.2.1\\1.2.3"}, False),
    ("study", "SERIES", {"StudyInstanceUID": "1.2.1", "SeriesInstanceUID": "1.2.1.2"}, False),
    ("study", "SERIES", {"SeriesInstanceUID": "1.2.2.1\\1.2.5.1"}, True),
    ("study", "IMAGE", {"SOPInstanceUID": "1.2.6.1.7"}, True),
]


@pytest.mark.parametrize(("model", "level", "keys", "relational"), RETRIEVES)
def test_a_retrieve_gives_the_same_instances(
    both: Both, model: Model, level: Level, keys: dict[str, object], relational: bool
) -> None:
    query = ident(level, **keys)
    select = "i.path, i.sop_class_uid, i.sop_instance_uid, i.transfer_syntax"
    lite = plan_retrieve(model, level, query, select, relational)
    pg = plan_retrieve(model, level, query, select, relational, dialect=POSTGRESQL)
    a, b = both.rows(*lite, *pg)
    assert a == b and a


def test_the_upserts_keep_what_an_instance_lacks_on_both(both: Both) -> None:
    """A second study upsert without a date keeps the date; a patient without Patient ID
    upserted by a NULL pk gets a new row, and by its pk an update."""
    for dialect, conn in ((SQLITE, both.lite), (POSTGRESQL, both.pg)):
        done = statements(dialect)
        patient_sql, patient_columns = done.upserts["patient"]
        study_sql, study_columns = done.upserts["study"]
        patient = dict.fromkeys(patient_columns)
        patient.update(patient_id="UPSERT", patient_name="A^B", patient_name_key="a^b")
        pk = conn.execute(patient_sql, list(patient.values())).fetchone()[0]
        study = dict.fromkeys(study_columns)
        study.update(patient_pk=pk, study_instance_uid="9.9.9", study_date="20200101")
        study.update(study_date_key="20200101")
        conn.execute(study_sql, list(study.values()))
        study.update(study_date=None, study_date_key=None, accession_number="N1")
        conn.execute(study_sql, list(study.values()))
        p = dialect.placeholder
        row = conn.execute(
            f"SELECT study_date, study_date_key, accession_number FROM study"
            f" WHERE study_instance_uid = {p}",
            ["9.9.9"],
        ).fetchone()
        assert tuple(row) == ("20200101", "20200101", "N1")
        anonymous = dict.fromkeys(patient_columns)
        anonymous.update(patient_id="", patient_name="X")
        by_pk = done.upsert_patient_by_pk
        new_pk = conn.execute(by_pk, [None, *anonymous.values()]).fetchone()[0]
        again = conn.execute(by_pk, [new_pk, *{**anonymous, "patient_name": "Y"}.values()])
        assert again.fetchone()[0] == new_pk != pk
        name = conn.execute(f"SELECT patient_name FROM patient WHERE pk = {p}", [new_pk])
        assert name.fetchone()[0] == "Y"
        conn.execute(f"DELETE FROM patient WHERE pk IN ({p}, {p})", [pk, new_pk])
