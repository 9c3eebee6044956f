"""Combined date-time Range Matching of DA / TM pairs (PS3.4 §C.2.2.2.5.4)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import date, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomnet.pacs.combined import (
    CombinedRange,
    combined_key,
    combined_matches,
    combined_range,
    combined_sql,
    date_time_pairs,
)
from dicomnet.pacs.matching import candidate_keys, parse_query


def span(date_value: str, time_value: str) -> CombinedRange | None:
    return combined_range(parse_query("DA", date_value), parse_query("TM", time_value))


def test_pairs() -> None:
    keywords = ["StudyTime", "StudyDate", "SeriesDate", "PatientBirthDate", "PatientBirthTime"]
    assert date_time_pairs([*keywords, "ContentTime", "Modality"]) == [
        ("PatientBirthDate", "PatientBirthTime"),
        ("StudyDate", "StudyTime"),
    ]


@pytest.mark.parametrize(
    ("date_value", "time_value", "expected"),
    [
        # the standard's example: 5 July 10:00 to 7 July 18:00
        (
            "20060705-20060707",
            "1000-1800",
            CombinedRange("20060705100000.000000", "20060707180059.999999"),
        ),
        (
            "20200101-20200102",
            "2300-0100",
            CombinedRange("20200101230000.000000", "20200102010059.999999"),
        ),
        ("20200101-", "2300-", CombinedRange("20200101230000.000000", None)),
        ("-20200102", "-01", CombinedRange(None, "20200102015959.999999")),
        ("202001-202002", "12-13", CombinedRange("20200101120000.000000", "20200229135959.999999")),
        # not the same form of Range Matching: matched apart
        ("20200101-20200102", "2300-", None),
        ("-20200102", "2300-", None),
        ("20200101", "2300-0100", None),
        ("20200101-20200102", "1030", None),
        ("20200101-20200102", "", None),
        ("20200101-20200102\\20210101-20210102", "2300-0100", None),
    ],
)
def test_combined_range(date_value: str, time_value: str, expected: CombinedRange | None) -> None:
    assert span(date_value, time_value) == expected


@pytest.mark.parametrize(
    ("date_value", "time_value", "expected"),
    [
        ("20200101", "233000", True),
        ("20200102", "003000", True),
        ("20200102", "0100", True),
        ("20200102", "010059.999999", True),
        ("20200102", "0101", False),
        ("20200101", "120000", False),  # in the time range of neither day apart
        ("20200101", "2259", False),
        ("20200103", "0030", False),
        ("20200102", None, True),  # no time: the start of the day
        ("20200101", "", False),
        (None, "2330", False),
        ("", "2330", False),
        (["20200101", "20210101"], "2330", True),
    ],
)
def test_combined_matches(date_value: object, time_value: object, expected: bool) -> None:
    overnight = span("20200101-20200102", "2300-0100")
    assert overnight is not None
    assert combined_matches(overnight, date_value, time_value) is expected
    # apart, the same candidate would match the date range and fail the time range
    if date_value == "20200101" and time_value == "120000":
        assert not parse_query("TM", "2300-0100").match_keys(candidate_keys("TM", "120000"))


def test_candidate_key() -> None:
    assert combined_key("2020.01.31", "10:30") == "20200131103000.000000"
    assert combined_key("20200131", None) == "20200131000000.000000"
    assert combined_key(None, "1030") is None


@pytest.fixture(scope="module")
def db() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (d TEXT, t TEXT)")
    yield conn
    conn.close()


def sql_matches(conn: sqlite3.Connection, rng: CombinedRange, d: object, t: object) -> bool:
    dates, times = candidate_keys("DA", d), candidate_keys("TM", t)
    conn.execute("DELETE FROM t")
    conn.execute(
        "INSERT INTO t VALUES (?, ?)", (dates[0] if dates else None, times[0] if times else None)
    )
    cond = combined_sql(rng, "d", "t")
    return conn.execute(f"SELECT COUNT(*) FROM t WHERE {cond.sql}", cond.params).fetchone()[0] == 1


_DAY = date(2020, 2, 27)
_DATES = st.integers(0, 4).map(lambda n: (_DAY + timedelta(days=n)).strftime("%Y%m%d"))
_TIMES = st.builds(lambda t, p: t.strftime("%H%M%S")[: (2, 4, 6)[p]], st.times(), st.integers(0, 2))


@st.composite
def case(draw: st.DrawFn) -> tuple[str, str, object, object]:
    shape = draw(st.sampled_from(["closed", "open_low", "open_high"]))
    d1, d2, t1, t2 = draw(_DATES), draw(_DATES), draw(_TIMES), draw(_TIMES)
    forms = {"closed": "{}-{}", "open_low": "-{1}", "open_high": "{0}-"}
    date_value = forms[shape].format(d1, d2)
    time_value = forms[shape].format(t1, t2)
    return date_value, time_value, draw(_DATES | st.none()), draw(_TIMES | st.none())


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case())
def test_python_and_sql_agree(db: sqlite3.Connection, c: tuple[str, str, object, object]) -> None:
    date_value, time_value, d, t = c
    rng = span(date_value, time_value)
    assert rng is not None
    expected = combined_matches(rng, d, t)
    assert sql_matches(db, rng, d, t) is expected
