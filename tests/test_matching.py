"""Attribute matching (PS3.4 §C.2.2.2): every kind, in Python, in SQLite and in PostgreSQL,
agreeing."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from datetime import date, datetime, time
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from dicomnet.pacs.matching import (
    POSTGRESQL,
    SQLITE,
    MatchError,
    MatchKind,
    SqlDialect,
    candidate_keys,
    json_keys,
    match_key,
    match_sequence,
    matches,
    normalize,
    parse_query,
    sql_condition,
)


class Table:
    """A one-row table `t (k, mv)` in SQLite or PostgreSQL, and its SQL dialect."""

    def __init__(self, dialect: SqlDialect, conn: Any) -> None:
        self.dialect = dialect
        self.conn = conn
        p = dialect.placeholder
        self._insert = f"INSERT INTO t VALUES ({p}, {p})"

    def hold(self, key: str | None, keys: str | None) -> None:
        self.conn.execute("DELETE FROM t")
        self.conn.execute(self._insert, (key, keys))

    def count(self, where: str, params: Sequence[str]) -> int:
        row = self.conn.execute(f"SELECT COUNT(*) FROM t WHERE {where}", tuple(params)).fetchone()
        return int(row[0])


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest) -> Iterator[Table]:
    if request.param == "sqlite":
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE TABLE t (k TEXT, mv TEXT)")
        yield Table(SQLITE, conn)
        conn.close()
        return
    import psycopg

    server = request.getfixturevalue("postgresql_server")
    with psycopg.connect(server.dsn, autocommit=True) as pg:
        pg.execute('CREATE TEMPORARY TABLE t (k TEXT COLLATE "C", mv TEXT)')
        yield Table(POSTGRESQL, pg)


def sql_matches(db: Table, query: object, vr: str, candidate: object) -> bool:
    """Match through `sql_condition` on a one-row table holding the candidate's key."""
    keys = candidate_keys(vr, candidate)
    db.hold(keys[0] if keys else None, None)
    cond = sql_condition("k", vr, query, dialect=db.dialect)
    if cond is None:
        return db.count("TRUE", ()) == 1
    return db.count(cond.sql, cond.params) == 1


def sql_matches_multi(db: Table, query: object, vr: str, candidate: object) -> bool:
    db.hold(None, json_keys(vr, candidate))
    cond = sql_condition("mv", vr, query, multi_valued=True, dialect=db.dialect)
    if cond is None:
        return True
    return db.count(cond.sql, cond.params) == 1


CASES: list[tuple[object, str, object, bool]] = [
    # Single Value Matching (C.2.2.2.1): case-sensitive, padding insignificant
    ("CT", "CS", "CT", True),
    ("CT", "CS", "ct", False),
    ("CT ", "CS", " CT", True),
    ("Abc", "LO", "Abc  ", True),
    ("abc", "LO", "Abc", False),
    ("Abc", "LO", "Abcd", False),
    ("1.2.3", "UI", "1.2.3\x00", True),
    ("1.2.3", "UI", "1.2.30", False),
    ("CT", "CS", "", False),
    ("CT", "CS", None, False),
    ("7", "IS", "007", True),
    ("7", "IS", " 7 ", True),
    ("7", "IS", "70", False),
    ("1.5", "DS", "1.50", True),
    ("1.5", "DS", "15", False),
    # PN: case-insensitive, trailing empty components insignificant
    ("doe^john", "PN", "DOE^JOHN", True),
    ("Doe^John^^", "PN", "Doe^John", True),
    ("Doe^John", "PN", PersonName("Doe^John"), True),
    ("Doe^John", "PN", "Doe^Johnny", False),
    ("Müller", "PN", "MÜLLER", True),
    # Universal Matching (C.2.2.2.3)
    ("", "LO", None, True),
    ("", "LO", "anything", True),
    (None, "DA", "garbage", True),
    ("*", "LO", None, True),
    ("**", "PN", "", True),
    ("*", "UI", "1.2.3", True),
    ("", "UI", None, True),
    # Wild Card Matching (C.2.2.2.4)
    ("A*", "LO", "ABC", True),
    ("A*", "LO", "A", True),
    ("A*", "LO", "BA", False),
    ("A*", "LO", None, False),
    ("*B*", "LO", "ABC", True),
    ("A?C", "SH", "ABC", True),
    ("A?C", "SH", "AC", False),
    ("A?C", "SH", "ABBC", False),
    ("?", "CS", "", False),
    ("?", "CS", "X", True),
    ("C*", "CS", "CT", True),
    ("a*", "SH", "ABC", False),  # case-sensitive outside PN
    ("DOE*", "PN", "doe^jane", True),
    ("d?e^*", "PN", "DOE^X", True),
    ("*^jane", "PN", "Doe^Jane", True),
    ("[A]*", "LO", "[A]x", True),  # GLOB's [ is escaped
    ("[A]*", "LO", "Ax", False),
    ("a[b*", "LO", "a[bc", True),
    ("50%*", "LO", "50%_off", True),
    ("x_?", "LO", "x_y", True),
    ("1.2.*", "UI", "1.2.3", False),  # no wild cards for UI
    ("1?", "IS", "12", False),  # nor IS
    # List of UID Matching (C.2.2.2.2)
    ("1.2\\1.3", "UI", "1.3", True),
    ("1.2\\1.3", "UI", "1.4", False),
    (MultiValue(str, ["1.2", "1.3"]), "UI", "1.2", True),
    (["1.2", "1.3", "1.4"], "UI", "1.4", True),
    # Range Matching (C.2.2.2.5): DA
    ("20200101-20201231", "DA", "20200615", True),
    ("20200101-20201231", "DA", "20200101", True),
    ("20200101-20201231", "DA", "20201231", True),
    ("20200101-20201231", "DA", "20210101", False),
    ("20200101-", "DA", "20991231", True),
    ("20200101-", "DA", "20191231", False),
    ("-20200101", "DA", "20200101", True),
    ("-20200101", "DA", "20200102", False),
    ("20200101", "DA", "20200101", True),
    ("20200101", "DA", "20200102", False),
    ("20201231-20200101", "DA", "20200615", False),  # start after end: nothing
    ("2020.01.01", "DA", "20200101", True),  # ACR-NEMA dots
    ("20200101", "DA", "2020.01.01", True),
    (" 20200101 - 20200102 ", "DA", "20200102", True),
    ("20200101-20200131", "DA", None, False),
    ("-", "DA", "20200101", True),
    # TM: partial times cover their precision
    ("1030", "TM", "103045", True),
    ("1030", "TM", "1031", False),
    ("10", "TM", "105959.999", True),
    ("10", "TM", "110000", False),
    ("1000-1100", "TM", "110059", True),
    ("1000-1100", "TM", "110100", False),
    ("1000-1100", "TM", "0959", False),
    ("-0900", "TM", "085959", True),
    ("-0900", "TM", "0900", True),
    ("-0900", "TM", "091000", False),
    ("1200-", "TM", "235959.999999", True),
    ("1200-", "TM", "115959", False),
    ("101010.5", "TM", "101010.5", True),
    ("101010.5", "TM", "101010.55", True),
    ("101010.5-101010.7", "TM", "101010.8", False),
    ("101010.5-101010.7", "TM", "101010.79", True),
    ("10:30-11:00", "TM", "1045", True),
    ("2300-0100", "TM", "2330", False),  # crossing midnight: not supported
    ("1000", "TM", "10", True),
    ("1030-1031", "TM", "10", False),  # a candidate is the start of its value
    # DT, with offsets from UTC
    ("2020", "DT", "20200615123000", True),
    ("2020", "DT", "2021", False),
    ("20200101-20200131", "DT", "20200131235959", True),
    ("20200101-20200131", "DT", "20200201", False),
    ("20200101120000+0100", "DT", "20200101110000+0000", True),
    ("20200101120000-0500", "DT", "20200101170000+0000", True),  # - of an offset
    ("20200101120000-0500", "DT", "20200101120000", False),
    ("20200101-20200102-0500", "DT", "20200103040000+0000", True),
    ("20200101-20200102-0500", "DT", "20200103050000+0000", False),
    ("-2020", "DT", "2019", True),
    ("2021-", "DT", "20201231235959", False),
    ("2021-", "DT", "20210101", True),
    # several key values: any of them
    ("CT\\MR", "CS", "MR", True),
    ("CT\\MR", "CS", "US", False),
    ("C*\\M?", "CS", "MR", True),
    ("20200101\\20200301-", "DA", "20200401", True),
    ("20200101\\20200301-", "DA", "20200201", False),
    # a backslash is text in LT / ST / UT
    ("a\\b", "LT", "a\\b", True),
    ("a\\b", "LT", "a", False),
    # Universal Matching (C.2.2.2.3): zero length, spaces, or only "*"; empty matches
    ("", "LO", None, True),
    ("", "LO", "", True),
    ("  ", "DA", None, True),
    ("*", "LO", None, True),
    ("*", "PN", "", True),
    ("**", "UI", None, True),
    ("*", "DA", "20200101", True),
    # Empty Value Matching (C.2.2.2.7): "" matches only what is empty or absent
    ('""', "LO", None, True),
    ('""', "LO", "", True),
    ('""', "LO", "   ", True),
    ('""', "LO", "x", False),
    ('""', "LO", '""', False),
    ('""', "PN", "^^", True),
    ('""', "PN", "Doe", False),
    ('""', "DA", None, True),
    ('""', "DA", "20200101", False),
    ('""', "TM", None, True),
    ('""', "UI", "1.2", False),
    ('""', "IS", "0", False),
    (' "" ', "SH", None, True),
    ('""\\CT', "CS", "CT", True),
    ('""\\CT', "CS", None, True),
    ('""\\CT', "CS", "MR", False),
    ('""\\20200101-', "DA", "20210101", True),
    ('""\\*', "CS", "MR", True),
]


@pytest.mark.parametrize(("query", "vr", "candidate", "expected"), CASES)
def test_matching_kinds(
    db: Table, query: object, vr: str, candidate: object, expected: bool
) -> None:
    assert matches(query, vr, candidate) is expected
    assert sql_matches(db, query, vr, candidate) is expected


@pytest.mark.parametrize(
    ("query", "vr", "candidate", "expected"),
    [
        ("MR", "CS", ["CT", "MR"], True),
        ("MR", "CS", "CT\\MR", True),
        ("US", "CS", ["CT", "MR"], False),
        ("C*", "CS", ["MR", "CT"], True),
        ("M?", "CS", ["CT", "MRI"], False),
        ("A*B", "LO", ["A", "B"], False),  # a * never spans two values
        ("1.2\\1.9", "UI", ["1.1", "1.9"], True),
        ("doe*", "PN", ["Smith^A", "DOE^B"], True),
        ("20200101-20200201", "DA", ["20190101", "20200115"], True),
        ("MR", "CS", [], False),
        ("", "CS", [], True),
        ('""', "CS", [], True),
        ('""', "CS", ["CT"], False),
        ('""', "CS", ["", "CT"], False),
        ('""\\MR', "CS", ["CT", "MR"], True),
    ],
)
def test_multi_valued_candidates(
    db: Table, query: object, vr: str, candidate: object, expected: bool
) -> None:
    assert matches(query, vr, candidate) is expected
    assert sql_matches_multi(db, query, vr, candidate) is expected


@pytest.mark.parametrize(
    ("query", "vr", "kind"),
    [
        ("", "LO", MatchKind.UNIVERSAL),
        (None, "PN", MatchKind.UNIVERSAL),
        ("*", "UI", MatchKind.UNIVERSAL),
        ("   ", "SH", MatchKind.UNIVERSAL),
        ("ABC", "LO", MatchKind.SINGLE),
        ("1.2.3", "UI", MatchKind.SINGLE),
        ("20200101", "DA", MatchKind.SINGLE),
        ("A*", "LO", MatchKind.WILDCARD),
        ("A?", "PN", MatchKind.WILDCARD),
        ("A*", "UI", MatchKind.SINGLE),
        ("20200101-", "DA", MatchKind.RANGE),
        ("-1000", "TM", MatchKind.RANGE),
        ("20200101120000-0500", "DT", MatchKind.SINGLE),
        ("1.2\\1.3", "UI", MatchKind.UID_LIST),
        ("CT\\MR", "CS", MatchKind.MULTIPLE),
        ('""', "LO", MatchKind.EMPTY),
        ('""', "DA", MatchKind.EMPTY),
        ('""', "UI", MatchKind.EMPTY),
        ('""\\CT', "CS", MatchKind.MULTIPLE),
    ],
)
def test_parse_query_kind(query: object, vr: str, kind: MatchKind) -> None:
    assert parse_query(vr, query).kind is kind


@pytest.mark.parametrize(
    ("query", "vr"),
    [
        ("2020-01-01-02", "DA"),
        ("abc", "DA"),
        ("20201301", "DA"),
        ("20200230", "DA"),
        ("25", "TM"),
        ("1060", "TM"),
        ("10.5", "TM"),
        ("2020-2021-2022", "DT"),
        ("20201340", "DT"),
        ("abc-", "TM"),
    ],
)
def test_invalid_range_values(query: str, vr: str) -> None:
    with pytest.raises(MatchError):
        parse_query(vr, query)
    with pytest.raises(MatchError):
        sql_condition("k", vr, query, keyword="StudyDate")


def test_match_error_names_the_attribute() -> None:
    with pytest.raises(MatchError, match="StudyDate"):
        sql_condition("k", "DA", "yesterday", keyword="StudyDate")


def test_universal_gives_no_condition() -> None:
    assert sql_condition("k", "LO", "") is None
    assert sql_condition("k", "PN", "*") is None
    assert sql_condition("k", "DA", "-") is None
    assert sql_condition("k", "CS", 'CT\\*\\""') is None


def test_empty_value_condition() -> None:
    """A column holding NULL or '' has no value; a multi-valued one is NULL then."""
    cond = sql_condition("k", "LO", '""')
    assert cond is not None and cond.sql == "(k IS NULL OR k = '')" and cond.params == ()
    cond = sql_condition("mv", "CS", '""\\CT', multi_valued=True)
    assert cond is not None and cond.params == ("CT",)
    assert cond.sql.startswith("(EXISTS (SELECT 1 FROM json_each(mv)")
    assert cond.sql.endswith(" OR (mv IS NULL OR mv = ''))")
    parsed = parse_query("CS", '""\\CT')
    assert parsed.has_empty
    rest = parsed.without_empty()
    assert rest is not None and [a.op for a in rest.alternatives] == ["eq"]
    assert parse_query("CS", '""').without_empty() is None


def test_long_uid_list_is_one_parameter(db: Table) -> None:
    uids = [f"1.2.{n}" for n in range(5000)]
    cond = sql_condition("k", "UI", uids, dialect=db.dialect)
    assert cond is not None
    assert len(cond.params) == 1 and "json" in cond.sql
    assert sql_matches(db, uids, "UI", "1.2.4999")
    assert not sql_matches(db, uids, "UI", "1.2.5000")
    short = sql_condition("k", "UI", uids[:3], dialect=db.dialect)
    p = db.dialect.placeholder
    assert short is not None and short.sql == f"k IN ({p}, {p}, {p})"


@pytest.mark.parametrize(
    ("pattern", "hits"),
    [
        ("a%b", ["a%b"]),  # LIKE's own wild cards stand for themselves
        ("a_b", ["a_b"]),
        ("[ab]*", ["[ab]c"]),  # GLOB's class bracket stands for itself
        ("*%*", ["a%b", "x%"]),
        ("?_?", ["a_b"]),
        ("a*", ["a%b", "a_b", "aXb", "ab"]),
    ],
)
def test_special_characters_of_each_database_match_themselves(
    db: Table, pattern: str, hits: list[str]
) -> None:
    """The wild cards of SQL (%, _) and of GLOB ([) are plain characters in a DICOM
    pattern: the same rows match in Python and in the database."""
    cond = sql_condition("k", "LO", pattern, dialect=db.dialect)
    assert cond is not None
    for row in ["a%b", "a_b", "aXb", "[ab]c", "x%", "ab"]:
        db.hold(match_key("LO", row), None)
        in_sql = db.count(cond.sql, cond.params) == 1
        assert in_sql is matches(pattern, "LO", row) is (row in hits), row


def test_keys() -> None:
    assert normalize("PN", " Doe^John^^=^ ") == "Doe^John"
    assert normalize("LT", "  text  ") == "  text"
    assert normalize("UI", "1.2\x00") == "1.2"
    assert match_key("PN", "DOE^John") == "doe^john"
    assert match_key("TM", "1030") == "103000.000000"
    assert match_key("TM", "10:30:15.5") == "103015.500000"
    assert match_key("DA", "2020.01.31") == "20200131"
    assert match_key("DT", "20200101000000+0100") == "20191231230000.000000"
    assert match_key("DT", "2020") == "20200101000000.000000"
    assert match_key("IS", "+007") == "7"
    assert match_key("TM", "not a time") == "not a time"
    assert match_key("LO", "   ") is None
    assert candidate_keys("CS", "CT\\\\MR") == ["CT", "MR"]
    assert json_keys("CS", None) is None
    assert json_keys("CS", ["CT", "MR"]) == '["CT", "MR"]'


# -- Sequence Matching (C.2.2.2.6) --


def _item(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_sequence_matching() -> None:
    candidate = [
        _item(CodeValue="P1", CodingSchemeDesignator="LOCAL", CodeMeaning="Head"),
        _item(CodeValue="P2", CodingSchemeDesignator="LOCAL", CodeMeaning="Chest"),
    ]
    # no item / an empty item: universal, the whole sequence is returned
    assert [i.CodeValue for i in match_sequence([], candidate) or []] == ["P1", "P2"]
    whole = match_sequence([Dataset()], candidate)
    assert whole is not None and whole[1].CodeMeaning == "Chest"
    # item keys: matching items only, holding only the requested attributes
    found = match_sequence([_item(CodeValue="P2", CodeMeaning="")], candidate)
    assert found is not None and len(found) == 1
    assert found[0].CodeValue == "P2" and found[0].CodeMeaning == "Chest"
    assert "CodingSchemeDesignator" not in found[0]
    wildcard = match_sequence([_item(CodeMeaning="*e*")], candidate)
    assert wildcard is not None and [i.CodeMeaning for i in wildcard] == ["Head", "Chest"]
    assert match_sequence([_item(CodeValue="P3")], candidate) is None
    assert match_sequence([_item(CodeValue="P3")], None) is None
    # universal item keys match even an absent sequence
    assert match_sequence([_item(CodeValue="")], None) == []
    # nested sequences
    outer = [_item(ConceptNameCodeSequence=[_item(CodeValue="X1")], TextValue="a")]
    nested = match_sequence([_item(ConceptNameCodeSequence=[_item(CodeValue="X?")])], outer)
    assert nested is not None and nested[0].ConceptNameCodeSequence[0].CodeValue == "X1"
    assert "TextValue" not in nested[0]
    miss = [_item(ConceptNameCodeSequence=[_item(CodeValue="Y?")])]
    assert match_sequence(miss, outer) is None


# -- Python and SQL agree (hypothesis) --

_TEXT = st.text(alphabet="aAbBzZ09 ^=.-é[%_\\", max_size=8)
_PATTERN = st.text(alphabet="aAbB0 ^*?[é\\", max_size=8)


def _da(d: date) -> str:
    return d.strftime("%Y%m%d")


def _tm(t: time, precision: int) -> str:
    text = t.strftime("%H%M%S") + f".{t.microsecond:06d}"
    return text[: (2, 4, 6, 8, 10, 13)[precision]].rstrip(".")


def _dt(value: datetime, precision: int, offset: int | None) -> str:
    text = value.strftime("%Y%m%d%H%M%S") + f".{value.microsecond:06d}"
    text = text[: (4, 6, 8, 10, 12, 14, 17, 21)[precision]].rstrip(".")
    if offset is not None:
        text += f"{'-' if offset < 0 else '+'}{abs(offset) // 60:02d}{abs(offset) % 60:02d}"
    return text


_DATES = st.dates(min_value=date(1900, 1, 1), max_value=date(2100, 12, 31))
_DA_VALUE = _DATES.map(_da)
_TM_VALUE = st.builds(_tm, st.times(), st.integers(0, 5))
_DT_VALUE = st.builds(
    _dt,
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1)),
    st.integers(0, 7),
    st.none() | st.integers(-12 * 60, 14 * 60),
)
_RANGE_VALUES = {"DA": _DA_VALUE, "TM": _TM_VALUE, "DT": _DT_VALUE}


@st.composite
def _range_query(draw: st.DrawFn, vr: str) -> str:
    value = _RANGE_VALUES[vr]
    shape = draw(st.sampled_from(["single", "closed", "open_low", "open_high"]))
    if shape == "single":
        return draw(value)
    low, high = draw(value), draw(value)
    return {"closed": f"{low}-{high}", "open_low": f"-{high}", "open_high": f"{low}-"}[shape]


@st.composite
def query_and_candidate(draw: st.DrawFn) -> tuple[object, str, object]:
    vr = draw(st.sampled_from(["CS", "LO", "SH", "PN", "LT", "UI", "IS", "DA", "TM", "DT"]))
    if vr in _RANGE_VALUES:
        candidate: object = draw(_RANGE_VALUES[vr] | st.none())
        query: object = draw(_range_query(vr) | st.just("") | _RANGE_VALUES[vr])
        if draw(st.booleans()):  # several key values
            query = f"{query}\\{draw(_range_query(vr))}"
    elif vr == "UI":
        uid = st.from_regex(r"1\.2(\.[0-9]{1,3}){0,3}", fullmatch=True)
        candidate = draw(uid | st.none())
        query = draw(st.lists(uid, max_size=4).map("\\".join))
        if candidate is not None and draw(st.booleans()):
            query = f"{query}\\{candidate}"
    elif vr == "IS":
        candidate = draw(st.integers(-999, 999).map(str) | st.just("007") | st.none())
        query = draw(st.integers(-999, 999).map(str) | st.just("7") | st.just('""'))
    else:
        candidate = draw(_TEXT | st.none() | st.lists(_TEXT, max_size=3).map("\\".join))
        query = draw(_PATTERN | _TEXT)
        if isinstance(candidate, str) and candidate and draw(st.booleans()):
            # a pattern derived from the candidate: more matches
            chars = list(candidate[: draw(st.integers(0, len(candidate)))])
            for index in draw(st.lists(st.integers(0, max(len(chars) - 1, 0)), max_size=2)):
                if chars:
                    chars[index] = "?"
            query = "".join(chars) + draw(st.sampled_from(["", "*"]))
            if vr == "PN" and draw(st.booleans()):
                query = query.upper()
    if draw(st.integers(0, 7)) == 0:  # Empty Value Matching, alone or with another value
        query = draw(st.sampled_from(['""', f'{query}\\""', f'""\\{query}']))
    return query, vr, candidate


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(query_and_candidate())
def test_python_and_sql_agree(db: Table, case: tuple[object, str, object]) -> None:
    query, vr, candidate = case
    try:
        expected = matches(query, vr, candidate)
    except MatchError:
        with pytest.raises(MatchError):
            sql_condition("k", vr, query)
        return
    if vr not in ("LT",) and isinstance(candidate, str) and "\\" in candidate:
        assert sql_matches_multi(db, query, vr, candidate) is expected
    else:
        assert sql_matches(db, query, vr, candidate) is expected
        assert sql_matches_multi(db, query, vr, candidate) is expected


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["DA", "TM", "DT"]).flatmap(
        lambda vr: st.tuples(st.just(vr), _RANGE_VALUES[vr])
    )
)
def test_a_date_or_time_matches_itself(case: tuple[str, str]) -> None:
    vr, value = case
    assert matches(value, vr, value)
    assert matches(f"{value}-", vr, value)
    assert matches(f"-{value}", vr, value)
    assert matches(f"{value}-{value}", vr, value)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["CS", "LO", "SH", "PN", "UI"]), _TEXT)
def test_a_value_matches_itself(vr: str, value: str) -> None:
    assume("\\" not in value and "*" not in value and "?" not in value)
    assume(normalize(vr, value) != "")
    assert matches(value, vr, value)
    assert matches(value, vr, [value, "other"])


@settings(max_examples=200, deadline=None)
@given(_DA_VALUE, _DA_VALUE, _DA_VALUE)
def test_date_range_is_an_interval(low: str, high: str, candidate: str) -> None:
    assert matches(f"{low}-{high}", "DA", candidate) is (low <= candidate <= high)
    assert matches(f"{low}-", "DA", candidate) is (candidate >= low)
    assert matches(f"-{high}", "DA", candidate) is (candidate <= high)
