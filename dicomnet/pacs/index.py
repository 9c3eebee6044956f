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

Schema (version `SCHEMA_VERSION`, in ``PRAGMA user_version``; a database of
another version is dropped and recreated empty, with `Index.created` set so the
caller rebuilds it from the files)::

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

import functools
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, NamedTuple, cast

from pydicom import config, dcmread
from pydicom.charset import python_encoding
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import PersonName

from dicomnet.errors import DicomNetError
from dicomnet.pacs.combined import (
    CombinedRange,
    combined_matches,
    combined_range,
    combined_sql,
    date_time_pairs,
)
from dicomnet.pacs.matching import (
    KEYED_VRS,
    MatchError,
    ParsedQuery,
    match_key,
    match_sequence,
    matches,
    normalize,
    parse_query,
    query_values,
    sql_condition_of,
)
from dicomnet.proto.codec import UNSCANNED_TRANSFER_SYNTAXES, part10_meta, top_level_values

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

Model = Literal["patient", "study"]
Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
LEVELS: tuple[Level, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_RANK: dict[str, int] = {level: rank for rank, level in enumerate(LEVELS)}

#: The index's file name inside the storage folder (hidden: `rebuild` skips it).
INDEX_FILE_NAME = ".dicomnet-index.sqlite"
SCHEMA_VERSION = 2

#: PS3.4 §C.4.1.1.4 / §C.4.2.1.5 failure statuses.
STATUS_IDENTIFIER_DOES_NOT_MATCH = 0xA900
STATUS_UNABLE_TO_PROCESS = 0xC000

_SPECIFIC_CHARACTER_SET = 0x00080005
_QUERY_RETRIEVE_LEVEL = 0x00080052
_QUERY_RETRIEVE_VIEW = 0x00080053
_RETRIEVE_AE_TITLE = 0x00080054
_INSTANCE_AVAILABILITY = 0x00080056
_TIMEZONE_OFFSET = 0x00080201
#: Returned as sent (the SCP fills Retrieve AE Title in if it wants to).
_ECHOED = frozenset({_QUERY_RETRIEVE_VIEW, _RETRIEVE_AE_TITLE, _TIMEZONE_OFFSET})

_UNIQUE: dict[str, str] = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


class QueryError(DicomNetError):
    """An identifier the index cannot answer; `status` is the DIMSE failure status
    to send, `message` a short Error Comment (at most 64 characters, LO), and
    `offending` the tags to put in Offending Element (0000,0901)."""

    def __init__(self, status: int, message: str, offending: Iterable[int] = ()) -> None:
        self.status = status
        self.message = message[:64]
        #: The same as `message`, under the name `DimseError` uses for it.
        self.error_comment = self.message
        self.offending: tuple[int, ...] = tuple(offending)
        super().__init__(f"{message} (status 0x{status:04X})")


class IndexCounts(NamedTuple):
    patients: int
    studies: int
    series: int
    instances: int


# -- schema ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Stored:
    """An attribute kept in a column (and, for KEYED_VRS, its match key in ``*_key``)."""

    keyword: str
    vr: str
    column: str

    @property
    def key_column(self) -> str:
        return f"{self.column}_key" if self.vr in KEYED_VRS else self.column

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column, self.key_column) if self.vr in KEYED_VRS else (self.column,)


@dataclass(frozen=True, slots=True)
class _Table:
    name: str
    alias: str
    level: Level
    parent: str | None  # foreign key column to the level above
    parent_table: str | None
    attributes: tuple[_Stored, ...]  # the first is the unique key
    #: When set, the unique key is unique only among the rows where this holds.
    unique_where: str | None = None

    @property
    def unique(self) -> _Stored:
        return self.attributes[0]


_TABLES: tuple[_Table, ...] = (
    _Table(
        "patient",
        "p",
        "PATIENT",
        None,
        None,
        (
            _Stored("PatientID", "LO", "patient_id"),
            _Stored("PatientName", "PN", "patient_name"),
            _Stored("IssuerOfPatientID", "LO", "issuer_of_patient_id"),
            _Stored("PatientBirthDate", "DA", "patient_birth_date"),
            _Stored("PatientSex", "CS", "patient_sex"),
        ),
        unique_where="patient_id != ''",  # patients without ID: one per study
    ),
    _Table(
        "study",
        "st",
        "STUDY",
        "patient_pk",
        "patient",
        (
            _Stored("StudyInstanceUID", "UI", "study_instance_uid"),
            _Stored("StudyDate", "DA", "study_date"),
            _Stored("StudyTime", "TM", "study_time"),
            _Stored("AccessionNumber", "SH", "accession_number"),
            _Stored("StudyID", "SH", "study_id"),
            _Stored("ReferringPhysicianName", "PN", "referring_physician_name"),
            _Stored("StudyDescription", "LO", "study_description"),
        ),
    ),
    _Table(
        "series",
        "se",
        "SERIES",
        "study_pk",
        "study",
        (
            _Stored("SeriesInstanceUID", "UI", "series_instance_uid"),
            _Stored("Modality", "CS", "modality"),
            _Stored("SeriesNumber", "IS", "series_number"),
            _Stored("SeriesDescription", "LO", "series_description"),
            _Stored("SeriesDate", "DA", "series_date"),
            _Stored("SeriesTime", "TM", "series_time"),
        ),
    ),
    _Table(
        "instance",
        "i",
        "IMAGE",
        "series_pk",
        "series",
        (
            _Stored("SOPInstanceUID", "UI", "sop_instance_uid"),
            _Stored("SOPClassUID", "UI", "sop_class_uid"),
            _Stored("InstanceNumber", "IS", "instance_number"),
        ),
    ),
)
_TABLE = {table.name: table for table in _TABLES}


def _schema() -> list[str]:
    statements: list[str] = []
    for table in _TABLES:
        columns = ["pk INTEGER PRIMARY KEY"]
        if table.parent is not None:
            columns.append(
                f"{table.parent} INTEGER NOT NULL REFERENCES {table.parent_table}(pk)"
                " ON DELETE CASCADE"
            )
        for attr in table.attributes:
            if attr is table.unique:
                unique = "" if table.unique_where else " UNIQUE"
                columns.append(f"{attr.column} TEXT NOT NULL{unique}")
            else:
                columns.extend(f"{column} TEXT" for column in attr.columns)
        if table.name == "instance":
            columns += ["path TEXT NOT NULL", "transfer_syntax TEXT", "size INTEGER"]
        statements.append(f"CREATE TABLE {table.name} ({', '.join(columns)})")
        if table.unique_where:
            statements.append(
                f"CREATE UNIQUE INDEX {table.name}_{table.unique.column} ON {table.name}"
                f" ({table.unique.column}) WHERE {table.unique_where}"
            )
        if table.parent is not None:
            statements.append(
                f"CREATE INDEX {table.name}_{table.parent} ON {table.name} ({table.parent})"
            )
    for name, column in (
        ("patient", "patient_name_key"),
        ("study", "study_date_key"),
        ("study", "accession_number"),
        ("series", "modality"),
    ):
        statements.append(f"CREATE INDEX {name}_{column} ON {name} ({column})")
    return statements


def _upsert_sql(table: _Table, by_pk: bool = False) -> tuple[str, list[str]]:
    """INSERT ... ON CONFLICT(unique) DO UPDATE ... RETURNING pk, and its column order;
    `by_pk`: the first column is the row's pk (NULL for a new row), the conflict on it.

    A NULL (attribute absent from the new instance) keeps the indexed value."""
    columns: list[str] = ["pk"] if by_pk else []
    columns += [table.parent] if table.parent else []
    updates: list[str] = [f"{table.parent} = excluded.{table.parent}"] if table.parent else []
    for attr in table.attributes:
        columns.extend(attr.columns)
        if attr is table.unique:
            continue
        updates.append(f"{attr.column} = COALESCE(excluded.{attr.column}, {attr.column})")
        if attr.key_column != attr.column:
            updates.append(
                f"{attr.key_column} = CASE WHEN excluded.{attr.column} IS NULL"
                f" THEN {attr.key_column} ELSE excluded.{attr.key_column} END"
            )
    if table.name == "instance":
        columns += ["path", "transfer_syntax", "size"]
        updates += [f"{c} = excluded.{c}" for c in ("path", "transfer_syntax", "size")]
    conflict = f"({table.unique.column})"
    if by_pk:
        conflict = "(pk)"
    elif table.unique_where:
        conflict += f" WHERE {table.unique_where}"
    sql = (
        f"INSERT INTO {table.name} ({', '.join(columns)})"
        f" VALUES ({', '.join('?' * len(columns))})"
        f" ON CONFLICT{conflict} DO UPDATE SET {', '.join(updates)}"
        " RETURNING pk"
    )
    return sql, columns


_UPSERTS = {table.name: _upsert_sql(table) for table in _TABLES}
# A patient without Patient ID: a row of its own, found through its study.
_UPSERT_PATIENT_BY_PK = _upsert_sql(_TABLE["patient"], by_pk=True)[0]
_STUDY_PATIENT = (
    "SELECT p.pk, p.patient_id FROM study AS st JOIN patient AS p ON p.pk = st.patient_pk"
    " WHERE st.study_instance_uid = ?"
)
_PARENT_TABLES = tuple(table for table in _TABLES if table.name != "instance")
# A new instance (the usual case) is one INSERT; a conflict leaves the row as it was.
_INSERT_INSTANCE = (
    f"INSERT INTO instance ({', '.join(_UPSERTS['instance'][1])})"
    f" VALUES ({', '.join('?' * len(_UPSERTS['instance'][1]))})"
    f" ON CONFLICT({_TABLE['instance'].unique.column}) DO NOTHING RETURNING pk"
)
_STORED_TAGS: dict[str, BaseTag] = {
    attr.keyword: Tag(attr.keyword) for table in _TABLES for attr in table.attributes
}
_STORED_TAG_SET = frozenset(_STORED_TAGS.values())

# What `Index._build_record` reads, table by table in upsert column order: the table's
# name, its tags, and for each attribute (tag, VR, keyword, role, whether a match key
# column follows).
_PLAIN, _UNIQUE_KEY, _SOP_CLASS = 0, 1, 2
_RECORD_PLAN: tuple[
    tuple[str, tuple[int, ...], tuple[tuple[int, str, str, int, bool], ...]], ...
] = tuple(
    (
        table.name,
        tuple(int(_STORED_TAGS[attr.keyword]) for attr in table.attributes),
        tuple(
            (
                int(_STORED_TAGS[attr.keyword]),
                attr.vr,
                attr.keyword,
                _UNIQUE_KEY
                if attr is table.unique
                else _SOP_CLASS
                if attr.keyword == "SOPClassUID"
                else _PLAIN,
                attr.key_column != attr.column,
            )
            for attr in table.attributes
        ),
    )
    for table in _TABLES
)

# -- query attributes -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Attr:
    """How a key attribute is returned (`value_sql`) and matched (`match_sql`, or
    `exists` with ``{cond}`` on the inner column `match_sql`) in SQL."""

    level: Level
    vr: str
    value_sql: str
    match_sql: str
    exists: str | None = None


_P_STUDIES = "FROM study AS c1 WHERE c1.patient_pk = p.pk"
_P_SERIES = "FROM study AS c1 JOIN series AS c2 ON c2.study_pk = c1.pk WHERE c1.patient_pk = p.pk"
_P_INSTANCES = (
    "FROM study AS c1 JOIN series AS c2 ON c2.study_pk = c1.pk"
    " JOIN instance AS c3 ON c3.series_pk = c2.pk WHERE c1.patient_pk = p.pk"
)
_ST_SERIES = "FROM series AS c2 WHERE c2.study_pk = st.pk"
_ST_INSTANCES = (
    "FROM series AS c2 JOIN instance AS c3 ON c3.series_pk = c2.pk WHERE c2.study_pk = st.pk"
)
_SE_INSTANCES = "FROM instance AS c3 WHERE c3.series_pk = se.pk"


def _count(level: Level, source: str) -> _Attr:
    sql = f"CAST((SELECT COUNT(*) {source}) AS TEXT)"
    return _Attr(level, "IS", sql, sql)


def _attributes() -> dict[str, _Attr]:
    attrs: dict[str, _Attr] = {}
    for table in _TABLES:
        for stored in table.attributes:
            attrs[stored.keyword] = _Attr(
                table.level,
                stored.vr,
                f"{table.alias}.{stored.column}",
                f"{table.alias}.{stored.key_column}",
            )
    attrs.update(
        NumberOfPatientRelatedStudies=_count("PATIENT", _P_STUDIES),
        NumberOfPatientRelatedSeries=_count("PATIENT", _P_SERIES),
        NumberOfPatientRelatedInstances=_count("PATIENT", _P_INSTANCES),
        NumberOfStudyRelatedSeries=_count("STUDY", _ST_SERIES),
        NumberOfStudyRelatedInstances=_count("STUDY", _ST_INSTANCES),
        NumberOfSeriesRelatedInstances=_count("SERIES", _SE_INSTANCES),
        ModalitiesInStudy=_Attr(
            "STUDY",
            "CS",
            "(SELECT group_concat(m, '\\') FROM (SELECT DISTINCT c2.modality AS m "
            f"{_ST_SERIES} AND c2.modality IS NOT NULL AND c2.modality != '' ORDER BY m))",
            "c2.modality",
            f"EXISTS (SELECT 1 {_ST_SERIES} AND {{cond}})",
        ),
        SOPClassesInStudy=_Attr(
            "STUDY",
            "UI",
            "(SELECT group_concat(u, '\\') FROM (SELECT DISTINCT c3.sop_class_uid AS u "
            f"{_ST_INSTANCES} ORDER BY u))",
            "c3.sop_class_uid",
            f"EXISTS (SELECT 1 {_ST_INSTANCES} AND {{cond}})",
        ),
        AvailableTransferSyntaxUID=_Attr("IMAGE", "UI", "i.transfer_syntax", "i.transfer_syntax"),
    )
    return attrs


_ATTRS = _attributes()

#: Keys the index does not hold whose level is known (PS3.4 Tables C.6-1 to C.6-4 and
#: the modules of each information entity); any other key is taken to belong to the
#: query level. Values come from the stored files.
_FILE_LEVELS: dict[str, Level] = {
    **dict.fromkeys(
        (
            "PatientBirthTime",
            "OtherPatientIDsSequence",
            "OtherPatientNames",
            "EthnicGroup",
            "PatientComments",
            "ReferencedPatientSequence",
            "IssuerOfPatientIDQualifiersSequence",
            "PatientSpeciesDescription",
            "PatientBreedDescription",
            "ResponsiblePerson",
            "PatientIdentityRemoved",
            "PatientBirthName",
            "PatientMotherBirthName",
            "PatientAddress",
        ),
        "PATIENT",
    ),
    **dict.fromkeys(
        (
            "ProcedureCodeSequence",
            "NameOfPhysiciansReadingStudy",
            "AdmittingDiagnosesDescription",
            "ReferencedStudySequence",
            "PatientAge",
            "PatientSize",
            "PatientWeight",
            "Occupation",
            "AdditionalPatientHistory",
            "OtherStudyNumbers",
            "IssuerOfAccessionNumberSequence",
            "PhysiciansOfRecord",
            "AnatomicRegionsInStudyCodeSequence",
            "RequestingPhysician",
            "RequestedProcedureDescription",
        ),
        "STUDY",
    ),
    **dict.fromkeys(
        (
            "BodyPartExamined",
            "ProtocolName",
            "Laterality",
            "PerformedProcedureStepStartDate",
            "PerformedProcedureStepStartTime",
            "PerformedProcedureStepID",
            "PerformedProcedureStepDescription",
            "RequestAttributesSequence",
            "Manufacturer",
            "ManufacturerModelName",
            "InstitutionName",
            "StationName",
            "OperatorsName",
            "PerformingPhysicianName",
            "FrameOfReferenceUID",
            "PatientPosition",
        ),
        "SERIES",
    ),
    **dict.fromkeys(
        (
            "ContentDate",
            "ContentTime",
            "AcquisitionDate",
            "AcquisitionTime",
            "AcquisitionDateTime",
            "InstanceCreationDate",
            "InstanceCreationTime",
            "ImageType",
            "Rows",
            "Columns",
            "NumberOfFrames",
            "BitsAllocated",
            "ImageComments",
            "AlternateRepresentationSequence",
            "ReferencedImageSequence",
            "SourceImageSequence",
            "ContentLabel",
            "ContentDescription",
            "ConceptNameCodeSequence",
            "CompletionFlag",
            "VerificationFlag",
            "SliceLocation",
            "AcquisitionNumber",
        ),
        "IMAGE",
    ),
}

_FROM: dict[str, str] = {
    "PATIENT": "patient AS p",
    "STUDY": "study AS st JOIN patient AS p ON p.pk = st.patient_pk",
    "SERIES": "series AS se JOIN study AS st ON st.pk = se.study_pk"
    " JOIN patient AS p ON p.pk = st.patient_pk",
    "IMAGE": "instance AS i JOIN series AS se ON se.pk = i.series_pk"
    " JOIN study AS st ON st.pk = se.study_pk JOIN patient AS p ON p.pk = st.patient_pk",
}
#: A stored file of the entity a row stands for (read only for keys not indexed).
_PATH: dict[str, str] = {
    "PATIENT": f"(SELECT c3.path {_P_INSTANCES} LIMIT 1)",
    "STUDY": f"(SELECT c3.path {_ST_INSTANCES} LIMIT 1)",
    "SERIES": f"(SELECT c3.path {_SE_INSTANCES} LIMIT 1)",
    "IMAGE": "i.path",
}

#: The attributes `add` reads from a file (when it is not given the data set).
_INDEXED_TAGS: list[int] = sorted(
    {_SPECIFIC_CHARACTER_SET}
    | {tag for t in _TABLES for a in t.attributes if (tag := tag_for_keyword(a.keyword))}
)

#: Values from the index were valid when stored: no validation when they are returned.
_TRUSTED = config.IGNORE

_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})


# -- query plans --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Output:
    """One attribute of a response: from a result column, from the file, or fixed."""

    tag: int
    vr: str
    source: Literal["column", "file", "level", "echo", "online"]
    index: int = 0  # result column
    key: DataElement | None = None  # the key as sent (file / echo)
    filter: bool = False  # file: the key's value must match


@dataclass(slots=True)
class _FindPlan:
    level: Level
    sql: str
    params: list[str]
    outputs: list[_Output] = field(default_factory=list)
    file_tags: list[int] = field(default_factory=list)
    charset: list[str] | None = None
    select: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    #: Combined date-time ranges checked on each response: (DA tag, TM tag, range).
    pairs: list[tuple[int, int, CombinedRange]] = field(default_factory=list)


def _keyword(elem: DataElement) -> str:
    return elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"


def _is_key(tag: int) -> bool:
    """A key attribute of an identifier (not a group length, not Specific Character
    Set or Query/Retrieve Level and the like, which are never matched)."""
    return (
        tag & 0xFFFF != 0
        and tag >> 16 > 0x0002
        and tag
        not in (
            _SPECIFIC_CHARACTER_SET,
            _QUERY_RETRIEVE_LEVEL,
            _INSTANCE_AVAILABILITY,
            *_ECHOED,
        )
    )


def _model_levels(model: Model) -> tuple[Level, ...]:
    if model == "patient":
        return LEVELS
    if model == "study":
        return LEVELS[1:]
    raise ValueError(f"unknown information model {model!r} (expected 'patient' or 'study')")


def _check_level(model: Model, level: Level | None, identifier: Dataset) -> Level:
    """The Query/Retrieve Level: from the identifier, checked against `level` and the
    model (PS3.4 §C.6.1, §C.6.2)."""
    levels = _model_levels(model)
    elem = identifier.get(_QUERY_RETRIEVE_LEVEL)
    given: str | None = None
    if elem is not None and elem.value not in (None, ""):
        given = normalize("CS", str(elem.value))
    if given is None and level is None:
        raise QueryError(
            STATUS_IDENTIFIER_DOES_NOT_MATCH,
            "Query/Retrieve Level (0008,0052) is missing",
            (_QUERY_RETRIEVE_LEVEL,),
        )
    if given is not None and level is not None and given != level:
        raise QueryError(
            STATUS_IDENTIFIER_DOES_NOT_MATCH,
            f"Query/Retrieve Level {given} is not {level}",
            (_QUERY_RETRIEVE_LEVEL,),
        )
    chosen = given if given is not None else level
    if chosen not in levels:
        raise QueryError(
            STATUS_IDENTIFIER_DOES_NOT_MATCH,
            f"Query/Retrieve Level {chosen!r} not in the {model} root model",
            (_QUERY_RETRIEVE_LEVEL,),
        )
    return chosen


def _attribute_level(elem: DataElement, model: Model, level: Level) -> Level:
    attr = _ATTRS.get(elem.keyword)
    found = attr.level if attr is not None else _FILE_LEVELS.get(elem.keyword, level)
    if model == "study" and found == "PATIENT":
        return "STUDY"  # Study Root: patient attributes are study attributes (§C.6.2.1.2)
    return found


def _check_hierarchy(
    model: Model, level: Level, identifier: Dataset, keys: list[DataElement], relational: bool
) -> None:
    """No keys below the level; for baseline hierarchical search (PS3.4 §C.4.1.2.1), a
    single value for the unique key of every level above it, which relational
    queries (§C.4.1.2.2.1, §C.4.1.3.2) do not need."""
    rank = _RANK[level]
    for elem in keys:
        found = _attribute_level(elem, model, level)
        if _RANK[found] > rank:
            raise QueryError(
                STATUS_IDENTIFIER_DOES_NOT_MATCH,
                f"{_keyword(elem)} is a {found} key, below the {level} level",
                (elem.tag,),
            )
    if relational:
        return
    for above in _model_levels(model)[: rank - _RANK[_model_levels(model)[0]]]:
        keyword = _UNIQUE[above]
        tag = tag_for_keyword(keyword)
        assert tag is not None
        elem = identifier.get(tag)
        values = query_values(_ATTRS[keyword].vr, elem.value) if elem is not None else []
        if len(values) != 1 or "*" in values[0] or "?" in values[0]:
            raise QueryError(
                STATUS_IDENTIFIER_DOES_NOT_MATCH,
                f"{keyword} needs a single value at {level} level",
                (tag,),
            )


def _parse(vr: str, value: object, keyword: str, tag: int) -> ParsedQuery:
    try:
        return parse_query(vr, value, keyword)
    except MatchError as exc:
        raise QueryError(STATUS_UNABLE_TO_PROCESS, str(exc), (tag,)) from None


def _condition(keyword: str, attr: _Attr, value: object) -> tuple[str, tuple[str, ...]] | None:
    parsed = _parse(attr.vr, value, keyword, tag_for_keyword(keyword) or 0)
    if parsed.universal:
        return None
    if attr.exists is None:
        cond = sql_condition_of(attr.match_sql, parsed)
        return cond.sql, cond.params
    return _exists_condition(attr, parsed)


def _exists_condition(attr: _Attr, parsed: ParsedQuery) -> tuple[str, tuple[str, ...]]:
    """A condition on an attribute derived from the entities below (ModalitiesInStudy,
    ...): some of them match, or, for Empty Value Matching, none has a value."""
    assert attr.exists is not None
    parts: list[str] = []
    params: tuple[str, ...] = ()
    valued = parsed.without_empty()
    if valued is not None:
        cond = sql_condition_of(attr.match_sql, valued)
        parts.append(attr.exists.format(cond=cond.sql))
        params = cond.params
    if parsed.has_empty:
        parts.append(f"{attr.value_sql} IS NULL")
    return ("(" + " OR ".join(parts) + ")" if len(parts) > 1 else parts[0]), params


def _plan_pairs(plan: _FindPlan, keys: list[DataElement]) -> frozenset[int]:
    """Combined date-time matching (PS3.4 §C.2.2.2.5.4, `dicomnet.pacs.combined`) of
    the DA / TM key pairs that allow it: in SQL when both are indexed, else on each
    response. Returns the tags of the paired keys, which are not matched apart."""
    by_keyword = {elem.keyword: elem for elem in keys if elem.keyword}
    paired: set[int] = set()
    for date_keyword, time_keyword in date_time_pairs(by_keyword):
        date, time = by_keyword[date_keyword], by_keyword[time_keyword]
        if date.VR != "DA" or time.VR != "TM":
            continue
        span = combined_range(
            _parse("DA", date.value, date_keyword, int(date.tag)),
            _parse("TM", time.value, time_keyword, int(time.tag)),
        )
        if span is None:
            continue
        paired |= {int(date.tag), int(time.tag)}
        date_attr, time_attr = _ATTRS.get(date_keyword), _ATTRS.get(time_keyword)
        if date_attr is None or time_attr is None or date_attr.exists or time_attr.exists:
            plan.pairs.append((int(date.tag), int(time.tag), span))
            continue
        cond = combined_sql(span, date_attr.match_sql, time_attr.match_sql)
        plan.where.append(cond.sql)
        plan.params.extend(cond.params)
    return frozenset(paired)


def _plan_find(
    model: Model,
    level: Level | None,
    identifier: Dataset,
    relational: bool = False,
    combined_datetime: bool = False,
) -> _FindPlan:
    chosen = _check_level(model, level, identifier)
    elements = list(identifier)
    keys = [elem for elem in elements if _is_key(elem.tag)]
    _check_hierarchy(model, chosen, identifier, keys, relational)
    plan = _FindPlan(chosen, "", [])
    paired = _plan_pairs(plan, keys) if combined_datetime else frozenset()
    for elem in elements:
        _plan_element(plan, elem, int(elem.tag) in paired)
    if not any(output.source == "level" for output in plan.outputs):
        plan.outputs.append(_Output(_QUERY_RETRIEVE_LEVEL, "CS", "level"))
    path = _PATH[chosen] if plan.file_tags else "NULL"
    plan.sql = f"SELECT {', '.join([path, *plan.select])} FROM {_FROM[chosen]}"
    if plan.where:
        plan.sql += " WHERE " + " AND ".join(plan.where)
    return plan


def _plan_element(plan: _FindPlan, elem: DataElement, paired: bool) -> None:
    """Add one element of the identifier to `plan`; a `paired` key is returned but
    not matched on its own."""
    tag = int(elem.tag)
    if tag == _SPECIFIC_CHARACTER_SET:
        values = query_values("CS", elem.value) if elem.value else []
        plan.charset = values or None
    elif tag == _QUERY_RETRIEVE_LEVEL:
        plan.outputs.append(_Output(tag, "CS", "level"))
    elif tag == _INSTANCE_AVAILABILITY:
        plan.outputs.append(_Output(tag, "CS", "online"))
    elif tag in _ECHOED:
        plan.outputs.append(_Output(tag, elem.VR, "echo", key=elem))
    elif _is_key(tag):
        _plan_key(plan, elem, paired)


def _plan_key(plan: _FindPlan, elem: DataElement, paired: bool) -> None:
    tag = int(elem.tag)
    attr = _ATTRS.get(elem.keyword) if elem.keyword else None
    if attr is not None and elem.VR != "SQ":
        condition = None if paired else _condition(elem.keyword, attr, elem.value)
        if condition is not None:
            plan.where.append(condition[0])
            plan.params.extend(condition[1])
        plan.select.append(attr.value_sql)
        plan.outputs.append(_Output(tag, attr.vr, "column", index=len(plan.select)))
        return
    needs_filter = elem.VR == "SQ" or (
        not paired and not _parse(elem.VR, elem.value, _keyword(elem), tag).universal
    )
    plan.file_tags.append(tag)
    plan.outputs.append(_Output(tag, elem.VR, "file", key=elem, filter=needs_filter))


def _plan_retrieve(
    model: Model, level: Level | None, identifier: Dataset, select: str, relational: bool = False
) -> tuple[str, list[str]]:
    """The instances a C-MOVE / C-GET retrieves (PS3.4 §C.4.2.2.1, §C.4.3.2.1): the unique
    keys of the levels above the retrieve level each a single value (with relational
    retrieve, §C.4.2.3.2.1 / §C.4.3.3.2.1, they may be absent), the unique key of the
    retrieve level one value or a list of UIDs; other keys are ignored."""
    chosen = _check_level(model, level, identifier)
    where: list[str] = []
    params: list[str] = []
    for current in _model_levels(model):
        keyword = _UNIQUE[current]
        tag = tag_for_keyword(keyword)
        assert tag is not None
        elem = identifier.get(tag)
        attr = _ATTRS[keyword]
        values = query_values(attr.vr, elem.value) if elem is not None else []
        if not _retrieve_key(keyword, tag, values, current, chosen, relational):
            continue
        condition = _condition(keyword, attr, values)
        assert condition is not None
        where.append(condition[0])
        params.extend(condition[1])
    sql = f"SELECT {select} FROM {_FROM['IMAGE']} WHERE {' AND '.join(where)}"
    return sql, params


def _retrieve_key(
    keyword: str, tag: int, values: list[str], current: Level, chosen: Level, relational: bool
) -> bool:
    """Check the unique key of `current` in a retrieve at level `chosen`; whether it
    is matched."""
    if _RANK[current] > _RANK[chosen]:
        if values:
            raise QueryError(
                STATUS_IDENTIFIER_DOES_NOT_MATCH,
                f"{keyword} is below the {chosen} retrieve level",
                (tag,),
            )
        return False
    if not values:
        if relational and current != chosen:
            return False
        raise QueryError(
            STATUS_IDENTIFIER_DOES_NOT_MATCH,
            f"{keyword} is required to retrieve at {chosen} level",
            (tag,),
        )
    if any("*" in v or "?" in v for v in values) or (current != chosen and len(values) > 1):
        raise QueryError(
            STATUS_IDENTIFIER_DOES_NOT_MATCH,
            f"{keyword} must be {'UIDs' if current == chosen else 'one value'}, no wild cards",
            (tag,),
        )
    return True


# -- values ---------------------------------------------------------------------------------


def _text(
    dataset: Dataset, tag: int, vr: str, present: frozenset[BaseTag]
) -> tuple[str | None, str | None]:
    """(value, match key) of an attribute to store: None for an absent attribute,
    '' for an empty one; several values are joined with backslashes. `present` is
    the set of the data set's tags among those indexed."""
    elem = dataset[tag] if tag in present else None
    if elem is None:
        return None, None
    value = elem.value
    if value is None:
        return "", None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    texts = [normalize(vr, str(item)) for item in items]
    text = "\\".join(texts).rstrip("\\")
    return text, (match_key(vr, texts[0]) if texts else None)


_META_KEYWORDS = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
_META_TAGS = {
    0x00020002: _META_KEYWORDS[0],
    0x00020003: _META_KEYWORDS[1],
    0x00020010: _META_KEYWORDS[2],
}
_STORED_TAG_INTS = frozenset(int(tag) for tag in _STORED_TAG_SET)
# Bytes read from the start of a file to index it without pydicom; more is left to pydicom.
_QUICK_FIRST = 16 << 10
_QUICK_HEAD = 256 << 10


class _NeedsPydicom(Exception):
    """A value the quick path does not read exactly as pydicom would."""


def _read(fd: int, size: int) -> bytes:
    """Up to `size` bytes from `fd`: fewer only at the end of the file."""
    chunks = []
    while size > 0 and (chunk := os.read(fd, size)):
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _quick_values(path: str) -> tuple[dict[int, bytes], dict[str, str], int] | None:
    """The raw values of the indexed attributes, the file meta UIDs and the size of a
    Part-10 file, read from its first bytes without pydicom; None if pydicom must read it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        head = _read(fd, _QUICK_FIRST)
        quick = _quick_values_of(head, complete=len(head) < _QUICK_FIRST)
        if quick is None and len(head) == _QUICK_FIRST:  # a long header: read more of it
            head += _read(fd, _QUICK_HEAD - _QUICK_FIRST)
            quick = _quick_values_of(head, complete=len(head) < _QUICK_HEAD)
        if quick is None:
            return None
        # A short read reached the end: the file is what was read (no fstat needed).
        size = len(head) if len(head) < _QUICK_FIRST else os.fstat(fd).st_size
        return (*quick, size)
    finally:
        os.close(fd)


def _quick_values_of(head: bytes, complete: bool) -> tuple[dict[int, bytes], dict[str, str]] | None:
    found = part10_meta(head)
    if found is None:
        return None
    raw_meta, offset = found
    meta: dict[str, str] = {}
    for tag, keyword in _META_TAGS.items():
        try:
            meta[keyword] = normalize("UI", raw_meta.get(tag, b"").decode("ascii"))
        except UnicodeDecodeError:
            return None
    transfer_syntax = meta["TransferSyntaxUID"]
    if not transfer_syntax or transfer_syntax in UNSCANNED_TRANSFER_SYNTAXES:
        return None
    implicit = transfer_syntax == "1.2.840.10008.1.2"
    values = top_level_values(head, offset, implicit, _STORED_TAG_INTS, complete=complete)
    return None if values is None else (values, meta)


class _RawTexts:
    """`_text_of_raw` with its answers remembered: in a batch of stored instances the
    patient, study and series attributes come again and again."""

    LIMIT = 4096  # remembered answers; then it starts afresh

    def __init__(self) -> None:
        self._known: dict[tuple[bytes, str], tuple[str | None, str | None]] = {}

    def text(self, values: dict[int, bytes], tag: int, vr: str) -> tuple[str | None, str | None]:
        raw = values.get(tag)
        if raw is None:
            return None, None
        known = self._known.get((raw, vr))
        if known is None:
            if len(self._known) >= self.LIMIT:
                self._known = {}
            known = self._known[raw, vr] = _text_of_raw(raw, vr)
        return known


def _text_of_raw(raw: bytes, vr: str) -> tuple[str | None, str | None]:
    """What `_text` gives for an attribute read by pydicom, from its raw value; raises
    `_NeedsPydicom` for what only pydicom reads right (other character sets, odd IS)."""
    try:
        value = raw.decode("ascii")
    except UnicodeDecodeError:
        raise _NeedsPydicom from None
    items = value.rstrip(" \x00").split("\\")
    if any(item.startswith(" ") for item in items):
        raise _NeedsPydicom  # pydicom's own stripping differs from VR to VR
    if vr == "IS":
        if items == [""]:
            return "", None  # pydicom reads an empty IS as None
        if not all(item.rstrip().isdigit() and item.rstrip() == str(int(item)) for item in items):
            raise _NeedsPydicom  # only plain digits: pydicom has its own view of the rest
    texts = [normalize(vr, item) for item in items]
    text = "\\".join(texts).rstrip("\\")
    return text, match_key(vr, texts[0])


def _from_text(vr: str, text: str | None) -> object:
    if text is None or text == "":
        return None
    if "\\" in text and vr not in ("LT", "ST", "UT", "UR"):
        return text.split("\\")
    return text


def _pairs_match(pairs: list[tuple[int, int, CombinedRange]], response: Dataset) -> bool:
    """Whether each combined date-time range holds the response's date and time."""
    for date_tag, time_tag, span in pairs:
        date, time = response.get(date_tag), response.get(time_tag)
        date_value = None if date is None else date.value
        time_value = None if time is None else time.value
        if not combined_matches(span, date_value, time_value):
            return False
    return True


def _has_non_ascii(dataset: Dataset) -> bool:
    for elem in dataset.iterall():
        if elem.VR not in _TEXT_VRS or elem.value is None:
            continue
        values = elem.value if isinstance(elem.value, (MultiValue, list)) else [elem.value]
        for value in values:
            if isinstance(value, (str, PersonName)) and not str(value).isascii():
                return True
    return False


def _encodable(dataset: Dataset, charset: list[str]) -> bool:
    """True if every text value of `dataset` can be written in the single-byte,
    non-ISO 2022 character set `charset`."""
    if len(charset) != 1 or charset[0].startswith("ISO 2022") or charset[0] not in python_encoding:
        return False
    codec = python_encoding[charset[0]]
    for elem in dataset.iterall():
        if elem.VR not in _TEXT_VRS or elem.value is None:
            continue
        values = elem.value if isinstance(elem.value, (MultiValue, list)) else [elem.value]
        for value in values:
            try:
                str(value).encode(codec)
            except (UnicodeEncodeError, LookupError):
                return False
    return True


RECONCILE_BATCH = 1024  # files indexed per transaction by `Index.reconcile`


def _walk(folder: Path) -> Iterator[Path]:
    """``*.dcm`` files under `folder`, skipping hidden folders and files (``.tmp``)."""
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.lower().endswith(".dcm") and not name.startswith("."):
                yield Path(current, name)


@dataclass(frozen=True, slots=True)
class _Record:
    """The rows `add` writes for one instance (table name -> values, in upsert order)."""

    rows: dict[str, list[str | int | None]]
    sop_instance_uid: str


# -- the index ---------------------------------------------------------------------------------


class Index:
    """The SQLite index of a storage folder (see the module docstring).

    `path` is the database file (conventionally ``<storage>/.dicomnet-index.sqlite``,
    `INDEX_FILE_NAME`); `root`, the folder instance paths are stored relative to,
    defaults to the database's folder. `timeout` is how long a writer waits for
    another process's write transaction (seconds). `created` is True when this
    opening created the schema (a new database, or one of another schema version
    that was dropped): the caller should `rebuild` it from the files."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        root: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent
        self.timeout = timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        root_abs = os.path.abspath(self.root)
        self._root_prefix = root_abs if root_abs.endswith(os.sep) else root_abs + os.sep
        self._raw_texts = _RawTexts()
        # Per parent table, the raw values of the last instance read and the row made of
        # them: the instances of a series come in a row and share the patient, study
        # and series attributes.
        self._parent_rows: dict[str, tuple[tuple[bytes | None, ...], list[str | int | None]]] = {}
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path, timeout=timeout, check_same_thread=False, isolation_level=None
        )
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self.created = False
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {
                row[0]
                for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if version != SCHEMA_VERSION or not tables:
                if tables:
                    log.warning(
                        "index %s has schema version %d, not %d: recreating it",
                        self.path,
                        version,
                        SCHEMA_VERSION,
                    )
                for name in reversed([t.name for t in _TABLES]):
                    conn.execute(f"DROP TABLE IF EXISTS {name}")
                for statement in _schema():
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self.created = True

    # -- lifetime --

    def close(self) -> None:
        """Close the write connection (running query iterators keep their own)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

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
        return f"Index({str(self.path)!r})"

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise RuntimeError("the index is closed")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _read_connection(self) -> sqlite3.Connection:
        """A connection for one query iterator (never creates the database file)."""
        if self._conn is None:
            raise RuntimeError("the index is closed")
        conn = sqlite3.connect(
            f"{Path(os.path.abspath(self.path)).as_uri()}?mode=rw",
            uri=True,
            timeout=self.timeout,
            check_same_thread=False,
            isolation_level=None,
        )
        conn.execute("PRAGMA query_only = ON")
        return conn

    # -- counts --

    def __len__(self) -> int:
        """The number of indexed instances."""
        return self.counts().instances

    def counts(self) -> IndexCounts:
        with self._lock:
            if self._conn is None:
                raise RuntimeError("the index is closed")
            row = self._conn.execute(
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
        record = self._record(os.fspath(path), dataset)
        with self._write() as conn:
            self._store(conn, record, {})

    def add_many(
        self,
        items: Iterable[str | os.PathLike[str] | tuple[str | os.PathLike[str], Dataset | None]],
    ) -> int:
        """`add` each of `items` (paths, or (path, dataset) pairs) in one transaction;
        files that cannot be indexed are logged and skipped. Returns how many were."""
        with self._write() as conn:
            return self._store_all(conn, items)

    def _store_all(
        self,
        conn: sqlite3.Connection,
        items: Iterable[str | os.PathLike[str] | tuple[str | os.PathLike[str], Dataset | None]],
    ) -> int:
        count = 0
        cache: dict[str, tuple[object, int]] = {}
        for item in items:
            path, dataset = item if isinstance(item, tuple) else (item, None)
            try:
                record = self._record(os.fspath(path), dataset)
            except Exception as exc:  # a damaged file must not stop a rebuild
                log.warning("not indexed: %s: %s", path, exc)
                continue
            self._store(conn, record, cache)
            count += 1
        return count

    def remove(self, sop_instance_uid: str) -> bool:
        """Forget an instance (its file is not touched); series, studies and patients
        left empty go too. Returns whether it was indexed."""
        with self._write() as conn:
            row = conn.execute(
                "SELECT i.pk, i.series_pk, se.study_pk, st.patient_pk FROM instance AS i"
                " JOIN series AS se ON se.pk = i.series_pk JOIN study AS st ON st.pk = se.study_pk"
                " WHERE i.sop_instance_uid = ?",
                (normalize("UI", sop_instance_uid),),
            ).fetchone()
            if row is None:
                return False
            conn.execute("DELETE FROM instance WHERE pk = ?", (row[0],))
            self._prune(conn, {row[1]}, {row[2]}, {row[3]})
            return True

    def rebuild(self, storage_folder: str | os.PathLike[str] | None = None) -> int:
        """Empty the index and add every ``*.dcm`` file under `storage_folder` (default:
        `root`), skipping hidden folders such as ``.tmp``, in one transaction (queries
        meanwhile see the old index). Returns the number of instances indexed."""
        folder = Path(storage_folder) if storage_folder is not None else self.root
        with self._write() as conn:
            for table in reversed(_TABLES):
                conn.execute(f"DELETE FROM {table.name}")
            return self._store_all(conn, _walk(folder))

    def reconcile(self, storage_folder: str | os.PathLike[str] | None = None) -> int:
        """Index the ``*.dcm`` files under `storage_folder` (default: `root`) that the
        index lacks, or holds with another size (replaced since), in transactions of
        `RECONCILE_BATCH`: what a crash left stored but not indexed. Returns how many
        were indexed."""
        folder = Path(storage_folder) if storage_folder is not None else self.root
        conn = self._read_connection()
        try:
            known = dict(conn.execute("SELECT path, size FROM instance").fetchall())
        finally:
            conn.close()
        missing: list[str] = []
        for path in _walk(folder):
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
        return count

    def _record(self, path: str, dataset: Dataset | None) -> _Record:
        if dataset is None:
            quick = _quick_values(path)
            if quick is not None:
                values, meta, size = quick
                # A partial, not a lambda: no Python frame per attribute.
                text_of = functools.partial(self._raw_texts.text, values)
                try:
                    return self._build_record(path, size, text_of, meta.get, values)
                except _NeedsPydicom:
                    pass
            dataset = dcmread(path, stop_before_pixels=True, specific_tags=_INDEXED_TAGS)
        file_meta = getattr(dataset, "file_meta", None)
        if file_meta is None or "TransferSyntaxUID" not in file_meta:
            file_meta = read_file_meta_info(path)
        present = _STORED_TAG_SET.intersection(dataset.keys())
        meta = {
            keyword: normalize("UI", str(file_meta.get(keyword, ""))) for keyword in _META_KEYWORDS
        }
        return self._build_record(
            path,
            os.stat(path).st_size,
            lambda tag, vr: _text(dataset, tag, vr, present),
            meta.get,
        )

    def _build_record(
        self,
        path: str,
        size: int,
        text_of: Callable[[int, str], tuple[str | None, str | None]],
        meta: Callable[[str], str | None],
        raw_values: dict[int, bytes] | None = None,
    ) -> _Record:
        """The rows of one instance; `raw_values` (the raw values `text_of` reads) lets a
        patient, study or series row read from the same bytes before be reused."""
        rows: dict[str, list[str | int | None]] = {}
        for table, tags, plan in _RECORD_PLAN:
            raw: tuple[bytes | None, ...] | None = None
            if raw_values is not None and table != "instance":
                raw = tuple(map(raw_values.get, tags))
                last = self._parent_rows.get(table)
                if last is not None and last[0] == raw:
                    rows[table] = last[1]
                    continue
            values: list[str | int | None] = []
            for tag, vr, keyword, role, keyed in plan:
                text, key = text_of(tag, vr)
                if role == _UNIQUE_KEY:
                    if not text and keyword == "SOPInstanceUID":
                        text = meta("MediaStorageSOPInstanceUID") or ""
                    if not text and keyword != "PatientID":
                        raise ValueError(f"{keyword} is missing")
                    values.append(text or "")
                    continue
                if role == _SOP_CLASS and not text:
                    text = meta("MediaStorageSOPClassUID") or None
                    key = text
                values.append(text)
                if keyed:
                    values.append(key)
            rows[table] = values
            if raw is not None:
                self._parent_rows[table] = (raw, values)
        transfer_syntax = meta("TransferSyntaxUID")
        rows["instance"] += [self._relative(path), transfer_syntax or None, size]
        return _Record(rows, cast(str, rows["instance"][0]))

    def _store(
        self, conn: sqlite3.Connection, record: _Record, cache: dict[str, tuple[object, int]]
    ) -> None:
        """Upsert one instance and its parents, then prune what it left empty.

        `cache` (per transaction) remembers the last patient / study / series row
        written: an instance whose parents are the same as the previous one's skips
        their upserts (a rebuild walks folders series by series). The instance row is
        inserted first; only an instance indexed before (a conflict) is looked up, to
        prune the series, study and patient it may have left. An instance without
        Patient ID goes to the patient of its study (`_patient_without_id`)."""
        old_series: set[int] = set()
        old_studies: set[int] = set()
        old_patients: set[int] = set()
        parent: int | None = None
        study_uid = cast(str, record.rows["study"][0])
        for table in _PARENT_TABLES:
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
            if table.name == "study":  # the study may move to another patient
                for (old,) in conn.execute(
                    "SELECT patient_pk FROM study WHERE study_instance_uid = ?", (values[0],)
                ):
                    old_patients.add(old)
            elif table.name == "series":  # the series may move to another study
                for old_study, old_patient in conn.execute(
                    "SELECT se.study_pk, st.patient_pk FROM series AS se"
                    " JOIN study AS st ON st.pk = se.study_pk WHERE se.series_instance_uid = ?",
                    (values[0],),
                ):
                    old_studies.add(old_study)
                    old_patients.add(old_patient)
            sql, _ = _UPSERTS[table.name]
            params = [parent, *values] if table.parent else values
            parent = conn.execute(sql, params).fetchone()[0]
            cache[table.name] = (key, cast(int, parent))
        instance = [parent, *record.rows["instance"]]
        if conn.execute(_INSERT_INSTANCE, instance).fetchone() is None:
            # Indexed before: it may leave its series (and their parents) empty.
            row = conn.execute(
                "SELECT i.series_pk, se.study_pk, st.patient_pk FROM instance AS i"
                " JOIN series AS se ON se.pk = i.series_pk"
                " JOIN study AS st ON st.pk = se.study_pk WHERE i.sop_instance_uid = ?",
                (record.sop_instance_uid,),
            ).fetchone()
            if row is not None:
                old_series.add(row[0])
                old_studies.add(row[1])
                old_patients.add(row[2])
            conn.execute(_UPSERTS["instance"][0], instance)
        if self._prune(conn, old_series, old_studies, old_patients):
            cache.clear()  # a remembered row may be gone

    @staticmethod
    def _patient_without_id(
        conn: sqlite3.Connection, values: list[str | int | None], study_uid: str
    ) -> int:
        """The patient of an instance without Patient ID: the patient of its study if
        that is indexed (updated with the instance's values unless it has an ID, of
        which the instance says nothing), else a new patient of its own."""
        row = conn.execute(_STUDY_PATIENT, (study_uid,)).fetchone()
        if row is not None and row[1]:
            return int(row[0])
        pk = None if row is None else row[0]
        return int(conn.execute(_UPSERT_PATIENT_BY_PK, [pk, *values]).fetchone()[0])

    @staticmethod
    def _prune(
        conn: sqlite3.Connection, series: set[int], studies: set[int], patients: set[int]
    ) -> int:
        """Delete the given entities that no longer have children, bottom up; returns
        how many rows went."""
        deleted = 0
        for table, child, parent_column, pks in (
            ("series", "instance", "series_pk", series),
            ("study", "series", "study_pk", studies),
            ("patient", "study", "patient_pk", patients),
        ):
            for pk in pks:
                deleted += conn.execute(
                    f"DELETE FROM {table} WHERE pk = ?"
                    f" AND NOT EXISTS (SELECT 1 FROM {child} WHERE {parent_column} = ?)",
                    (pk, pk),
                ).rowcount
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
        plan = _plan_find(model, level, identifier, relational, combined_datetime)
        if self._conn is None:
            raise RuntimeError("the index is closed")
        return self._run_find(plan)

    def _run_find(self, plan: _FindPlan) -> Iterator[Dataset]:
        conn = self._read_connection()
        try:
            cursor = conn.execute(plan.sql, plan.params)
            for row in cursor:
                response = self._response(plan, row)
                if response is not None:
                    yield response
        finally:
            conn.close()

    def _read_file(self, stored: str | None, tags: list[int]) -> Dataset | None:
        if stored is None:
            return None
        path = self._absolute(stored)
        try:
            return dcmread(
                path, stop_before_pixels=True, specific_tags=[_SPECIFIC_CHARACTER_SET, *tags]
            )
        except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
            log.warning("cannot read %s for a query: %s", path, exc)
            return None

    def _response(self, plan: _FindPlan, row: tuple[str | None, ...]) -> Dataset | None:
        source = self._read_file(row[0], plan.file_tags) if plan.file_tags else None
        out = Dataset()
        for output in plan.outputs:
            if output.source == "column":
                value = _from_text(output.vr, row[output.index])
                out.add(DataElement(output.tag, output.vr, value, validation_mode=_TRUSTED))
            elif output.source == "level":
                out.add(DataElement(output.tag, "CS", plan.level))
            elif output.source == "online":
                out.add(DataElement(output.tag, "CS", "ONLINE"))
            elif output.source == "echo":
                assert output.key is not None
                out.add(DataElement(output.tag, output.key.VR, output.key.value))
            else:
                elem = self._file_value(output, source)
                if elem is None:
                    return None
                out.add(elem)
        if not _pairs_match(plan.pairs, out):
            return None
        if _has_non_ascii(out):
            if plan.charset is not None and _encodable(out, plan.charset):
                out.SpecificCharacterSet = plan.charset[0]
            else:
                out.SpecificCharacterSet = "ISO_IR 192"
        elif plan.charset is not None:
            out.SpecificCharacterSet = plan.charset if len(plan.charset) > 1 else plan.charset[0]
        return out

    @staticmethod
    def _file_value(output: _Output, source: Dataset | None) -> DataElement | None:
        """The response element of a key read from the file, or None if it does not match."""
        key = output.key
        assert key is not None
        found = source.get(output.tag) if source is not None else None
        if key.VR == "SQ":
            candidate = found.value if found is not None and found.VR == "SQ" else None
            items = match_sequence(key.value, candidate)
            if items is None:
                return None
            return DataElement(output.tag, "SQ", DicomSequence(items))
        value = None if found is None else found.value
        if output.filter and not matches(key.value, key.VR, value):
            return None
        if found is None:
            return DataElement(output.tag, key.VR, None)
        return DataElement(output.tag, found.VR, value)

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
        sql, params = _plan_retrieve(
            model,
            level,
            identifier,
            "i.path, i.sop_class_uid, i.sop_instance_uid, i.transfer_syntax",
            relational,
        )
        if self._conn is None:
            raise RuntimeError("the index is closed")
        return self._run_files(sql, params)

    def count_files(
        self, model: Model, level: Level | None, identifier: Dataset, *, relational: bool = False
    ) -> int:
        """How many instances `files` would yield (for the C-MOVE / C-GET counts)."""
        sql, params = _plan_retrieve(model, level, identifier, "COUNT(*)", relational)
        conn = self._read_connection()
        try:
            return int(conn.execute(sql, params).fetchone()[0])
        finally:
            conn.close()

    def _run_files(self, sql: str, params: list[str]) -> Iterator[tuple[Path, str, str, str]]:
        conn = self._read_connection()
        try:
            for path, sop_class, sop_instance, transfer_syntax in conn.execute(sql, params):
                yield self._absolute(path), sop_class or "", sop_instance, transfer_syntax or ""
        finally:
            conn.close()
