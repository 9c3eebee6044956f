"""Patients without a Patient ID in the Query/Retrieve index: each study without one
has a patient of its own, never merged with another patient on the missing ID."""

from __future__ import annotations

import sqlite3
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom.data
import pytest
from conftest import index_location
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnet.pacs.index import SCHEMA_VERSION, Index, IndexCounts
from dicomnet.pacs.matching import normalize

CT = "1.2.840.10008.5.1.4.1.1.2"


def ident(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def write(
    path: Path,
    study: str,
    name: str,
    patient_id: str | None = None,
    series: str | None = None,
    uid: str | None = None,
) -> Path:
    """A small CT instance; no Patient ID attribute at all when `patient_id` is None."""
    ds = Dataset()
    ds.PatientName = name
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.StudyInstanceUID = study
    ds.StudyDate = "20200101"
    ds.SeriesInstanceUID = series or generate_uid()
    ds.Modality = "CT"
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = uid or generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def idx(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Index]:
    location = index_location(request, request.param, tmp_path / "index.sqlite")
    with Index(location, root=tmp_path) as index:
        yield index


def patients_all(index: Index) -> list[tuple[str, str]]:
    """(Patient ID, Patient Name) of every PATIENT-level match, Patient Root."""
    q = ident("PATIENT", PatientID="", PatientName="")
    return [
        (str(r.PatientID or ""), str(r.PatientName or "")) for r in index.query("patient", None, q)
    ]


def patients(index: Index) -> set[tuple[str, str]]:
    return set(patients_all(index))


def studies_named(index: Index, name: str) -> set[str]:
    q = ident("STUDY", PatientName=name, StudyInstanceUID="")
    return {r.StudyInstanceUID for r in index.query("study", "STUDY", q)}


def study_patient(index: Index, study: str) -> tuple[str, str]:
    q = ident("STUDY", StudyInstanceUID=study, PatientID="", PatientName="")
    (r,) = index.query("study", "STUDY", q)
    return str(r.PatientID or ""), str(r.PatientName or "")


def test_each_study_without_id_has_a_patient_of_its_own(idx: Index, tmp_path: Path) -> None:
    a, b, c = generate_uid(), generate_uid(), generate_uid()
    idx.add(write(tmp_path / "a.dcm", a, "Alpha^Ann"))
    idx.add(write(tmp_path / "b.dcm", b, "Beta^Bob", patient_id=""))
    idx.add(write(tmp_path / "c.dcm", c, "Gamma^Gus", patient_id="PID-C"))
    assert idx.counts() == IndexCounts(3, 3, 3, 3)
    assert patients(idx) == {("", "Alpha^Ann"), ("", "Beta^Bob"), ("PID-C", "Gamma^Gus")}
    assert studies_named(idx, "alpha^ann") == {a}
    assert studies_named(idx, "Beta^Bob") == {b}
    assert studies_named(idx, "Gamma^Gus") == {c}


def test_same_patient_attributes_without_id_stay_apart(idx: Index, tmp_path: Path) -> None:
    """Two studies whose instances differ only in their Study Instance UID, in one
    batch: the patient row of the first is not reused for the second."""
    a, b = generate_uid(), generate_uid()
    paths = [
        write(tmp_path / "a1.dcm", a, "Same^Name"),
        write(tmp_path / "a2.dcm", a, "Same^Name"),
        write(tmp_path / "b1.dcm", b, "Same^Name"),
    ]
    assert idx.add_many(paths) == 3
    assert idx.counts() == IndexCounts(2, 2, 3, 3)
    q = ident("PATIENT", PatientID="", NumberOfPatientRelatedStudies="")
    assert sorted(int(r.NumberOfPatientRelatedStudies) for r in idx.query("patient", None, q)) == [
        1,
        1,
    ]


def test_an_instance_without_id_joins_its_study(idx: Index, tmp_path: Path) -> None:
    """The study's patient is kept, and an identified one is not renamed."""
    study, series = generate_uid(), generate_uid()
    idx.add(write(tmp_path / "1.dcm", study, "Known^Kim", patient_id="PID-K", series=series))
    idx.add(write(tmp_path / "2.dcm", study, "Other^Name", series=series))
    assert idx.counts() == IndexCounts(1, 1, 1, 2)
    assert study_patient(idx, study) == ("PID-K", "Known^Kim")
    # a study without ID: its patient takes the newest values
    other = generate_uid()
    idx.add(write(tmp_path / "3.dcm", other, "First^Name"))
    idx.add(write(tmp_path / "4.dcm", other, "Second^Name"))
    assert idx.counts() == IndexCounts(2, 2, 3, 4)
    assert study_patient(idx, other) == ("", "Second^Name")


@pytest.mark.parametrize("batch", [False, True])
def test_a_study_moves_to_the_patient_an_instance_names(
    idx: Index, tmp_path: Path, batch: bool
) -> None:
    """An instance of a study without ID that has a Patient ID, or that is re-sent
    with one, moves the study; the patient left empty goes. In one batch or not,
    in either order, the result is the same."""
    study, series, uid = generate_uid(), generate_uid(), generate_uid()
    first = write(tmp_path / "first.dcm", study, "Anon^A", series=series, uid=uid)
    second = write(tmp_path / "second.dcm", study, "Named^N", "PID-N", series=series)
    if batch:
        idx.add_many([first, second])
    else:
        idx.add(first)
        assert study_patient(idx, study) == ("", "Anon^A")
        idx.add(second)
    assert idx.counts() == IndexCounts(1, 1, 1, 2)
    assert study_patient(idx, study) == ("PID-N", "Named^N")
    idx.rebuild()
    assert idx.counts() == IndexCounts(1, 1, 1, 2)
    assert study_patient(idx, study) == ("PID-N", "Named^N")
    # the instance re-sent with a Patient ID of its own, into a study of its own
    moved = write(tmp_path / "first.dcm", generate_uid(), "Anon^A", "PID-A", uid=uid)
    idx.add(moved)
    assert idx.counts() == IndexCounts(2, 2, 2, 2)
    assert patients(idx) == {("PID-N", "Named^N"), ("PID-A", "Anon^A")}


def test_removing_the_last_instance_removes_the_patient(idx: Index, tmp_path: Path) -> None:
    uid = generate_uid()
    idx.add(write(tmp_path / "a.dcm", generate_uid(), "Gone^Soon", uid=uid))
    idx.add(write(tmp_path / "b.dcm", generate_uid(), "Stays^Here"))
    assert idx.remove(uid)
    assert patients(idx) == {("", "Stays^Here")}


def test_a_database_of_the_previous_schema_is_recreated(tmp_path: Path) -> None:
    """Version 1 kept every patient without ID in one row: it is dropped and the
    caller told to rebuild (`created`)."""
    db = tmp_path / "index.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE patient (pk INTEGER PRIMARY KEY, patient_id TEXT NOT NULL UNIQUE)")
    conn.execute("INSERT INTO patient (patient_id) VALUES ('')")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    assert SCHEMA_VERSION > 1
    path = write(tmp_path / "a.dcm", generate_uid(), "A^A")
    with Index(db, root=tmp_path) as index:
        assert index.created and index.counts() == IndexCounts(0, 0, 0, 0)
        assert index.rebuild() == 1
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        (sql,) = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'patient_patient_id'"
        ).fetchone()
        assert "WHERE patient_id != ''" in sql
    finally:
        conn.close()
    assert path.exists()


# -- pydicom's own test files without a Patient ID --


@dataclass(frozen=True)
class Found:
    path: Path
    study: str
    name: str  # normalised Patient Name, "" if none


def pydicom_files_without_patient_id() -> list[Found]:
    """pydicom's test files that have Study, Series and SOP Instance UIDs but no (or
    an empty) Patient ID."""
    found: list[Found] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(pydicom.data.get_testdata_files()):
            try:
                ds = dcmread(name, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError, EOFError, KeyError):
                continue
            if str(ds.get("PatientID", "") or "").strip():
                continue
            if not all(k in ds for k in ("StudyInstanceUID", "SeriesInstanceUID")):
                continue
            if "SOPInstanceUID" not in ds:
                continue
            patient = normalize("PN", str(ds.get("PatientName", "") or ""))
            found.append(Found(Path(name), str(ds.StudyInstanceUID), patient))
    return found


def test_pydicom_files_without_patient_id(tmp_path: Path) -> None:
    """Index pydicom's files without Patient ID with two identified ones; a study-level
    query by each one's Patient Name finds exactly its own studies."""
    found = pydicom_files_without_patient_id()
    named = {f.name for f in found if f.name}
    assert len(found) >= 5 and len(named) >= 3, found  # the test has something to test
    identified = [Path(pydicom.data.get_testdata_file(n)) for n in ("CT_small.dcm", "MR_small.dcm")]
    by_study: dict[str, set[str]] = {}
    for f in found:
        by_study.setdefault(f.study, set()).add(f.name)
    with Index(tmp_path / "index.sqlite", root=tmp_path) as idx:
        assert idx.add_many([*(f.path for f in found), *identified]) == len(found) + 2
        without_id = sorted(name for pid, name in patients_all(idx) if pid == "")
        assert len(without_id) == len(by_study)  # a patient per study, none shared
        for name in named:
            expected = {study for study, names in by_study.items() if name in names}
            assert studies_named(idx, name) == expected, name
        # the identified patients are where they were
        for path in identified:
            ds = dcmread(path, stop_before_pixels=True)
            assert studies_named(idx, str(ds.PatientName)) == {ds.StudyInstanceUID}
            assert study_patient(idx, ds.StudyInstanceUID)[0] == ds.PatientID
