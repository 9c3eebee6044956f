"""What the Query/Retrieve index holds and how each key reads in SQL: its tables, their
columns and indexes, the upserts that keep them, the query attributes (stored, or derived at
query time), and the levels of the keys it does not hold. See `dicomnet.pacs.index`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydicom import config
from pydicom.datadict import tag_for_keyword
from pydicom.tag import BaseTag, Tag

from dicomnet.pacs.matching import (
    KEYED_VRS,
    POSTGRESQL,
    SQLITE,
    SqlDialect,
)

__all__ = [
    "ATTRIBUTES",
    "ECHOED",
    "FILE_LEVELS",
    "FILE_OF_LEVEL",
    "FROM_LEVEL",
    "INDEXED_TAGS",
    "INSTANCE_AVAILABILITY",
    "LEVELS",
    "MIGRATIONS",
    "PARENT_TABLES",
    "PLAIN",
    "QUERY_RETRIEVE_LEVEL",
    "RANK",
    "RECORD_PLAN",
    "SOP_CLASS",
    "SPECIFIC_CHARACTER_SET",
    "STORED_TAG_SET",
    "TABLES",
    "TEXT_VRS",
    "TRUSTED",
    "UNIQUE_KEY",
    "UNIQUE_KEYS",
    "Level",
    "Model",
    "QueryAttribute",
    "Statements",
    "attributes",
    "migration_statements",
    "schema_statements",
    "statements",
]

Model = Literal["patient", "study"]
Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
LEVELS: tuple[Level, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")
RANK: dict[str, int] = {level: rank for rank, level in enumerate(LEVELS)}

SPECIFIC_CHARACTER_SET = 0x00080005
QUERY_RETRIEVE_LEVEL = 0x00080052
_QUERY_RETRIEVE_VIEW = 0x00080053
_RETRIEVE_AE_TITLE = 0x00080054
INSTANCE_AVAILABILITY = 0x00080056
_TIMEZONE_OFFSET = 0x00080201
#: Returned as sent (the SCP fills Retrieve AE Title in if it wants to).
ECHOED = frozenset({_QUERY_RETRIEVE_VIEW, _RETRIEVE_AE_TITLE, _TIMEZONE_OFFSET})

UNIQUE_KEYS: dict[str, str] = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


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


TABLES: tuple[_Table, ...] = (
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
_TABLE = {table.name: table for table in TABLES}


def _column_types(dialect: SqlDialect) -> tuple[str, str, str]:
    """(primary key column, foreign key type, text type): text compares in code point
    order in both databases (PostgreSQL's ``COLLATE "C"``; SQLite's default)."""
    if dialect.name == "postgresql":
        return (
            "pk BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
            "BIGINT",
            'TEXT COLLATE "C"',
        )
    return "pk INTEGER PRIMARY KEY", "INTEGER", "TEXT"


#: How an index of version v becomes one of version v + 1: v -> the statements (per
#: dialect) that change it, run in one transaction with the new version number by the
#: first node that opens it (rows kept). A change of schema adds a step here along with
#: the new version; an index older than the oldest step is recreated empty (and rebuilt
#: from the files). None so far: version 2 is the first schema in either database.
MIGRATIONS: dict[int, Callable[[SqlDialect], list[str]]] = {}


def migration_statements(found: int, version: int, dialect: SqlDialect) -> list[str] | None:
    """The statements that take an index of version `found` to `version`, in order;
    None when there is no way there (an older version than any step, or a newer one)."""
    if found > version:
        return None
    statements: list[str] = []
    for step in range(found, version):
        migrate = MIGRATIONS.get(step)
        if migrate is None:
            return None
        statements += migrate(dialect)
    return statements


def schema_statements(dialect: SqlDialect = SQLITE) -> list[str]:
    """The statements that create the index's tables and indexes."""
    primary_key, reference, text = _column_types(dialect)
    statements: list[str] = []
    for table in TABLES:
        columns = [primary_key]
        if table.parent is not None:
            columns.append(
                f"{table.parent} {reference} NOT NULL REFERENCES {table.parent_table}(pk)"
                " ON DELETE CASCADE"
            )
        for attr in table.attributes:
            if attr is table.unique:
                unique = "" if table.unique_where else " UNIQUE"
                columns.append(f"{attr.column} {text} NOT NULL{unique}")
            else:
                columns.extend(f"{column} {text}" for column in attr.columns)
        if table.name == "instance":
            columns += [f"path {text} NOT NULL", f"transfer_syntax {text}", f"size {reference}"]
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


def _upsert_sql(
    table: _Table, p: str, by_pk: bool = False, same_parent: bool = False
) -> tuple[str, list[str]]:
    """INSERT ... ON CONFLICT(unique) DO UPDATE ... RETURNING pk, and its column order;
    `by_pk`: the first column is the row's pk (NULL for a new row), the conflict on it;
    `same_parent`: a row indexed under another parent is left alone (and no pk is
    returned: a move, for the caller to see). `p` is the placeholder.

    A NULL (attribute absent from the new instance) keeps the indexed value."""
    columns: list[str] = ["pk"] if by_pk else []
    columns += [table.parent] if table.parent else []
    updates: list[str] = [f"{table.parent} = excluded.{table.parent}"] if table.parent else []
    for attr in table.attributes:
        columns.extend(attr.columns)
        if attr is table.unique:
            continue
        # The indexed value qualified by its table: PostgreSQL finds a bare name ambiguous.
        kept, kept_key = f"{table.name}.{attr.column}", f"{table.name}.{attr.key_column}"
        updates.append(f"{attr.column} = COALESCE(excluded.{attr.column}, {kept})")
        if attr.key_column != attr.column:
            updates.append(
                f"{attr.key_column} = CASE WHEN excluded.{attr.column} IS NULL"
                f" THEN {kept_key} ELSE excluded.{attr.key_column} END"
            )
    if table.name == "instance":
        columns += ["path", "transfer_syntax", "size"]
        updates += [f"{c} = excluded.{c}" for c in ("path", "transfer_syntax", "size")]
    conflict = f"({table.unique.column})"
    if by_pk:
        conflict = "(pk)"
    elif table.unique_where:
        conflict += f" WHERE {table.unique_where}"
    values = [p] * len(columns)
    if by_pk and p != "?":  # SQLite gives a NULL INTEGER PRIMARY KEY a new value itself
        values[0] = f"COALESCE({p}::bigint, nextval(pg_get_serial_sequence('{table.name}', 'pk')))"
    sql = (
        f"INSERT INTO {table.name} ({', '.join(columns)})"
        f" VALUES ({', '.join(values)})"
        f" ON CONFLICT{conflict} DO UPDATE SET {', '.join(updates)}"
        + (f" WHERE {table.name}.{table.parent} = excluded.{table.parent}" if same_parent else "")
        + " RETURNING pk"
    )
    return sql, columns


_INSTANCE_PARENTS = (
    "SELECT i.pk, i.series_pk, se.study_pk, st.patient_pk FROM instance AS i"
    " JOIN series AS se ON se.pk = i.series_pk JOIN study AS st ON st.pk = se.study_pk"
    " WHERE i.sop_instance_uid = {p}"
)
# The parents of a series or study, and the children a parent must have left to be pruned.
_PARENT_OF = {
    "study": "SELECT patient_pk FROM study WHERE study_instance_uid = {p}",
    "series": "SELECT se.study_pk, st.patient_pk FROM series AS se"
    " JOIN study AS st ON st.pk = se.study_pk WHERE se.series_instance_uid = {p}",
}
_CHILDREN = (
    ("series", "instance", "series_pk"),
    ("study", "series", "study_pk"),
    ("patient", "study", "patient_pk"),
)


@dataclass(frozen=True, slots=True)
class Statements:
    """The statements that write the index, in one database's dialect."""

    #: Per table, the upsert by its unique key and its column order.
    upserts: dict[str, tuple[str, list[str]]]
    #: "study" / "series": the upsert that leaves a row of another parent alone.
    upserts_in_place: dict[str, str]
    #: A patient without Patient ID: a row of its own, found through its study.
    upsert_patient_by_pk: str
    study_patient: str
    #: A new instance (the usual case) is one INSERT; a conflict leaves the row as it was.
    insert_instance: str
    #: An instance's pk and its series', study's and patient's, by SOP Instance UID.
    instance_parents: str
    delete_instance: str
    #: "study" / "series": the parent keys of the row of that unique key (locked to the
    #: end of the transaction, where the database can).
    parent_of: dict[str, str]
    #: Bottom up (series, study, patient): delete the row (pk, pk) if no child is left.
    prune: tuple[str, ...]
    #: Bottom up: delete every row without a child (what a node stopped between an
    #: addition and its prune may have left).
    prune_all: tuple[str, ...]


@functools.cache
def statements(dialect: SqlDialect = SQLITE) -> Statements:
    p = dialect.placeholder
    upserts = {table.name: _upsert_sql(table, p) for table in TABLES}
    instance_columns = upserts["instance"][1]
    lock = " FOR UPDATE OF " if dialect is POSTGRESQL else ""
    return Statements(
        upserts,
        {name: _upsert_sql(_TABLE[name], p, same_parent=True)[0] for name in ("study", "series")},
        _upsert_sql(_TABLE["patient"], p, by_pk=True)[0],
        "SELECT p.pk, p.patient_id FROM study AS st JOIN patient AS p"
        f" ON p.pk = st.patient_pk WHERE st.study_instance_uid = {p}",
        f"INSERT INTO instance ({', '.join(instance_columns)})"
        f" VALUES ({', '.join([p] * len(instance_columns))})"
        f" ON CONFLICT({_TABLE['instance'].unique.column}) DO NOTHING RETURNING pk",
        _INSTANCE_PARENTS.format(p=p),
        f"DELETE FROM instance WHERE pk = {p}",
        {
            table: sql.format(p=p) + (f"{lock}{alias}" if lock else "")
            for (table, sql), alias in zip(_PARENT_OF.items(), ("study", "se"), strict=True)
        },
        tuple(
            f"DELETE FROM {table} WHERE pk = {p}"
            f" AND NOT EXISTS (SELECT 1 FROM {child} WHERE {column} = {p})"
            for table, child, column in _CHILDREN
        ),
        tuple(
            f"DELETE FROM {table} WHERE NOT EXISTS"
            f" (SELECT 1 FROM {child} WHERE {child}.{column} = {table}.pk)"
            for table, child, column in _CHILDREN
        ),
    )


PARENT_TABLES = tuple(table for table in TABLES if table.name != "instance")
_STORED_TAGS: dict[str, BaseTag] = {
    attr.keyword: Tag(attr.keyword) for table in TABLES for attr in table.attributes
}
STORED_TAG_SET = frozenset(_STORED_TAGS.values())

# What `Index._build_record` reads, table by table in upsert column order: the table's
# name, its tags, and for each attribute (tag, VR, keyword, role, whether a match key
# column follows).
PLAIN, UNIQUE_KEY, SOP_CLASS = 0, 1, 2
RECORD_PLAN: tuple[
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
                UNIQUE_KEY
                if attr is table.unique
                else SOP_CLASS
                if attr.keyword == "SOPClassUID"
                else PLAIN,
                attr.key_column != attr.column,
            )
            for attr in table.attributes
        ),
    )
    for table in TABLES
)

# -- query attributes -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueryAttribute:
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


def _count(level: Level, source: str) -> QueryAttribute:
    sql = f"CAST((SELECT COUNT(*) {source}) AS TEXT)"
    return QueryAttribute(level, "IS", sql, sql)


def _joined(column: str, source: str, dialect: SqlDialect) -> str:
    """The distinct values of `column` in `source`, sorted, joined with backslashes."""
    if dialect.name == "postgresql":
        distinct = f"(SELECT DISTINCT {column} AS v {source}) AS _d"
        return f"(SELECT string_agg(v, '\\' ORDER BY v) FROM {distinct})"
    return (
        f"(SELECT group_concat(v, '\\') FROM (SELECT DISTINCT {column} AS v {source} ORDER BY v))"
    )


@functools.cache
def attributes(dialect: SqlDialect = SQLITE) -> dict[str, QueryAttribute]:
    """The attributes a query can match and return in SQL, in `dialect`."""
    attrs: dict[str, QueryAttribute] = {}
    for table in TABLES:
        for stored in table.attributes:
            attrs[stored.keyword] = QueryAttribute(
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
        ModalitiesInStudy=QueryAttribute(
            "STUDY",
            "CS",
            _joined(
                "c2.modality",
                f"{_ST_SERIES} AND c2.modality IS NOT NULL AND c2.modality != ''",
                dialect,
            ),
            "c2.modality",
            f"EXISTS (SELECT 1 {_ST_SERIES} AND {{cond}})",
        ),
        SOPClassesInStudy=QueryAttribute(
            "STUDY",
            "UI",
            _joined("c3.sop_class_uid", _ST_INSTANCES, dialect),
            "c3.sop_class_uid",
            f"EXISTS (SELECT 1 {_ST_INSTANCES} AND {{cond}})",
        ),
        AvailableTransferSyntaxUID=QueryAttribute(
            "IMAGE", "UI", "i.transfer_syntax", "i.transfer_syntax"
        ),
    )
    return attrs


ATTRIBUTES = attributes()

#: Keys the index does not hold whose level is known (PS3.4 Tables C.6-1 to C.6-4 and
#: the modules of each information entity); any other key is taken to belong to the
#: query level. Values come from the stored files.
FILE_LEVELS: dict[str, Level] = {
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

FROM_LEVEL: dict[str, str] = {
    "PATIENT": "patient AS p",
    "STUDY": "study AS st JOIN patient AS p ON p.pk = st.patient_pk",
    "SERIES": "series AS se JOIN study AS st ON st.pk = se.study_pk"
    " JOIN patient AS p ON p.pk = st.patient_pk",
    "IMAGE": "instance AS i JOIN series AS se ON se.pk = i.series_pk"
    " JOIN study AS st ON st.pk = se.study_pk JOIN patient AS p ON p.pk = st.patient_pk",
}
#: A stored file of the entity a row stands for (read only for keys not indexed).
FILE_OF_LEVEL: dict[str, str] = {
    "PATIENT": f"(SELECT c3.path {_P_INSTANCES} LIMIT 1)",
    "STUDY": f"(SELECT c3.path {_ST_INSTANCES} LIMIT 1)",
    "SERIES": f"(SELECT c3.path {_SE_INSTANCES} LIMIT 1)",
    "IMAGE": "i.path",
}

#: The attributes `add` reads from a file (when it is not given the data set).
INDEXED_TAGS: list[int] = sorted(
    {SPECIFIC_CHARACTER_SET}
    | {tag for t in TABLES for a in t.attributes if (tag := tag_for_keyword(a.keyword))}
)

#: Values from the index were valid when stored: no validation when they are returned.
TRUSTED = config.IGNORE

TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
