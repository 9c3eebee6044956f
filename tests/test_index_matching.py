"""The index's C-FIND with Empty Value Matching (PS3.4 §C.2.2.2.7), Universal Matching
(§C.2.2.2.3) and, when negotiated, combined date-time matching (§C.2.2.2.5.4)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import index_location
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnet.pacs.index import STATUS_UNABLE_TO_PROCESS, Index, Level, Model, QueryError

CT = "1.2.840.10008.5.1.4.1.1.2"


def ident(level: str, **keys: object) -> Dataset:
    """An identifier (range values are not valid DA / TM values: pydicom warns)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
    return ds


class Store:
    """Writes small CT instances into a folder and indexes them."""

    def __init__(self, root: Path, index: Index) -> None:
        self.root, self.index, self.count = root, index, 0

    def add(self, study: str | None = None, series: str | None = None, **attrs: object) -> str:
        """Index one instance with `attrs` (None: the attribute is left out); returns
        its Study Instance UID."""
        ds = Dataset()
        values: dict[str, object] = {
            "PatientID": "PID",
            "PatientName": "Doe^John",
            "StudyInstanceUID": study or generate_uid(),
            "SeriesInstanceUID": series or generate_uid(),
            "Modality": "CT",
            "SOPClassUID": CT,
            "SOPInstanceUID": generate_uid(),
        }
        values.update(attrs)
        for keyword, value in values.items():
            if value is not None:
                setattr(ds, keyword, value)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        self.count += 1
        path = self.root / f"{self.count}.dcm"
        ds.save_as(path, enforce_file_format=True)
        self.index.add(path)
        return str(ds.StudyInstanceUID)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    location = index_location(request, request.param, tmp_path / "index.sqlite")
    with Index(location, root=tmp_path) as index:
        yield Store(tmp_path, index)


def found(
    store: Store, model: Model, level: Level, q: Dataset, key: str = "StudyInstanceUID", **kw: bool
) -> set[str]:
    return {str(r.get(key)) for r in store.index.query(model, level, q, **kw)}


# -- Empty Value Matching and Universal Matching --


def test_empty_value_of_an_indexed_key(store: Store) -> None:
    absent = store.add(AccessionNumber=None)
    empty = store.add(AccessionNumber="")
    valued = store.add(AccessionNumber="ACC1")
    q = ident("STUDY", StudyInstanceUID="", AccessionNumber='""')
    assert found(store, "study", "STUDY", q) == {absent, empty}
    q.AccessionNumber = '""\\ACC1'
    assert found(store, "study", "STUDY", q) == {absent, empty, valued}
    for universal in ("", "*"):  # both match the entities without a value too
        q.AccessionNumber = universal
        assert found(store, "study", "STUDY", q) == {absent, empty, valued}
    q.AccessionNumber = "ACC*"
    assert found(store, "study", "STUDY", q) == {valued}


def test_empty_value_of_dates_and_names(store: Store) -> None:
    no_date = store.add(StudyDate=None, ReferringPhysicianName="")
    dated = store.add(StudyDate="20200101", ReferringPhysicianName="Ref^Doc")
    q = ident("STUDY", StudyInstanceUID="", StudyDate='""')
    assert found(store, "study", "STUDY", q) == {no_date}
    q = ident("STUDY", StudyInstanceUID="", ReferringPhysicianName='""')
    assert found(store, "study", "STUDY", q) == {no_date}
    q = ident("STUDY", StudyInstanceUID="", StudyDate="*")
    assert found(store, "study", "STUDY", q) == {no_date, dated}


def test_empty_value_of_modalities_in_study(store: Store) -> None:
    """A derived key: the studies none of whose series has a modality."""
    none = store.add(Modality=None)
    both = store.add(Modality="CT")
    store.add(study=both, Modality=None)
    ct = store.add(Modality="CT")
    for value, expected in [('""', {none}), ('""\\CT', {none, both, ct}), ("CT", {both, ct})]:
        q = ident("STUDY", StudyInstanceUID="", ModalitiesInStudy=value)
        assert found(store, "study", "STUDY", q) == expected, value


def test_empty_value_of_a_key_read_from_the_files(store: Store) -> None:
    series = generate_uid()
    store.add(series=series, BodyPartExamined=None)
    other = generate_uid()
    store.add(series=other, BodyPartExamined="HEAD")
    q = ident("SERIES", SeriesInstanceUID="", BodyPartExamined='""')
    assert found(store, "study", "SERIES", q, key="SeriesInstanceUID", relational=True) == {series}


def test_patients_without_id_by_empty_value(store: Store) -> None:
    """Patient Root, STUDY level: Patient ID "" is a single value, the patients
    without ID; with their name, one of them."""
    anne = store.add(PatientID=None, PatientName="Anne^A")
    bob = store.add(PatientID="", PatientName="Bob^B")
    store.add(PatientID="PID-C", PatientName="Carl^C")
    q = ident("STUDY", PatientID='""', StudyInstanceUID="")
    assert found(store, "patient", "STUDY", q) == {anne, bob}
    q.PatientName = "Bob^B"
    assert found(store, "patient", "STUDY", q) == {bob}
    q = ident("STUDY", PatientName="anne^a", StudyInstanceUID="")
    assert found(store, "patient", "STUDY", q, relational=True) == {anne}


# -- combined date-time matching --


@pytest.fixture
def days(store: Store) -> dict[str, str]:
    """Studies and their date / time, one series each with the same date / time."""
    out: dict[str, str] = {}
    for name, day, clock in [
        ("A", "20200101", "0900"),
        ("B", "20200101", "2000"),
        ("C", "20200102", "0300"),
        ("D", "20200103", "1700"),
        ("E", "20200103", "1900"),
        ("F", "20200101", "1200"),
        ("G", "20200102", None),
        ("H", None, "1200"),
    ]:
        out[name] = store.add(
            StudyDate=day,
            StudyTime=clock,
            SeriesDate=day,
            SeriesTime=clock,
            ContentDate=day,
            ContentTime=clock,
        )
    return out


def names(days: dict[str, str], uids: set[str]) -> str:
    return "".join(sorted(name for name, uid in days.items() if uid in uids))


@pytest.mark.parametrize(
    ("date", "time", "combined", "apart"),
    [
        # the standard's example: one period, not the same hours of each day
        ("20200101-20200103", "1000-1800", "BCDFG", "DF"),
        ("20200101-", "2000-", "BCDEG", "B"),
        ("-20200102", "-0300", "ABCFG", "C"),
        # not the same form of Range Matching: matched apart even when negotiated
        ("20200101-20200103", "1000-", "BDEF", "BDEF"),
        ("20200102", "0000-0400", "C", "C"),
    ],
)
def test_study_date_and_time(
    store: Store, days: dict[str, str], date: str, time: str, combined: str, apart: str
) -> None:
    q = ident("STUDY", StudyInstanceUID="", StudyDate=date, StudyTime=time)
    assert names(days, found(store, "study", "STUDY", q, combined_datetime=True)) == combined
    assert names(days, found(store, "study", "STUDY", q)) == apart


def test_series_date_and_time(store: Store, days: dict[str, str]) -> None:
    q = ident("SERIES", SeriesDate="20200101-20200102", SeriesTime="2000-0300")
    q.SeriesInstanceUID = ""
    q.StudyInstanceUID = ""
    uids = found(store, "study", "SERIES", q, relational=True, combined_datetime=True)
    assert names(days, uids) == "BCG"
    assert found(store, "study", "SERIES", q, relational=True) == set()  # 20:00 > 03:00


def test_date_and_time_read_from_the_files(store: Store, days: dict[str, str]) -> None:
    """ContentDate / ContentTime are not indexed: matched on each response."""
    q = ident("IMAGE", SOPInstanceUID="", StudyInstanceUID="")
    q.ContentDate = "20200101-20200103"
    q.ContentTime = "1000-1800"
    uids = found(store, "study", "IMAGE", q, relational=True, combined_datetime=True)
    assert names(days, uids) == "BCDFG"
    assert names(days, found(store, "study", "IMAGE", q, relational=True)) == "DF"
    responses = store.index.query("study", "IMAGE", q, relational=True, combined_datetime=True)
    assert {
        (r.ContentDate, r.ContentTime) for r in responses if r.StudyInstanceUID == days["C"]
    } == {("20200102", "0300")}


def test_an_indexed_date_with_a_time_read_from_the_files(store: Store) -> None:
    """PatientBirthDate is indexed, PatientBirthTime is not."""
    late = store.add(PatientID="P1", PatientBirthDate="19991231", PatientBirthTime="2330")
    early = store.add(PatientID="P2", PatientBirthDate="19991231", PatientBirthTime="0100")
    q = ident("STUDY", StudyInstanceUID="")
    q.PatientBirthDate = "19991231-20000101"
    q.PatientBirthTime = "2300-0100"
    assert found(store, "study", "STUDY", q, combined_datetime=True) == {late}
    assert found(store, "study", "STUDY", q) == set()
    q.PatientBirthDate = "19991231-19991231"
    q.PatientBirthTime = "0000-0200"
    assert found(store, "study", "STUDY", q, combined_datetime=True) == {early}


def test_invalid_combined_values(store: Store) -> None:
    q = ident("STUDY", StudyInstanceUID="", StudyDate="20200101-20200102", StudyTime="99-")
    with pytest.raises(QueryError) as info:
        store.index.query("study", "STUDY", q, combined_datetime=True)
    assert info.value.status == STATUS_UNABLE_TO_PROCESS
    assert info.value.offending == (0x00080030,)
