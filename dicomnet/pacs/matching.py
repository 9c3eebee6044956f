"""Query/Retrieve attribute matching (PS3.4 §C.2.2.2), in SQL and in Python.

A key attribute value of a C-FIND / C-MOVE / C-GET identifier is parsed once
(`parse_query`) into a `ParsedQuery`: universal, or a set of alternatives, each an
exact key, a wild card pattern or a range. From it come both

- `sql_condition(column, vr, value)`: a WHERE fragment and its parameters for a
  column that holds the candidates' *match keys* (`match_key`, or a JSON array of
  them for a multi-valued column, `json_keys`), so matching happens inside the
  database, on indexes, streaming; in SQLite's SQL or, with `dialect=POSTGRESQL`,
  PostgreSQL's (the same rows match in both); and
- `matches(value, vr, candidate)`: the same decision in Python, for attributes
  read from the stored files (post-filtering).

Both take the same parsed form and compare the same keys, so they agree (a
hypothesis test in ``tests/test_matching.py`` checks it).

The matching kinds (PS3.4 §C.2.2.2):

- Single Value Matching (§C.2.2.2.1): exact and case-sensitive, except for PN,
  which §C.2.2.2.1 lets an SCP match insensitive to case: PN is matched on
  ``str.lower()`` of both sides. Padding is not significant: trailing spaces (and
  the NUL padding of UI) are removed from every value, leading spaces too for the
  VRs whose leading spaces PS3.5 Table 6.2-1 calls insignificant (AE, AS, CS, DA,
  DS, DT, IS, LO, PN, SH, TM, UI); a PN has its trailing empty components
  (``Doe^John^^`` is ``Doe^John``) removed. IS and DS values compare as numbers
  (``007`` is ``7``; CP-2305 leaves IS/DS single value matching to the
  implementation).
- List of UID Matching (§C.2.2.2.2): a UI value with several UIDs (backslash
  separated) matches any of them.
- Universal Matching (§C.2.2.2.3): a zero-length value (or one of spaces only)
  matches everything, including entities without a value; the attribute is
  returned. A value made only of ``*`` is Wild Card Matching equivalent to
  Universal Matching (§C.2.2.2.4 note); it is treated as universal for every VR,
  UI included, because SCUs send it, and so matches entities without a value too.
- Empty Value Matching (§C.2.2.2.7): a value of ``""`` (two QUOTATION MARK
  characters, which §C.2.2.2 lists among the special characters of matching)
  matches the entities whose attribute is zero length or absent, and only those.
  The standard makes it an extended negotiation option of the C-FIND SOP classes
  (§C.5.1.1); it is done here whether negotiated or not, since ``""`` as a literal
  value matches nothing real. Among several values (``CT\\""``) it is one more
  alternative.
- Wild Card Matching (§C.2.2.2.4): for AE, CS, LO, LT, PN, SH, ST, UC, UR and UT,
  ``*`` matches any sequence of characters (none included) and ``?`` exactly one.
  There is no escaping: a value with ``*`` or ``?`` is always a pattern. Other VRs
  (UI, IS, DS, DA, TM, DT, ...) never use wild cards.
- Range Matching (§C.2.2.2.5) for DA, TM and DT: ``a-b``, ``a-`` and ``-b``, both
  ends inclusive. A value is taken at its precision: ``2020`` as a DT (or as a
  range end) covers the whole year, ``10`` as a TM the whole hour 10:00-10:59:59.999999,
  ``1030`` 10:30:00-10:30:59.999999; the lower end of a range starts where its value
  starts, the upper end stops where its value ends. A DA/TM/DT value without ``-``
  is matched as the range from that value to itself (so ``1030`` matches
  ``103015``). Candidates are points: their value's start. Legacy ``.``
  separators in DA (``2020.01.31``) and ``:`` in TM (``10:30``) are accepted.
  DT offsets from UTC (``&ZZXX``) on either side are applied (both sides
  converted to UTC); a DT without an offset is compared as is (PS3.4 would read
  it in the local time zone / Timezone Offset From UTC, which this module does
  not know). A range crossing midnight, or whose start is after its end, matches
  nothing (§C.2.2.2.5). Combined date-time matching of a DA/TM pair (an extended
  negotiation option, §C.2.2.2.5.4) is `dicomnet.pacs.combined`'s; here StudyDate
  and StudyTime are matched separately.
- Multiple values (§C.2.2.2.8): without the Multiple Value Matching extended
  negotiation their meaning is undefined by the standard; here a key with several
  values (``CT\\MR``) matches a candidate that matches any of them (an OR, as for
  UIDs), and a candidate with several values matches if any of its values does.
- Sequence Matching (§C.2.2.2.6): `match_sequence`, for sequences read from files.

Matching is on the decoded (Unicode) values: the Specific Character Set of the
identifier and of the stored instances only decides how they are decoded.
"""

from __future__ import annotations

import calendar
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Literal

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

__all__ = [
    "EMPTY_VALUE",
    "KEYED_VRS",
    "POSTGRESQL",
    "RANGE_VRS",
    "SQLITE",
    "WILDCARD_VRS",
    "Alternative",
    "MatchError",
    "MatchKind",
    "ParsedQuery",
    "SqlCondition",
    "SqlDialect",
    "candidate_keys",
    "copy_dataset",
    "glob_matches",
    "json_keys",
    "match_key",
    "match_sequence",
    "matches",
    "normalize",
    "parse_query",
    "query_values",
    "sql_condition",
    "sql_condition_of",
]

#: VRs where ``*`` and ``?`` are wild cards (PS3.4 §C.2.2.2.4).
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
#: VRs matched by range (PS3.4 §C.2.2.2.5).
RANGE_VRS = frozenset({"DA", "TM", "DT"})
#: VRs whose match key differs from the (normalised) value, so that an index keeps
#: a separate key column for them: PN (lower case), DA/TM/DT (canonical, sortable),
#: IS/DS (numeric).
KEYED_VRS = frozenset({"PN", "DA", "TM", "DT", "IS", "DS"})
#: VRs where the backslash is a character, not a value delimiter (PS3.5 §6.2).
_SINGLE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})
#: VRs whose leading spaces are not significant (PS3.5 Table 6.2-1).
_STRIP_LEADING_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UI"}
)
#: A key value asking for Empty Value Matching (PS3.4 §C.2.2.2.7): two QUOTATION MARKs.
EMPTY_VALUE = '""'
#: Above this many exact values, an IN list is passed as one JSON parameter.
_MAX_INLINE_VALUES = 32


class MatchError(ValueError):
    """A key value that cannot be matched (e.g. a DA range that is not a date)."""


class MatchKind(Enum):
    """Which matching of PS3.4 §C.2.2.2 a key value asks for."""

    UNIVERSAL = "universal"  # §C.2.2.2.3
    EMPTY = "empty"  # §C.2.2.2.7
    SINGLE = "single"  # §C.2.2.2.1
    UID_LIST = "uid list"  # §C.2.2.2.2
    WILDCARD = "wildcard"  # §C.2.2.2.4
    RANGE = "range"  # §C.2.2.2.5
    MULTIPLE = "multiple"  # §C.2.2.2.8 (as an OR, see the module docstring)


@dataclass(frozen=True, slots=True)
class Alternative:
    """One way a candidate key can match: ``eq`` (equal to `low`), ``glob``
    (`low` is the ``*``/``?`` pattern), ``range`` (`low` <= key <= `high`, an
    end being open when None) or ``empty`` (the candidate has no value)."""

    op: Literal["eq", "glob", "range", "empty"]
    low: str | None
    high: str | None = None


@dataclass(frozen=True, slots=True)
class ParsedQuery:
    """A key value parsed for matching: `alternatives` is empty when universal."""

    vr: str
    kind: MatchKind
    alternatives: tuple[Alternative, ...]

    @property
    def universal(self) -> bool:
        return self.kind is MatchKind.UNIVERSAL

    @property
    def has_empty(self) -> bool:
        """Whether a candidate without a value matches (Empty Value Matching)."""
        return any(alt.op == "empty" for alt in self.alternatives)

    def without_empty(self) -> ParsedQuery | None:
        """The alternatives that need a value, or None if there are none."""
        kept = tuple(alt for alt in self.alternatives if alt.op != "empty")
        return ParsedQuery(self.vr, self.kind, kept) if kept else None

    def match_keys(self, keys: Iterable[str]) -> bool:
        """True if any candidate key matches any alternative; a candidate without
        keys matches only Empty Value Matching."""
        if self.universal:
            return True
        keys = list(keys)
        if not keys:
            return self.has_empty
        return any(_alternative_matches(alt, key) for key in keys for alt in self.alternatives)


@dataclass(frozen=True, slots=True)
class SqlCondition:
    """A WHERE fragment with its dialect's placeholders and its parameters, in order."""

    sql: str
    params: tuple[str, ...]


# -- values -------------------------------------------------------------------------


def normalize(vr: str, value: str) -> str:
    """One value without its insignificant padding (PS3.5 §6.2, Table 6.2-1).

    Trailing spaces and NULs always go; leading spaces for the VRs that say so; a PN
    loses the trailing empty components of each component group and trailing empty
    groups (PS3.5 §6.2.1)."""
    text = value.rstrip(" \x00")
    if vr in _STRIP_LEADING_VRS:
        text = text.lstrip(" ")
    if vr == "PN" and ("^" in text or "=" in text):
        # NULs too: normalising twice gives the same text (a group of NULs and carets
        # would otherwise become empty only the second time).
        text = "=".join(group.rstrip("^ \x00") for group in text.split("=")).rstrip("=")
    return text


def _value_strings(vr: str, value: object) -> list[str]:
    """The values of an element value as strings: a str is split on backslashes
    (except for the VRs where a backslash is text), a list/MultiValue is taken as is."""
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1")
    if isinstance(value, str):
        if vr in _SINGLE_TEXT_VRS:
            return [value]
        return value.split("\\")
    if isinstance(value, (list, tuple)) or (
        isinstance(value, Sequence) and not isinstance(value, (str, bytes))
    ):
        out: list[str] = []
        for item in value:
            out.extend(_value_strings(vr, item))
        return out
    return [str(value)]


def query_values(vr: str, value: object) -> list[str]:
    """The normalised values of a key attribute value (empty ones dropped)."""
    return [text for text in (normalize(vr, v) for v in _value_strings(vr, value)) if text]


# -- dates and times (PS3.5 §6.2 DA, TM, DT) -------------------------------------------

_DA_RE = re.compile(r"(\d{4})(\d{2})?(\d{2})?")
_TM_RE = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")
_DT_RE = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?")


def _da_bounds(text: str) -> tuple[str, str]:
    """(first day, last day) covered by a DA value of any precision (YYYY[MM[DD]])."""
    text = text.replace(".", "")
    m = _DA_RE.fullmatch(text)
    if m is None:
        raise MatchError(f"not a date: {text!r}")
    year = int(m[1])
    month_lo, month_hi = (int(m[2]), int(m[2])) if m[2] else (1, 12)
    if not 1 <= month_lo <= 12:
        raise MatchError(f"not a date: {text!r}")
    last = calendar.monthrange(year or 2000, month_hi)[1]
    day_lo, day_hi = (int(m[3]), int(m[3])) if m[3] else (1, last)
    if not 1 <= day_lo <= calendar.monthrange(year or 2000, month_lo)[1]:
        raise MatchError(f"not a date: {text!r}")
    return f"{year:04d}{month_lo:02d}{day_lo:02d}", f"{year:04d}{month_hi:02d}{day_hi:02d}"


def _tm_bounds(text: str) -> tuple[str, str]:
    """(start, end) covered by a TM value of any precision, as HHMMSS.FFFFFF."""
    text = text.replace(":", "")
    m = _TM_RE.fullmatch(text)
    if m is None or (m[4] is not None and m[3] is None):
        raise MatchError(f"not a time: {text!r}")
    hour = int(m[1])
    minute = int(m[2]) if m[2] else None
    second = int(m[3]) if m[3] else None
    if hour > 23 or (minute is not None and minute > 59) or (second is not None and second > 60):
        raise MatchError(f"not a time: {text!r}")
    frac = m[4] or ""
    lo = f"{hour:02d}{minute or 0:02d}{second or 0:02d}.{frac.ljust(6, '0')}"
    hi = (
        f"{hour:02d}{59 if minute is None else minute:02d}"
        f"{59 if second is None else second:02d}.{frac.ljust(6, '9')}"
    )
    return lo, hi


def _dt_parse(text: str) -> re.Match[str] | None:
    m = _DT_RE.fullmatch(text)
    if m is None or (m[7] is not None and m[6] is None):
        return None
    if m[8] is not None:
        hours, minutes = int(m[8][1:3]), int(m[8][3:5])
        if hours > 14 or minutes > 59:
            return None
    return m


def _dt_format(value: datetime) -> str:
    return (
        f"{value.year:04d}{value.month:02d}{value.day:02d}"
        f"{value.hour:02d}{value.minute:02d}{value.second:02d}.{value.microsecond:06d}"
    )


def _dt_bounds(text: str) -> tuple[str, str]:
    """(start, end) covered by a DT value of any precision, in UTC when the value has
    an offset, as YYYYMMDDHHMMSS.FFFFFF."""
    m = _dt_parse(text)
    if m is None:
        raise MatchError(f"not a date-time: {text!r}")
    year = int(m[1])
    month = int(m[2]) if m[2] else None
    day = int(m[3]) if m[3] else None
    hour = int(m[4]) if m[4] else None
    minute = int(m[5]) if m[5] else None
    second = min(int(m[6]), 59) if m[6] else None
    frac = m[7] or ""
    try:
        month_hi = 12 if month is None else month
        lo = datetime(
            year,
            month or 1,
            day or 1,
            hour or 0,
            minute or 0,
            second or 0,
            int(frac.ljust(6, "0")),
        )
        hi = datetime(
            year,
            month_hi,
            calendar.monthrange(year, month_hi)[1] if day is None else day,
            23 if hour is None else hour,
            59 if minute is None else minute,
            59 if second is None else second,
            int(frac.ljust(6, "9")),
        )
    except ValueError as exc:
        raise MatchError(f"not a date-time: {text!r}") from exc
    if m[8] is not None:
        sign = -1 if m[8][0] == "-" else 1
        offset = sign * timedelta(hours=int(m[8][1:3]), minutes=int(m[8][3:5]))
        try:
            lo, hi = lo - offset, hi - offset
        except OverflowError:
            pass  # at the ends of the calendar: compared unconverted
    return _dt_format(lo), _dt_format(hi)


def _bounds(vr: str, text: str) -> tuple[str, str]:
    if vr == "DA":
        return _da_bounds(text)
    if vr == "TM":
        return _tm_bounds(text)
    return _dt_bounds(text)


def _split_range(vr: str, text: str) -> tuple[str, str] | None:
    """The two ends of a range value, or None if `text` is a single value.

    For DT the ``-`` of a negative UTC offset is not a range separator: a text that
    is a valid DT as a whole is a single value, else the first ``-`` that splits it
    into two valid (or empty) ends is the separator."""
    if "-" not in text:
        return None
    if vr != "DT":
        if text.count("-") != 1:
            raise MatchError(f"not a {vr} range: {text!r}")
        low, high = text.split("-")
        return low.strip(), high.strip()
    if _dt_parse(text) is not None:
        return None
    for index, char in enumerate(text):
        if char != "-":
            continue
        low, high = text[:index].strip(), text[index + 1 :].strip()
        if (not low or _dt_parse(low)) and (not high or _dt_parse(high)):
            return low, high
    raise MatchError(f"not a DT range: {text!r}")


# -- keys ---------------------------------------------------------------------------


def match_key(vr: str, value: str) -> str | None:
    """The key one candidate value is matched on (None for an empty value).

    PN: lower case; DA/TM/DT: the canonical start of the value (UTC for a DT with an
    offset); IS/DS: the number's canonical text; otherwise the normalised value.
    An unparseable date/time/number keeps its normalised text as key."""
    text = normalize(vr, value)
    if not text:
        return None
    if vr == "PN":
        return text.lower()
    if vr in RANGE_VRS:
        try:
            return _bounds(vr, text)[0]
        except MatchError:
            return text
    if vr == "IS":
        try:
            return str(int(text))
        except ValueError:
            return text
    if vr == "DS":
        try:
            return repr(float(text))
        except ValueError:
            return text
    return text


def candidate_keys(vr: str, value: object) -> list[str]:
    """The match keys of every value of a candidate attribute value."""
    return [key for key in (match_key(vr, v) for v in _value_strings(vr, value)) if key is not None]


def json_keys(vr: str, value: object) -> str | None:
    """What a multi-valued column holds for `sql_condition(..., multi_valued=True)`:
    a JSON array of the candidate's match keys (None when it has no value)."""
    keys = candidate_keys(vr, value)
    return json.dumps(keys, ensure_ascii=False) if keys else None


# -- parsing ------------------------------------------------------------------------


def parse_query(vr: str, value: object, keyword: str = "") -> ParsedQuery:
    """Parse a key attribute value of VR `vr` (a str, a list/MultiValue, a number,
    a PersonName or None) for matching. Raises `MatchError` for a DA/TM/DT value
    that is neither a value nor a range of that VR (``""`` excepted)."""
    values = query_values(vr, value)
    if not values:
        return ParsedQuery(vr, MatchKind.UNIVERSAL, ())
    alternatives: list[Alternative] = []
    kind = MatchKind.SINGLE
    for text in values:
        if text.strip("*") == "":
            return ParsedQuery(vr, MatchKind.UNIVERSAL, ())
        if text == EMPTY_VALUE:
            kind = MatchKind.EMPTY
            alternatives.append(Alternative("empty", None))
            continue
        if vr in RANGE_VRS:
            try:
                ends = _split_range(vr, text)
                if ends is None:
                    alternatives.append(Alternative("range", *_bounds(vr, text)))
                    continue
                low, high = ends
                if not low and not high:
                    return ParsedQuery(vr, MatchKind.UNIVERSAL, ())
                kind = MatchKind.RANGE
                alternatives.append(
                    Alternative(
                        "range",
                        _bounds(vr, low)[0] if low else None,
                        _bounds(vr, high)[1] if high else None,
                    )
                )
            except MatchError as exc:
                name = keyword or vr
                raise MatchError(f"{name}: {exc}") from None
        elif vr in WILDCARD_VRS and ("*" in text or "?" in text):
            kind = MatchKind.WILDCARD
            alternatives.append(Alternative("glob", text.lower() if vr == "PN" else text))
        else:
            key = match_key(vr, text)
            assert key is not None
            alternatives.append(Alternative("eq", key))
    if len(values) > 1:
        kind = MatchKind.UID_LIST if vr == "UI" else MatchKind.MULTIPLE
    return ParsedQuery(vr, kind, tuple(alternatives))


# -- Python matching ----------------------------------------------------------------


def glob_matches(pattern: str, text: str) -> bool:
    """Whether `text` matches the wild card `pattern` as a whole (PS3.4 §C.2.2.2.4: ``*``
    any run of characters, ``?`` exactly one), in O(len(pattern) * len(text)) at worst.

    No regular expression: a backtracking engine takes exponential time on patterns such
    as ``*a*a*a...*b``. This is the classic two-pointer matcher: on a mismatch it only
    moves the text position of the last ``*`` on by one, since any earlier ``*`` can
    absorb whatever a later one could."""
    p = t = 0
    star = -1  # pattern index just past the last `*` seen
    resume = 0  # text index where that `*` match resumes
    n, m = len(pattern), len(text)
    while t < m:
        if p < n and (pattern[p] == "?" or (pattern[p] == text[t] and pattern[p] != "*")):
            p += 1
            t += 1
        elif p < n and pattern[p] == "*":
            while p < n and pattern[p] == "*":
                p += 1
            star, resume = p, t
        elif star >= 0:
            resume += 1
            p, t = star, resume
        else:
            return False
    while p < n and pattern[p] == "*":
        p += 1
    return p == n


def _alternative_matches(alt: Alternative, key: str) -> bool:
    if alt.op == "eq":
        return key == alt.low
    if alt.op == "glob":
        assert alt.low is not None
        return glob_matches(alt.low, key)
    if alt.op == "empty":
        return False  # the candidate has a value
    return (alt.low is None or key >= alt.low) and (alt.high is None or key <= alt.high)


def matches(query_value: object, vr: str, candidate_value: object) -> bool:
    """Whether a candidate attribute value matches a key attribute value
    (PS3.4 §C.2.2.2; see the module docstring). `candidate_value` may be None,
    a str (backslash-separated values), a list/MultiValue, a number or a PersonName."""
    return parse_query(vr, query_value).match_keys(candidate_keys(vr, candidate_value))


# -- SQL ----------------------------------------------------------------------------


def _glob_escape(pattern: str) -> str:
    """A DICOM ``*``/``?`` pattern as an SQLite GLOB pattern: ``[`` is GLOB's only
    other special character and is written as the class ``[[]``."""
    return pattern.replace("[", "[[]")


def _like_pattern(pattern: str) -> str:
    """A DICOM ``*``/``?`` pattern as a LIKE pattern with ``\\`` as its escape
    character: ``%``, ``_`` and ``\\`` stand for themselves."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


@dataclass(frozen=True, slots=True)
class SqlDialect:
    """What differs between the SQL of the index's databases, for matching: the
    placeholder, the wild card test (case-sensitive in both: PN keys are lower case
    already), and how a JSON array of keys is read as rows of one ``value`` column.
    Range and exact matching compare strings in code point order: SQLite's default,
    PostgreSQL's ``COLLATE "C"``, which the columns matched on must have."""

    name: str
    placeholder: str
    glob: str  # "{column} ... {p}": true when the column matches the pattern parameter
    glob_pattern: Callable[[str], str]  # a DICOM pattern as that parameter
    json_rows: str  # "... {array} ... {alias}": a FROM item `alias` with a column value

    def sql(self, text: str) -> str:
        """`text`, written with ``?`` placeholders (and no other question mark), in this
        dialect."""
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)


SQLITE = SqlDialect(
    "sqlite", "?", "{column} GLOB {p}", _glob_escape, "json_each({array}) AS {alias}"
)
POSTGRESQL = SqlDialect(
    "postgresql",
    "%s",
    "{column} LIKE {p} ESCAPE '\\'",
    _like_pattern,
    "jsonb_array_elements_text(({array})::jsonb) AS {alias}(value)",
)


def _conditions(
    column: str, parsed: ParsedQuery, dialect: SqlDialect
) -> tuple[list[str], list[str]]:
    p = dialect.placeholder
    sql: list[str] = []
    params: list[str] = []
    exact = [alt.low for alt in parsed.alternatives if alt.op == "eq" and alt.low is not None]
    if len(exact) == 1:
        sql.append(f"{column} = {p}")
        params.append(exact[0])
    elif len(exact) <= _MAX_INLINE_VALUES and exact:
        sql.append(f"{column} IN ({', '.join([p] * len(exact))})")
        params.extend(exact)
    elif exact:
        rows = dialect.json_rows.format(array=p, alias="_list")
        sql.append(f"{column} IN (SELECT _list.value FROM {rows})")
        params.append(json.dumps(exact, ensure_ascii=False))
    for alt in parsed.alternatives:
        if alt.op == "glob":
            assert alt.low is not None
            sql.append(dialect.glob.format(column=column, p=p))
            params.append(dialect.glob_pattern(alt.low))
        elif alt.op == "range":
            ends: list[str] = []
            if alt.low is not None:
                ends.append(f"{column} >= {p}")
                params.append(alt.low)
            if alt.high is not None:
                ends.append(f"{column} <= {p}")
                params.append(alt.high)
            sql.append("(" + " AND ".join(ends) + ")")
    return sql, params


def sql_condition(
    column: str,
    vr: str,
    query_value: object,
    *,
    multi_valued: bool = False,
    keyword: str = "",
    dialect: SqlDialect = SQLITE,
) -> SqlCondition | None:
    """A WHERE fragment matching the key attribute value `query_value` of VR `vr`
    against `column` (any SQL expression), or None for Universal Matching (no
    condition: every row matches, the attribute is only returned).

    `column` must hold the candidates' `match_key` (NULL for no value; ``''`` is
    taken as no value too), or, with `multi_valued`, a JSON array of their keys
    (`json_keys`), in which case a row matches when any of its values does.
    `keyword` only names the attribute in a `MatchError`; `dialect` is the database's
    (`SQLITE` or `POSTGRESQL`)."""
    parsed = parse_query(vr, query_value, keyword)
    if parsed.universal:
        return None
    return sql_condition_of(column, parsed, multi_valued=multi_valued, dialect=dialect)


def _any(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"


def sql_condition_of(
    column: str, parsed: ParsedQuery, *, multi_valued: bool = False, dialect: SqlDialect = SQLITE
) -> SqlCondition:
    """`sql_condition` of an already parsed, not universal key value."""
    parts: list[str] = []
    params: list[str] = []
    valued = parsed.without_empty()
    if valued is not None:
        target = "_mv.value" if multi_valued else column
        conditions, params = _conditions(target, valued, dialect)
        sql = _any(conditions)
        if multi_valued:
            rows = dialect.json_rows.format(array=column, alias="_mv")
            sql = f"EXISTS (SELECT 1 FROM {rows} WHERE {sql})"
        parts.append(sql)
    if parsed.has_empty:
        parts.append(f"({column} IS NULL OR {column} = '')")
    return SqlCondition(_any(parts), tuple(params))


# -- sequences (PS3.4 §C.2.2.2.6) ----------------------------------------------------------


def copy_dataset(dataset: Dataset) -> Dataset:
    """A deep copy of `dataset` with every value decoded (no raw elements left, so it
    can be encoded with any Specific Character Set)."""
    out = Dataset()
    for elem in dataset:  # iterating converts raw elements with the right encoding
        if elem.VR == "SQ":
            items = DicomSequence([copy_dataset(item) for item in elem.value])
            out.add(DataElement(elem.tag, "SQ", items))
        else:
            out.add(DataElement(elem.tag, elem.VR, elem.value))
    return out


def _all_universal(item: Dataset) -> bool:
    for elem in item:
        if elem.VR == "SQ":
            if elem.value and not _all_universal(elem.value[0]):
                return False
        elif not parse_query(elem.VR, elem.value).universal:
            return False
    return True


def match_sequence(
    query: Sequence[Dataset] | None, candidate: Sequence[Dataset] | None
) -> list[Dataset] | None:
    """Sequence Matching (PS3.4 §C.2.2.2.6): the candidate's items that match the
    single item of the key sequence, each holding only the requested attributes,
    or None if the candidate does not match.

    A key sequence without items, or with an empty item, matches every candidate and
    returns its whole sequence. A key item whose keys are all universal matches
    even a candidate without items. Every item key is matched with `matches`, item
    keys of VR SQ recursively."""
    items = list(candidate or [])
    if not query or len(query[0]) == 0:
        return [copy_dataset(item) for item in items]
    key_item = query[0]
    result: list[Dataset] = []
    for item in items:
        out = Dataset()
        for key in key_item:
            found = item.get(key.tag)
            if key.VR == "SQ":
                values = found.value if found is not None and found.VR == "SQ" else None
                sub = match_sequence(key.value, values)
                if sub is None:
                    break
                out.add(DataElement(key.tag, "SQ", DicomSequence(sub)))
                continue
            if not matches(key.value, key.VR, None if found is None else found.value):
                break
            if found is None:
                out.add(DataElement(key.tag, key.VR, None))
            else:
                out.add(DataElement(found.tag, found.VR, found.value))
        else:
            result.append(out)
    if result or _all_universal(key_item):
        return result
    return None
