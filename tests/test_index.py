"""The embedded Query/Retrieve index: schema, hierarchical queries in both models at
every level, retrieve lists, rebuild, streaming, threads and processes, errors."""

from __future__ import annotations

import copy
import multiprocessing
import random
import shutil
import sqlite3
import threading
import tracemalloc
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pydicom.data
import pytest
from conftest import index_location
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from dicomnet.errors import DicomNetError
from dicomnet.pacs import index_schema
from dicomnet.pacs.index import (
    INDEX_FILE_NAME,
    SCHEMA_VERSION,
    STATUS_IDENTIFIER_DOES_NOT_MATCH,
    Index,
    IndexCounts,
    QueryError,
)
from dicomnet.pacs.index_db import SchemaTooNew
from dicomnet.pacs.index_files import quick_values
from dicomnet.pacs.index_schema import INDEXED_TAGS, TABLES
from dicomnet.pacs.matching import SQLITE

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
US = "1.2.840.10008.5.1.4.1.1.6.1"
CR = "1.2.840.10008.5.1.4.1.1.1"
SOP_CLASSES = {"CT": CT, "MR": MR, "US": US, "CR": CR}

# (Patient ID, name, birth date, sex, Specific Character Set)
PATIENTS = [
    ("PID001", "Doe^John", "19700101", "M", None),
    ("PID002", "DOE^JANE", "19800202", "F", None),
    ("PID003", "Smith^Anna", "19900303", "F", None),
    ("PID004", "Müller^Jürgen", "19600404", "M", "ISO_IR 100"),
    ("PID005", "Smithson^Bob", "20000505", "M", None),
    ("PID006", "O'Brien^Pat", "19551212", "O", None),
    ("PID007", "Παπαδόπουλος^Νίκος", "19850707", "M", "ISO_IR 192"),
]
STUDY_TIMES = ["083000", "1415", "23", "101010.5", "120000.123456", "0700", "164500"]
BODY_PARTS = {"CT": "CHEST", "MR": "HEAD", "US": "ABDOMEN", "CR": "HAND"}


@dataclass(frozen=True)
class Inst:
    """What the test knows of one generated instance (the expected values)."""

    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_uid: str
    study_date: str
    study_time: str
    accession: str
    study_id: str
    procedure: str
    series_uid: str
    modality: str
    series_number: int
    instance_uid: str
    sop_class: str
    instance_number: int
    content_date: str
    transfer_syntax: str
    path: Path


def write_instance(inst: Inst, charset: str | None) -> None:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.PatientName = inst.patient_name
    ds.PatientID = inst.patient_id
    ds.PatientBirthDate = inst.birth_date
    ds.PatientSex = inst.sex
    ds.PatientComments = f"comment on {inst.patient_id}"
    ds.StudyInstanceUID = inst.study_uid
    ds.StudyDate = inst.study_date
    ds.StudyTime = inst.study_time
    ds.AccessionNumber = inst.accession
    ds.StudyID = inst.study_id
    ds.ReferringPhysicianName = "Ref^Doctor"
    ds.StudyDescription = f"Study {inst.study_id}"
    code = Dataset()
    code.CodeValue = inst.procedure
    code.CodingSchemeDesignator = "LOCAL"
    code.CodeMeaning = {"P1": "Head scan", "P2": "Chest scan"}[inst.procedure]
    ds.ProcedureCodeSequence = [code]
    ds.SeriesInstanceUID = inst.series_uid
    ds.Modality = inst.modality
    ds.SeriesNumber = inst.series_number
    ds.SeriesDescription = f"{inst.modality} series {inst.series_number}"
    ds.BodyPartExamined = BODY_PARTS[inst.modality]
    ds.SOPClassUID = inst.sop_class
    ds.SOPInstanceUID = inst.instance_uid
    ds.InstanceNumber = inst.instance_number
    ds.ContentDate = inst.content_date
    ds.Rows = 2
    ds.Columns = 2
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = inst.sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = inst.instance_uid
    ds.file_meta.TransferSyntaxUID = inst.transfer_syntax
    inst.path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(inst.path, enforce_file_format=True)


def build_corpus(root: Path, seed: int = 3) -> list[Inst]:
    rng = random.Random(seed)
    out: list[Inst] = []
    study_count = 0
    for pid, name, birth, sex, charset in PATIENTS:
        for _ in range(rng.randint(2, 4)):
            study_count += 1
            study_uid = generate_uid()
            study_date = (date(2019, 1, 1) + timedelta(days=rng.randint(0, 5 * 365))).strftime(
                "%Y%m%d"
            )
            study_time = rng.choice(STUDY_TIMES)
            procedure = rng.choice(["P1", "P2"])
            for series_number in range(1, rng.randint(1, 4) + 1):
                series_uid = generate_uid()
                modality = rng.choice(sorted(SOP_CLASSES))
                syntax = rng.choice([ExplicitVRLittleEndian, ImplicitVRLittleEndian])
                for number in range(1, rng.randint(3, 8) + 1):
                    uid = generate_uid()
                    inst = Inst(
                        patient_id=pid,
                        patient_name=name,
                        birth_date=birth,
                        sex=sex,
                        study_uid=study_uid,
                        study_date=study_date,
                        study_time=study_time,
                        accession=f"ACC{study_count:04d}",
                        study_id=f"S{study_count}",
                        procedure=procedure,
                        series_uid=series_uid,
                        modality=modality,
                        series_number=series_number,
                        instance_uid=uid,
                        sop_class=SOP_CLASSES[modality],
                        instance_number=number,
                        content_date=study_date,
                        transfer_syntax=syntax,
                        path=root / pid / study_uid[-6:] / f"{uid}.dcm",
                    )
                    write_instance(inst, charset)
                    out.append(inst)
    return out


@dataclass
class Corpus:
    root: Path
    instances: list[Inst]

    def studies(self) -> dict[str, list[Inst]]:
        result: dict[str, list[Inst]] = {}
        for inst in self.instances:
            result.setdefault(inst.study_uid, []).append(inst)
        return result

    def series(self) -> dict[str, list[Inst]]:
        result: dict[str, list[Inst]] = {}
        for inst in self.instances:
            result.setdefault(inst.series_uid, []).append(inst)
        return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("storage")
    instances = build_corpus(root)
    # things rebuild must skip: the spool folder, a partial file, a non-DICOM file
    spool = root / ".tmp"
    spool.mkdir()
    shutil.copy(instances[0].path, spool / "spooled.dcm")
    shutil.copy(instances[0].path, root / ".partial.dcm")
    (root / "junk.dcm").write_bytes(b"not dicom at all")
    (root / "notes.txt").write_text("hello")
    return Corpus(root, instances)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest, corpus: Corpus) -> Iterator[Index]:
    location = index_location(request, request.param, corpus.root / INDEX_FILE_NAME)
    with Index(location, root=corpus.root) as idx:
        assert idx.created
        assert idx.rebuild(corpus.root) == len(corpus.instances)
        yield idx


def ident(level: str | None, **keys: object) -> Dataset:
    """An identifier; range values such as ``2020-`` are not valid DA values, which
    pydicom warns about when they are set."""
    ds = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if level is not None:
            ds.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
    return ds


# -- building --


def test_rebuild_indexes_every_instance(corpus: Corpus, index: Index) -> None:
    assert 200 <= len(corpus.instances) <= 600
    assert len(index) == len(corpus.instances)
    assert index.counts() == IndexCounts(
        patients=len(PATIENTS),
        studies=len(corpus.studies()),
        series=len(corpus.series()),
        instances=len(corpus.instances),
    )


def test_schema_and_wal(corpus: Corpus, index: Index) -> None:
    if index.path is None:  # PostgreSQL
        import psycopg

        with psycopg.connect(index.location) as pg:
            assert pg.execute("SELECT version FROM dicomnet_schema").fetchall() == [
                (SCHEMA_VERSION,)
            ]
            paths = [r[0] for r in pg.execute("SELECT path FROM instance")]
        assert set(paths) == {i.path.relative_to(corpus.root).as_posix() for i in corpus.instances}
        return
    conn = sqlite3.connect(corpus.root / INDEX_FILE_NAME)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"patient", "study", "series", "instance"} <= tables
        # paths are stored relative to the storage folder
        paths = [r[0] for r in conn.execute("SELECT path FROM instance")]
        assert all(not Path(p).is_absolute() for p in paths)
        assert set(paths) == {i.path.relative_to(corpus.root).as_posix() for i in corpus.instances}
    finally:
        conn.close()


# -- C-FIND, Patient Root --


def test_patient_level_all(corpus: Corpus, index: Index) -> None:
    query = ident(
        "PATIENT",
        PatientName="",
        PatientID="",
        PatientBirthDate="",
        PatientSex="",
        NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedSeries="",
        NumberOfPatientRelatedInstances="",
    )
    results = {r.PatientID: r for r in index.query("patient", "PATIENT", query)}
    assert set(results) == {p[0] for p in PATIENTS}
    for pid, name, birth, sex, _ in PATIENTS:
        r = results[pid]
        mine = [i for i in corpus.instances if i.patient_id == pid]
        assert str(r.PatientName) == name
        assert r.PatientBirthDate == birth and r.PatientSex == sex
        assert r.NumberOfPatientRelatedStudies == len({i.study_uid for i in mine})
        assert r.NumberOfPatientRelatedSeries == len({i.series_uid for i in mine})
        assert r.NumberOfPatientRelatedInstances == len(mine)
        assert r.QueryRetrieveLevel == "PATIENT"
        # exactly the requested keys, plus the level (and a character set when needed)
        expected = set(query.keys())
        if not name.isascii():
            expected.add(0x00080005)
        assert set(r.keys()) == expected


def test_patient_name_matching(index: Index) -> None:
    def names(value: str) -> set[str]:
        q = ident("PATIENT", PatientName=value, PatientID="")
        return {r.PatientID for r in index.query("patient", "PATIENT", q)}

    assert names("doe*") == {"PID001", "PID002"}  # PN: case-insensitive wildcard
    assert names("DOE^JOHN") == {"PID001"}  # PN: case-insensitive single value
    assert names("Smith*") == {"PID003", "PID005"}
    assert names("Smith^*") == {"PID003"}
    assert names("?mith^Ann?") == {"PID003"}
    assert names("müller*") == {"PID004"}
    assert names("παπαδόπουλος*") == {"PID007"}
    assert names("Nobody") == set()
    assert names("*") == {p[0] for p in PATIENTS}


def test_patient_level_date_range_and_id_list(index: Index) -> None:
    q = ident("PATIENT", PatientID="", PatientBirthDate="19700101-19851231")
    found = {r.PatientID for r in index.query("patient", "PATIENT", q)}
    assert found == {p[0] for p in PATIENTS if "19700101" <= p[2] <= "19851231"}
    q = ident("PATIENT", PatientID="PID001\\PID003")
    assert {r.PatientID for r in index.query("patient", None, q)} == {"PID001", "PID003"}


def test_study_level_patient_root(corpus: Corpus, index: Index) -> None:
    for pid, *_ in PATIENTS:
        q = ident("STUDY", PatientID=pid, StudyInstanceUID="", StudyDate="", AccessionNumber="")
        got = {r.StudyInstanceUID: r for r in index.query("patient", "STUDY", q)}
        expected = {i.study_uid: i for i in corpus.instances if i.patient_id == pid}
        assert set(got) == set(expected)
        for uid, r in got.items():
            assert r.StudyDate == expected[uid].study_date
            assert r.AccessionNumber == expected[uid].accession
            assert r.PatientID == pid


def test_study_level_study_root(corpus: Corpus, index: Index) -> None:
    studies = corpus.studies()
    q = ident(
        "STUDY",
        StudyInstanceUID="",
        StudyDate="20200101-20211231",
        StudyTime="",
        PatientName="",
        PatientID="",
        ModalitiesInStudy="",
        SOPClassesInStudy="",
        NumberOfStudyRelatedSeries="",
        NumberOfStudyRelatedInstances="",
        StudyDescription="",
        ReferringPhysicianName="",
    )
    got = {r.StudyInstanceUID: r for r in index.query("study", "STUDY", q)}
    expected = {uid for uid, i in studies.items() if "20200101" <= i[0].study_date <= "20211231"}
    assert expected and set(got) == expected
    for uid, r in got.items():
        insts = studies[uid]
        assert list(r.ModalitiesInStudy) == sorted({i.modality for i in insts}) or (
            r.ModalitiesInStudy == insts[0].modality
        )
        classes = r.SOPClassesInStudy
        classes = [classes] if isinstance(classes, str) else list(classes)
        assert sorted(classes) == sorted({i.sop_class for i in insts})
        assert r.NumberOfStudyRelatedSeries == len({i.series_uid for i in insts})
        assert r.NumberOfStudyRelatedInstances == len(insts)
        assert str(r.PatientName) == insts[0].patient_name
        assert r.StudyTime == insts[0].study_time
        assert r.StudyDescription == f"Study {insts[0].study_id}"
        assert str(r.ReferringPhysicianName) == "Ref^Doctor"


def test_modalities_in_study_matching(corpus: Corpus, index: Index) -> None:
    studies = corpus.studies()
    for value, wanted in (("MR", {"MR"}), ("CT\\US", {"CT", "US"}), ("C?", {"CT", "CR"})):
        q = ident("STUDY", StudyInstanceUID="", ModalitiesInStudy=value)
        got = {r.StudyInstanceUID for r in index.query("study", "STUDY", q)}
        expected = {uid for uid, i in studies.items() if {x.modality for x in i} & wanted}
        assert got == expected


def test_study_time_range(corpus: Corpus, index: Index) -> None:
    studies = corpus.studies()
    q = ident("STUDY", StudyInstanceUID="", StudyTime="1000-1415")
    got = {r.StudyInstanceUID for r in index.query("study", "STUDY", q)}
    # 083000, 23, 0700, 164500 are out; 1415 (up to 14:15:59), 101010.5, 120000.1 are in
    inside = {"1415", "101010.5", "120000.123456"}
    assert got == {uid for uid, i in studies.items() if i[0].study_time in inside}
    q = ident("STUDY", StudyInstanceUID="", StudyTime="23")  # the whole hour
    got = {r.StudyInstanceUID for r in index.query("study", "STUDY", q)}
    assert got == {uid for uid, i in studies.items() if i[0].study_time == "23"}


def test_series_level_both_models(corpus: Corpus, index: Index) -> None:
    for study_uid, insts in corpus.studies().items():
        pid = insts[0].patient_id
        keys = {
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": "",
            "Modality": "",
            "SeriesNumber": "",
            "NumberOfSeriesRelatedInstances": "",
        }
        for model, q in (
            ("study", ident("SERIES", **keys)),
            ("patient", ident("SERIES", PatientID=pid, **keys)),
        ):
            got = {r.SeriesInstanceUID: r for r in index.query(model, "SERIES", q)}  # type: ignore[arg-type]
            assert set(got) == {i.series_uid for i in insts}
            for uid, r in got.items():
                mine = [i for i in insts if i.series_uid == uid]
                assert r.Modality == mine[0].modality
                assert r.SeriesNumber == mine[0].series_number
                assert r.NumberOfSeriesRelatedInstances == len(mine)


def test_series_level_matching_and_file_keys(corpus: Corpus, index: Index) -> None:
    study_uid, insts = max(
        corpus.studies().items(), key=lambda kv: len({i.series_uid for i in kv[1]})
    )
    q = ident("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="", SeriesNumber="1")
    assert [r.SeriesNumber for r in index.query("study", "SERIES", q)] == [1]
    # BodyPartExamined is not indexed: read from the files, and matched there
    modality = insts[0].modality
    q = ident(
        "SERIES",
        StudyInstanceUID=study_uid,
        SeriesInstanceUID="",
        BodyPartExamined=BODY_PARTS[modality][:2] + "*",
    )
    got = {r.SeriesInstanceUID: r for r in index.query("study", "SERIES", q)}
    wanted = {i.series_uid for i in insts if BODY_PARTS[i.modality] == BODY_PARTS[modality]}
    assert set(got) == wanted
    assert all(r.BodyPartExamined == BODY_PARTS[modality] for r in got.values())


def test_image_level_both_models(corpus: Corpus, index: Index) -> None:
    for series_uid, insts in list(corpus.series().items())[:10]:
        first = insts[0]
        keys = {
            "StudyInstanceUID": first.study_uid,
            "SeriesInstanceUID": series_uid,
            "SOPInstanceUID": "",
            "SOPClassUID": "",
            "InstanceNumber": "",
            "AvailableTransferSyntaxUID": "",
            "ContentDate": "",  # not indexed: from the file
            "Rows": None,
            "InstanceAvailability": "",
        }
        for model, q in (
            ("study", ident("IMAGE", **keys)),
            ("patient", ident("IMAGE", PatientID=first.patient_id, **keys)),
        ):
            got = {r.SOPInstanceUID: r for r in index.query(model, "IMAGE", q)}  # type: ignore[arg-type]
            assert set(got) == {i.instance_uid for i in insts}
            for inst in insts:
                r = got[inst.instance_uid]
                assert r.SOPClassUID == inst.sop_class
                assert r.InstanceNumber == inst.instance_number
                assert r.AvailableTransferSyntaxUID == inst.transfer_syntax
                assert r.ContentDate == inst.content_date
                assert r.Rows == 2
                assert r.InstanceAvailability == "ONLINE"
                assert r.QueryRetrieveLevel == "IMAGE"


def test_image_level_instance_number_and_uid_list(corpus: Corpus, index: Index) -> None:
    series_uid, insts = next(iter(corpus.series().items()))
    base = {"StudyInstanceUID": insts[0].study_uid, "SeriesInstanceUID": series_uid}
    q = ident("IMAGE", **base, SOPInstanceUID="", InstanceNumber="2")
    assert [r.SOPInstanceUID for r in index.query("study", "IMAGE", q)] == [insts[1].instance_uid]
    wanted = [insts[0].instance_uid, insts[2].instance_uid]
    q = ident("IMAGE", **base, SOPInstanceUID="\\".join(wanted))
    assert {r.SOPInstanceUID for r in index.query("study", "IMAGE", q)} == set(wanted)
    # file keys filter too
    q = ident("IMAGE", **base, SOPInstanceUID="", ContentDate="19000101")
    assert list(index.query("study", "IMAGE", q)) == []


def test_study_level_non_indexed_keys(corpus: Corpus, index: Index) -> None:
    studies = corpus.studies()
    # PatientComments (a patient key, at study level in the Study Root model) from the file
    q = ident("STUDY", StudyInstanceUID="", PatientComments="comment on PID003")
    got = {r.StudyInstanceUID: r for r in index.query("study", "STUDY", q)}
    assert set(got) == {uid for uid, i in studies.items() if i[0].patient_id == "PID003"}
    # a sequence key: sequence matching on the file, only requested item attributes returned
    item = Dataset()
    item.CodeValue = "P2"
    item.CodeMeaning = ""
    q = ident("STUDY", StudyInstanceUID="", ProcedureCodeSequence=[item])
    got = {r.StudyInstanceUID: r for r in index.query("study", "STUDY", q)}
    assert set(got) == {uid for uid, i in studies.items() if i[0].procedure == "P2"}
    for r in got.values():
        (code,) = r.ProcedureCodeSequence
        assert code.CodeValue == "P2" and code.CodeMeaning == "Chest scan"
        assert "CodingSchemeDesignator" not in code
    q = ident("STUDY", StudyInstanceUID="", ProcedureCodeSequence=[])
    everything = list(index.query("study", "STUDY", q))
    assert len(everything) == len(studies)
    assert all(len(r.ProcedureCodeSequence) == 1 for r in everything)


def test_higher_level_keys_constrain(corpus: Corpus, index: Index) -> None:
    # Patient root, study level: a (non-unique) patient key besides Patient ID also matches
    q = ident("STUDY", PatientID="PID001", PatientName="Nobody", StudyInstanceUID="")
    assert list(index.query("patient", "STUDY", q)) == []
    # the unique key of the level above selects
    insts = corpus.studies()
    study_uid = next(iter(insts))
    q = ident("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="")
    assert {r.SeriesInstanceUID for r in index.query("study", "SERIES", q)} == {
        i.series_uid for i in insts[study_uid]
    }


def test_character_sets(index: Index) -> None:
    # a name that is not ASCII: UTF-8 unless the query's character set can hold it
    q = ident("PATIENT", PatientID="PID004", PatientName="")
    (r,) = index.query("patient", "PATIENT", q)
    assert r.SpecificCharacterSet == "ISO_IR 192" and str(r.PatientName) == "Müller^Jürgen"
    q.SpecificCharacterSet = "ISO_IR 100"
    (r,) = index.query("patient", "PATIENT", q)
    assert r.SpecificCharacterSet == "ISO_IR 100"
    q = ident("PATIENT", PatientID="PID007", PatientName="")
    q.SpecificCharacterSet = "ISO_IR 100"
    (r,) = index.query("patient", "PATIENT", q)
    assert r.SpecificCharacterSet == "ISO_IR 192"
    assert str(r.PatientName) == "Παπαδόπουλος^Νίκος"
    # ASCII only: the query's character set is echoed, none added otherwise
    q = ident("PATIENT", PatientID="PID001", PatientName="")
    (r,) = index.query("patient", "PATIENT", q)
    assert "SpecificCharacterSet" not in r
    q.SpecificCharacterSet = "ISO_IR 100"
    (r,) = index.query("patient", "PATIENT", q)
    assert r.SpecificCharacterSet == "ISO_IR 100"


def test_responses_encode(index: Index) -> None:
    """Every response can be written as an identifier (what the SCP will do)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    q = ident("STUDY", StudyInstanceUID="", PatientName="", ModalitiesInStudy="", StudyTime="")
    for r in index.query("study", "STUDY", q):
        buffer = DicomBytesIO()
        buffer.is_little_endian = True
        buffer.is_implicit_VR = True
        write_dataset(buffer, r)
        assert buffer.getvalue()


# -- C-MOVE / C-GET --


def test_files_at_every_level(corpus: Corpus, index: Index) -> None:
    by_study = corpus.studies()
    by_series = corpus.series()
    inst = corpus.instances[5]

    def expect(selected: list[Inst]) -> set[tuple[Path, str, str, str]]:
        return {(i.path, i.sop_class, i.instance_uid, i.transfer_syntax) for i in selected}

    pid = inst.patient_id
    q = ident("PATIENT", PatientID=pid)
    assert set(index.files("patient", "PATIENT", q)) == expect(
        [i for i in corpus.instances if i.patient_id == pid]
    )
    assert index.count_files("patient", "PATIENT", q) == sum(
        1 for i in corpus.instances if i.patient_id == pid
    )
    q = ident("STUDY", StudyInstanceUID=inst.study_uid)
    assert set(index.files("study", "STUDY", q)) == expect(by_study[inst.study_uid])
    q = ident("STUDY", PatientID=pid, StudyInstanceUID=inst.study_uid)
    assert set(index.files("patient", "STUDY", q)) == expect(by_study[inst.study_uid])
    q = ident("SERIES", StudyInstanceUID=inst.study_uid, SeriesInstanceUID=inst.series_uid)
    assert set(index.files("study", "SERIES", q)) == expect(by_series[inst.series_uid])
    q = ident(
        "IMAGE",
        StudyInstanceUID=inst.study_uid,
        SeriesInstanceUID=inst.series_uid,
        SOPInstanceUID=inst.instance_uid,
    )
    assert list(index.files("study", "IMAGE", q)) == [
        (inst.path, inst.sop_class, inst.instance_uid, inst.transfer_syntax)
    ]
    # a list of UIDs at the retrieve level
    two = list(by_study)[:2]
    q = ident("STUDY", StudyInstanceUID="\\".join(two))
    assert set(index.files("study", "STUDY", q)) == expect(by_study[two[0]] + by_study[two[1]])
    assert index.count_files("study", "STUDY", q) == len(by_study[two[0]]) + len(by_study[two[1]])
    # the files are there and are what the index says
    for path, sop_class, sop_instance, _ in index.files("study", "STUDY", q):
        ds = dcmread(path, stop_before_pixels=True)
        assert ds.SOPInstanceUID == sop_instance and ds.SOPClassUID == sop_class
    # nothing for an unknown study
    q = ident("STUDY", StudyInstanceUID="1.2.3.4")
    assert list(index.files("study", "STUDY", q)) == []


@pytest.mark.parametrize(
    ("model", "level", "keys", "offending"),
    [
        ("study", "STUDY", {}, 0x0020000D),  # no unique key at the level
        ("study", "STUDY", {"StudyInstanceUID": "1.2.*"}, 0x0020000D),  # wild card
        ("study", "SERIES", {"SeriesInstanceUID": "1.2"}, 0x0020000D),  # no study above
        ("study", "SERIES", {"StudyInstanceUID": "1\\2", "SeriesInstanceUID": "1"}, 0x0020000D),
        ("patient", "STUDY", {"StudyInstanceUID": "1.2"}, 0x00100020),  # no patient above
        ("study", "STUDY", {"StudyInstanceUID": "1", "SeriesInstanceUID": "2"}, 0x0020000E),
        ("study", "PATIENT", {"PatientID": "X"}, 0x00080052),  # not in the study root
    ],
)
def test_invalid_retrieves(
    index: Index, model: str, level: str, keys: dict[str, str], offending: int
) -> None:
    with pytest.raises(QueryError) as info:
        index.files(model, level, ident(level, **keys))  # type: ignore[arg-type]
    assert info.value.status == STATUS_IDENTIFIER_DOES_NOT_MATCH
    assert info.value.offending == (offending,)


# -- invalid queries --


@pytest.mark.parametrize(
    ("model", "level", "identifier", "status", "offending"),
    [
        # no Query/Retrieve Level anywhere
        ("study", None, ident(None, StudyInstanceUID=""), 0xA900, 0x00080052),
        # a level that does not exist, or not in this model, or disagreeing
        ("study", None, ident("FOO", StudyInstanceUID=""), 0xA900, 0x00080052),
        ("study", None, ident("PATIENT", PatientID=""), 0xA900, 0x00080052),
        ("patient", "STUDY", ident("SERIES", PatientID="X"), 0xA900, 0x00080052),
        # keys below the level
        ("study", "STUDY", ident("STUDY", StudyInstanceUID="", Modality="CT"), 0xA900, 0x00080060),
        ("patient", "PATIENT", ident("PATIENT", StudyDate=""), 0xA900, 0x00080020),
        (
            "study",
            "SERIES",
            ident("SERIES", StudyInstanceUID="1", SOPInstanceUID=""),
            0xA900,
            0x00080018,
        ),
        ("study", "STUDY", ident("STUDY", BodyPartExamined=""), 0xA900, 0x00180015),
        # relational: the unique key of a level above missing, empty, a list or a pattern
        ("patient", "STUDY", ident("STUDY", StudyInstanceUID=""), 0xA900, 0x00100020),
        ("patient", "STUDY", ident("STUDY", PatientID="", StudyDate=""), 0xA900, 0x00100020),
        ("patient", "STUDY", ident("STUDY", PatientID="PID*"), 0xA900, 0x00100020),
        ("study", "SERIES", ident("SERIES", Modality="CT"), 0xA900, 0x0020000D),
        (
            "study",
            "IMAGE",
            ident("IMAGE", StudyInstanceUID="1", SOPInstanceUID=""),
            0xA900,
            0x0020000E,
        ),
        ("study", "SERIES", ident("SERIES", StudyInstanceUID="1\\2"), 0xA900, 0x0020000D),
        # a value that cannot be matched
        ("study", "STUDY", ident("STUDY", StudyDate="last week"), 0xC000, 0x00080020),
        ("study", "STUDY", ident("STUDY", StudyTime="2500-"), 0xC000, 0x00080030),
        ("study", "STUDY", ident("STUDY", PatientBirthTime="99"), 0xC000, 0x00100032),
    ],
)
def test_invalid_queries(
    index: Index, model: str, level: str | None, identifier: Dataset, status: int, offending: int
) -> None:
    with pytest.raises(QueryError) as info:
        index.query(model, level, identifier)  # type: ignore[arg-type]
    assert info.value.status == status
    assert info.value.offending == (offending,)
    assert isinstance(info.value, DicomNetError)
    assert 0 < len(info.value.message) <= 64
    assert info.value.error_comment == info.value.message


def test_errors_are_raised_at_call_time(index: Index) -> None:
    """The identifier is checked when query() is called, before any row is read."""
    with pytest.raises(QueryError):
        index.query("study", None, Dataset())
    with pytest.raises(ValueError, match="information model"):
        index.query("mwl", "STUDY", ident("STUDY"))  # type: ignore[arg-type]


def test_level_from_the_argument(index: Index) -> None:
    q = ident(None, PatientID="PID001", PatientName="")
    (r,) = index.query("patient", "PATIENT", q)
    assert r.QueryRetrieveLevel == "PATIENT" and r.PatientID == "PID001"
    assert "QueryRetrieveLevel" not in q  # the identifier is not modified


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where an index of the test's own goes: an SQLite file, or a fresh schema of the
    test PostgreSQL server's database."""
    return index_location(request, request.param, tmp_path / "index.sqlite")


def _sql(location: str, statement: str) -> None:
    """Run `statement` on the index database at `location`, outside any `Index`."""
    if location.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(location, autocommit=True) as pg:
            pg.execute(statement)
        return
    conn = sqlite3.connect(location)
    try:
        conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


def test_closed_index(corpus: Corpus, db: str) -> None:
    idx = Index(db, root=corpus.root)
    idx.close()
    idx.close()  # twice is fine
    with pytest.raises(RuntimeError):
        idx.query("study", "STUDY", ident("STUDY", StudyInstanceUID=""))
    with pytest.raises(RuntimeError):
        idx.add(corpus.instances[0].path)
    with pytest.raises(RuntimeError):
        len(idx)


# -- updating --


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh(request: pytest.FixtureRequest, corpus: Corpus, tmp_path: Path) -> Iterator[Index]:
    """An index of the corpus in a database of its own (tests that change it)."""
    location = index_location(request, request.param, tmp_path / "index.sqlite")
    with Index(location, root=corpus.root) as idx:
        idx.add_many(i.path for i in corpus.instances)
        yield idx


def test_add_is_idempotent(corpus: Corpus, fresh: Index) -> None:
    before = fresh.counts()
    for inst in corpus.instances[:20]:
        fresh.add(inst.path)
    fresh.add(corpus.instances[0].path, dcmread(corpus.instances[0].path))
    assert fresh.counts() == before
    assert fresh.add_many(i.path for i in corpus.instances) == len(corpus.instances)
    assert fresh.counts() == before


def test_readding_replaces(corpus: Corpus, fresh: Index, tmp_path: Path) -> None:
    inst = corpus.instances[0]
    ds = dcmread(inst.path)
    ds.InstanceNumber = 99
    ds.StudyDescription = "Renamed"
    copy = tmp_path / "elsewhere" / f"{inst.instance_uid}.dcm"
    copy.parent.mkdir()
    ds.save_as(copy, enforce_file_format=True)
    fresh.add(copy)
    q = ident(
        "IMAGE",
        StudyInstanceUID=inst.study_uid,
        SeriesInstanceUID=inst.series_uid,
        SOPInstanceUID=inst.instance_uid,
        InstanceNumber="",
    )
    (r,) = fresh.query("study", "IMAGE", q)
    assert r.InstanceNumber == 99
    ((path, *_),) = fresh.files("study", "IMAGE", q)
    assert path == copy  # outside the root: stored as an absolute path
    q = ident("STUDY", StudyInstanceUID=inst.study_uid, StudyDescription="")
    (r,) = fresh.query("study", "STUDY", q)
    assert r.StudyDescription == "Renamed"
    assert len(fresh) == len(corpus.instances)


def test_batch_of_one_series_with_changing_parent_attributes(
    corpus: Corpus, tmp_path: Path, db: str
) -> None:
    """Consecutive files of one batch: the same series (its rows are read once and
    reused), then a changed series description, then another patient and study.
    Each row is the one its own file's bytes give."""
    source = dcmread(corpus.instances[0].path)
    study, series, other_study = generate_uid(), generate_uid(), generate_uid()
    paths: list[Path] = []
    for number, (patient, study_uid, description) in enumerate(
        [
            ("P-A", study, "first"),
            ("P-A", study, "first"),
            ("P-A", study, "second"),
            ("P-B", other_study, "other"),
            ("P-A", study, "second"),
        ],
        start=1,
    ):
        ds = copy.deepcopy(source)
        ds.PatientID, ds.PatientName = patient, f"Name^{patient}"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series if study_uid == study else generate_uid()
        ds.SeriesDescription = description
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        path = tmp_path / f"{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    with Index(db, root=tmp_path) as idx:
        assert idx.add_many(paths) == 5
        assert idx.counts() == IndexCounts(2, 2, 2, 5)
        q = ident("SERIES", StudyInstanceUID=study, SeriesInstanceUID="", SeriesDescription="")
        (r,) = idx.query("study", "SERIES", q)
        assert (r.SeriesInstanceUID, r.SeriesDescription) == (series, "second")
        q = ident("STUDY", PatientID="", PatientName="", StudyInstanceUID="")
        found = {
            (str(r.PatientID), str(r.PatientName), r.StudyInstanceUID)
            for r in idx.query("study", "STUDY", q)
        }
        assert found == {("P-A", "Name^P-A", study), ("P-B", "Name^P-B", other_study)}
        q = ident("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber="")
        numbers = sorted(int(r.InstanceNumber) for r in idx.query("study", "IMAGE", q))
        assert numbers == [1, 2, 3, 5]


def test_reconcile_removes_parents_left_empty(corpus: Corpus, tmp_path: Path, db: str) -> None:
    """A node stopped between an addition and its prune leaves a series, study and
    patient without instances: the reconcile after an unclean stop removes them, and
    indexes what the index lacks."""
    lonely, other = tmp_path / "lonely.dcm", tmp_path / "other.dcm"
    lonely_copy(corpus.instances[0].path).save_as(lonely, enforce_file_format=True)
    with Index(db, root=tmp_path) as idx:
        idx.add(lonely)
        lonely.unlink()  # gone, and its row too, without the prune
        _sql(db, "DELETE FROM instance")
        assert idx.counts() == IndexCounts(1, 1, 1, 0)
        lonely_copy(corpus.instances[1].path).save_as(other, enforce_file_format=True)
        assert idx.reconcile() == 1
        assert idx.counts() == IndexCounts(1, 1, 1, 1)  # the other's, and nothing else


def lonely_copy(path: Path) -> Dataset:
    """The data set of `path` as a new instance, alone in a new series, study and patient."""
    ds = dcmread(path)
    ds.PatientID = "LONELY"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    return ds


def test_moving_an_instance_prunes_empty_parents(
    corpus: Corpus, fresh: Index, tmp_path: Path
) -> None:
    # a series of its own study and patient, then its only instance moves elsewhere
    inst = corpus.instances[0]
    ds = lonely_copy(inst.path)
    lonely = tmp_path / "lonely.dcm"
    ds.save_as(lonely, enforce_file_format=True)
    before = fresh.counts()
    fresh.add(lonely)
    assert fresh.counts() == IndexCounts(
        before.patients + 1, before.studies + 1, before.series + 1, before.instances + 1
    )
    ds.PatientID = inst.patient_id
    ds.StudyInstanceUID = inst.study_uid
    ds.SeriesInstanceUID = inst.series_uid
    ds.save_as(lonely, enforce_file_format=True)
    fresh.add(lonely)
    assert fresh.counts() == before._replace(instances=before.instances + 1)
    assert fresh.remove(ds.SOPInstanceUID)
    assert not fresh.remove(ds.SOPInstanceUID)
    assert fresh.counts() == before


@pytest.mark.parametrize("lonely", ["LONELY", "ZZZ"])  # before and after, by patient
def test_moving_an_instance_within_one_batch(
    corpus: Corpus, fresh: Index, tmp_path: Path, lonely: str
) -> None:
    """One batch: an instance in a series of its own, then again in a series already
    indexed. The later one is indexed, whichever patient sorts first; nothing of the
    earlier one's series, study and patient is left."""
    inst = corpus.instances[0]
    ds = lonely_copy(inst.path)
    ds.PatientID = lonely
    first, second = tmp_path / "first.dcm", tmp_path / "second.dcm"
    ds.save_as(first, enforce_file_format=True)
    ds.PatientID = inst.patient_id
    ds.StudyInstanceUID = inst.study_uid
    ds.SeriesInstanceUID = inst.series_uid
    ds.InstanceNumber = 4321
    ds.save_as(second, enforce_file_format=True)
    before = fresh.counts()
    assert fresh.add_many([first, second]) == 2
    assert fresh.counts() == before._replace(instances=before.instances + 1)
    q = ident("IMAGE", StudyInstanceUID=inst.study_uid, SeriesInstanceUID=inst.series_uid)
    q.SOPInstanceUID = ds.SOPInstanceUID
    q.InstanceNumber = ""
    (match,) = fresh.query("study", "IMAGE", q)
    assert match.InstanceNumber == 4321
    ((path, *_),) = fresh.files("study", "IMAGE", q)
    assert path == second


def test_remove_prunes(corpus: Corpus, fresh: Index) -> None:
    series_uid, insts = min(corpus.series().items(), key=lambda kv: len(kv[1]))
    before = fresh.counts()
    for inst in insts:
        assert fresh.remove(inst.instance_uid)
    after = fresh.counts()
    assert after.instances == before.instances - len(insts)
    assert after.series == before.series - 1
    q = ident("SERIES", StudyInstanceUID=insts[0].study_uid, SeriesInstanceUID=series_uid)
    assert list(fresh.query("study", "SERIES", q)) == []


def test_rebuild_after_deleting_the_database(corpus: Corpus, db: str) -> None:
    with Index(db, root=corpus.root) as idx:
        assert idx.rebuild() == len(corpus.instances)
        first = idx.counts()
    with Index(db, root=corpus.root) as idx:
        assert not idx.created  # survives a restart
        assert idx.counts() == first
    if db.startswith("postgresql://"):  # its tables dropped
        _sql(db, f"DROP TABLE {', '.join(t.name for t in TABLES)}, dicomnet_schema CASCADE")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    with Index(db, root=corpus.root) as idx:
        assert idx.created and len(idx) == 0
        assert idx.rebuild(corpus.root) == len(corpus.instances)
        assert idx.counts() == first
        # rebuild clears what is no longer there
        idx.add(corpus.instances[0].path)
        assert idx.rebuild(corpus.root / "PID001") == sum(
            1 for i in corpus.instances if i.patient_id == "PID001"
        )
        assert idx.counts().patients == 1


def _set_version(location: str, version: int) -> None:
    if location.startswith("postgresql://"):
        _sql(location, f"UPDATE dicomnet_schema SET version = {version}")
    else:
        _sql(location, f"PRAGMA user_version = {version}")


def test_an_older_version_is_migrated_in_place(
    corpus: Corpus, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Index(db, root=corpus.root) as idx:
        idx.add(corpus.instances[0].path)
    _set_version(db, SCHEMA_VERSION - 1)
    step = ["CREATE TABLE migrated (step INTEGER)"]
    monkeypatch.setitem(index_schema.MIGRATIONS, SCHEMA_VERSION - 1, lambda dialect: step)
    with Index(db, root=corpus.root) as idx:
        assert not idx.created and len(idx) == 1  # the rows kept
    _sql(db, "INSERT INTO migrated VALUES (1)")  # the step ran
    with Index(db, root=corpus.root) as idx:  # once: the version is the new one now
        assert not idx.created and len(idx) == 1


def test_a_version_older_than_any_migration_is_recreated(corpus: Corpus, db: str) -> None:
    with Index(db, root=corpus.root) as idx:
        idx.add(corpus.instances[0].path)
    _set_version(db, SCHEMA_VERSION - 1)
    with Index(db, root=corpus.root) as idx:
        assert idx.created and len(idx) == 0


def test_a_newer_version(corpus: Corpus, db: str) -> None:
    """SQLite: the file is one archive's own, recreated (and rebuilt from the files).
    PostgreSQL: nodes of a newer dicomnet use it; this one refuses, and changes nothing."""
    with Index(db, root=corpus.root) as idx:
        idx.add(corpus.instances[0].path)
    _set_version(db, SCHEMA_VERSION + 1)
    if not db.startswith("postgresql://"):
        with Index(db, root=corpus.root) as idx:
            assert idx.created and len(idx) == 0
        return
    with pytest.raises(SchemaTooNew, match=f"version {SCHEMA_VERSION + 1}, newer than"):
        Index(db, root=corpus.root)
    _set_version(db, SCHEMA_VERSION)
    with Index(db, root=corpus.root) as idx:
        assert not idx.created and len(idx) == 1


def test_add_with_a_dataset_without_file_meta(corpus: Corpus, db: str) -> None:
    inst = corpus.instances[1]
    ds = dcmread(inst.path)
    del ds.file_meta
    with Index(db, root=corpus.root) as idx:
        idx.add(inst.path, ds)
        q = ident("STUDY", StudyInstanceUID=inst.study_uid)
        assert list(idx.files("study", "STUDY", q)) == [
            (inst.path, inst.sop_class, inst.instance_uid, inst.transfer_syntax)
        ]


def test_add_rejects_instances_without_uids(tmp_path: Path, db: str) -> None:
    ds = Dataset()
    ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = CT
    ds.PatientID = "X"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "bad.dcm"
    ds.save_as(path, enforce_file_format=True)
    with Index(db, root=tmp_path) as idx:
        with pytest.raises(ValueError, match="StudyInstanceUID"):
            idx.add(path)
        assert idx.add_many([path]) == 0
        assert len(idx) == 0


# -- streaming, threads, processes --


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def big(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, corpus: Corpus
) -> Iterator[tuple[Index, str, str]]:
    """20,000 instances in one series (all pointing at one small file)."""
    folder = tmp_path_factory.mktemp("big")
    location = index_location(request, request.param, folder / "big.sqlite")
    source = corpus.instances[0]
    study_uid, series_uid = "1.2.826.0.1.3680043.10.1452.9.1", "1.2.826.0.1.3680043.10.1452.9.2"
    ds = Dataset()
    ds.file_meta = dcmread(source.path, stop_before_pixels=True).file_meta
    ds.PatientID = "BIG"
    ds.PatientName = "Big^Series"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPClassUID = CT
    ds.Modality = "CT"

    def items() -> Iterator[tuple[Path, Dataset]]:
        for number in range(20_000):  # add_many reads each data set before the next
            ds.SOPInstanceUID = f"{series_uid}.{number}"
            ds.InstanceNumber = number
            yield source.path, ds

    with Index(location, root=corpus.root) as idx:
        assert idx.add_many(items()) == 20_000
        yield idx, study_uid, series_uid


def test_query_streams(big: tuple[Index, str, str]) -> None:
    """Taking a few responses of a 20,000-row query reads a few rows, not all of them
    (a list of the 20,000 rows alone would take megabytes)."""
    idx, study_uid, series_uid = big
    q = ident(
        "IMAGE",
        StudyInstanceUID=study_uid,
        SeriesInstanceUID=series_uid,
        SOPInstanceUID="",
        InstanceNumber="",
        PatientName="",
    )
    results = idx.query("study", "IMAGE", q)
    tracemalloc.start()
    try:
        first = [next(results) for _ in range(5)]
        _, lazy_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        rows = _raw_rows(idx, series_uid)
        _, rows_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(rows) == 20_000
    assert len({r.SOPInstanceUID for r in first}) == 5
    assert lazy_peak * 10 < rows_peak, (lazy_peak, rows_peak)
    assert lazy_peak < 1_000_000
    results.close()  # closes its connection
    assert (
        idx.count_files(
            "study",
            "IMAGE",
            ident(
                "IMAGE",
                StudyInstanceUID=study_uid,
                SeriesInstanceUID=series_uid,
                SOPInstanceUID="\\".join(r.SOPInstanceUID for r in first),
            ),
        )
        == 5
    )
    assert all(r.PatientName == "Big^Series" for r in first)


def _raw_rows(idx: Index, series_uid: str) -> list[tuple[str, ...]]:
    """What materialising the query's rows would cost (the yardstick)."""
    sql = (
        "SELECT i.sop_instance_uid, i.instance_number, p.patient_name FROM instance AS i"
        " JOIN series AS se ON se.pk = i.series_pk JOIN study AS st ON st.pk = se.study_pk"
        " JOIN patient AS p ON p.pk = st.patient_pk WHERE se.series_instance_uid = ?"
    )
    with idx._db.read() as conn:
        return list(conn.execute(idx.dialect.sql(sql), (series_uid,)).fetchall())


def _in_subquery(node: int, detail: dict[int, str], parent: dict[int, int]) -> bool:
    """Whether a step of an EXPLAIN QUERY PLAN belongs to a subquery."""
    while node in parent:
        if "SUBQUERY" in detail[node] or "CO-ROUTINE" in detail[node]:
            return True
        node = parent[node]
    return False


def test_query_plans_do_not_sort(big: tuple[Index, str, str]) -> None:
    """SQLite streams the rows: no query materialises its result in a temporary
    b-tree (per-row subqueries, such as the DISTINCT modalities of one study, may)."""
    from dicomnet.pacs.index_plan import plan_find

    idx, study_uid, series_uid = big
    if idx.dialect is not SQLITE:
        pytest.skip("SQLite's EXPLAIN QUERY PLAN; PostgreSQL streams: test_query_streams")
    identifiers = [
        ("patient", ident("PATIENT", PatientID="", PatientName="B*")),
        ("study", ident("STUDY", StudyInstanceUID="", StudyDate="2020-", ModalitiesInStudy="CT")),
        ("study", ident("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="")),
        ("study", ident("IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)),
    ]
    conn = sqlite3.connect(idx.path)
    try:
        for model, q in identifiers:
            plan = plan_find(model, None, q)  # type: ignore[arg-type]
            steps = conn.execute(f"EXPLAIN QUERY PLAN {plan.sql}", plan.params).fetchall()
            detail = {step[0]: str(step[3]) for step in steps}
            parent = {step[0]: step[1] for step in steps}
            top = [text for node, text in detail.items() if not _in_subquery(node, detail, parent)]
            assert top and not any("TEMP B-TREE" in d for d in top), top
    finally:
        conn.close()


def test_files_stream_and_count(big: tuple[Index, str, str]) -> None:
    idx, study_uid, _ = big
    q = ident("STUDY", StudyInstanceUID=study_uid)
    assert idx.count_files("study", "STUDY", q) == 20_000
    files = idx.files("study", "STUDY", q)
    assert len({next(files)[2] for _ in range(3)}) == 3
    files.close()


def test_a_query_can_hop_threads(big: tuple[Index, str, str]) -> None:
    """Each next() may run on another worker thread (anyio.to_thread)."""
    idx, study_uid, series_uid = big
    q = ident("IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, SOPInstanceUID="")
    results = idx.query("study", "IMAGE", q)
    with ThreadPoolExecutor(max_workers=4) as pool:
        seen = [pool.submit(next, results).result().SOPInstanceUID for _ in range(200)]
        pool.submit(results.close).result()
    assert len(set(seen)) == 200


def test_a_running_retrieve_sees_a_snapshot(corpus: Corpus, db: str) -> None:
    """Writes while a query runs neither block nor disturb it."""
    with Index(db, root=corpus.root) as idx:
        idx.add_many(i.path for i in corpus.instances)
        q = ident("PATIENT", PatientID="\\".join(p[0] for p in PATIENTS))
        files = idx.files("patient", "PATIENT", q)
        seen = [next(files)[2] for _ in range(3)]
        removed = [i.instance_uid for i in corpus.instances if i.instance_uid not in seen][-10:]
        for uid in removed:
            assert idx.remove(uid)  # the write connection is not blocked by the reader
        seen.extend(uid for _, _, uid, _ in files)
        assert sorted(seen) == sorted(i.instance_uid for i in corpus.instances)
        assert idx.count_files("patient", "PATIENT", q) == len(corpus.instances) - 10


def test_concurrent_writers_threads(corpus: Corpus, db: str) -> None:
    paths = [i.path for i in corpus.instances]
    with Index(db, root=corpus.root) as one:
        with Index(db, root=corpus.root) as two:
            errors: list[BaseException] = []

            def work(idx: Index, chunk: list[Path]) -> None:
                try:
                    for path in chunk:
                        idx.add(path)
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)

            threads = [
                threading.Thread(target=work, args=(idx, paths[n::4]))
                for n, idx in enumerate([one, two, one, two])
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert errors == []
            assert len(one) == len(two) == len(paths)


def _add_in_process(db: str, root: str, paths: list[str]) -> None:
    with Index(db, root=root) as idx:
        for path in paths:
            idx.add(path)


def test_concurrent_writers_processes(corpus: Corpus, db: str) -> None:
    Index(db, root=corpus.root).close()
    paths = [str(i.path) for i in corpus.instances]
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_add_in_process, args=(db, str(corpus.root), paths[n::2]))
        for n in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    with Index(db, root=corpus.root) as idx:
        assert len(idx) == len(paths)
        assert idx.counts().studies == len(corpus.studies())


# --- indexing without pydicom ----------------------------------------------------------------

PYDICOM_TEST_FILES = sorted((Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm"))


def _both_ways(index: Index, path: Path) -> tuple[object, object]:
    """(the record `add` makes of `path`, the record pydicom's reading gives), or the
    exception type each raised."""

    def attempt(dataset: Dataset | None) -> object:
        try:
            return index._record(str(path), dataset)
        except Exception as exc:
            return type(exc)

    try:
        dataset = dcmread(path, stop_before_pixels=True, specific_tags=INDEXED_TAGS)
    except Exception as exc:
        return attempt(None), type(exc)
    return attempt(None), attempt(dataset)


def test_quick_indexing_agrees_with_pydicom_on_its_test_files(tmp_path: Path) -> None:
    quick = 0
    with Index(tmp_path / "index.sqlite", root=Path(pydicom.data.__file__).parent) as index:
        for path in PYDICOM_TEST_FILES:
            ours, pydicoms = _both_ways(index, path)
            if isinstance(pydicoms, type):
                continue  # pydicom cannot read it either way: `add` logs and skips it
            assert ours == pydicoms, path
            quick += quick_values(path) is not None
    assert quick > len(PYDICOM_TEST_FILES) // 2


text_values = st.text(st.sampled_from(list("AB1^ \\=-.é")), max_size=12)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    values=st.fixed_dictionaries(
        {},
        optional={
            "PatientName": text_values,
            "PatientID": text_values,
            "StudyDescription": text_values,
            "Modality": st.sampled_from(["CT", " CT", "CT ", "CT\\MR", ""]),
            "SeriesNumber": st.sampled_from(["1", "0012", " 7", "3 ", "1\\2", "", "-4"]),
            "InstanceNumber": st.sampled_from(["", "5", "42"]),
            "StudyDate": st.sampled_from(["20240101", "", " 2024", "20240101\\20240102"]),
            "AccessionNumber": text_values,
        },
    ),
    implicit=st.booleans(),
    charset=st.sampled_from([None, "ISO_IR 100", "ISO_IR 192"]),
    sequence=st.sampled_from([None, "defined", "undefined"]),
)
def test_quick_indexing_agrees_with_pydicom_on_odd_values(
    tmp_path: Path,
    values: dict[str, str],
    implicit: bool,
    charset: str | None,
    sequence: str | None,
) -> None:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    if sequence:
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.3"
        inner = Dataset()
        inner.CodeValue = "X"
        item.ConceptNameCodeSequence = [inner]
        ds.ReferencedStudySequence = [item, Dataset()]
        ds["ReferencedStudySequence"].is_undefined_length = sequence == "undefined"
        ds.ReferencedStudySequence[0]["ConceptNameCodeSequence"].is_undefined_length = (
            sequence == "undefined"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        )
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        try:
            ds.save_as(path, enforce_file_format=True)
        except (UnicodeEncodeError, ValueError):
            return  # pydicom will not write this value in this character set
        with Index(tmp_path / "index.sqlite", root=tmp_path) as index:
            ours, pydicoms = _both_ways(index, path)
    assert ours == pydicoms
    if sequence:
        assert quick_values(path) is not None  # sequences are skipped, not given up on


@pytest.mark.parametrize("size", [100, 30_000, 300_000])
def test_quick_indexing_reads_further_into_a_long_header(tmp_path: Path, size: int) -> None:
    """An element of `size` bytes before the patient module: the quick path reads past its
    first 16 KiB, and leaves headers longer than 256 KiB to pydicom; same record."""
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.add_new(0x00091010, "OB", b"\x01" * size)
    ds.PatientID = "LONG"
    ds.PatientName = "Long^Header"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "long.dcm"
    ds.save_as(path, enforce_file_format=True)
    with Index(tmp_path / "index.sqlite", root=tmp_path) as index:
        ours, pydicoms = _both_ways(index, path)
        assert ours == pydicoms
        assert (quick_values(path) is not None) == (size < 200_000)
        index.add(path)
        assert index.counts().instances == 1
