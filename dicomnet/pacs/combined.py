"""Combined date-time Range Matching of a DA / TM key pair (PS3.4 §C.2.2.2.5.4).

When the SCU negotiated it (byte 2, "Date-time matching", of the C-FIND SOP Class
Extended Negotiation, PS3.4 §C.5.1.1), "a pair of Attributes that are of VR DA and
TM, both of which specify the same form of Range Matching, shall have the
concatenated string values of each Range Matching component matched as if they
were a single Attribute of VR DT": Study Date ``20060705-20060707`` with Study Time
``1000-1800`` is the period from 5 July 10:00 to 7 July 18:00, not 10:00-18:00 on
each of the three days. Without the negotiation the two keys are matched apart.

A pair is a DA key ``<X>Date`` and a TM key ``<X>Time`` (Study, Series, Content,
Acquisition, Patient Birth, ...). They combine when each is a single range
(``a-b``, ``a-`` or ``-b``) of the same form; otherwise they are matched apart.
The bounds keep the precision rules of `dicomnet.pacs.matching` (a range ends
where its last value ends: ``1800`` up to 18:00:59.999999). A candidate is the
point its date and time keys give together; a candidate without a time is taken
at the start of its date, one without a date does not match. Timezone Offset From
UTC is not applied (no timezone query adjustment).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dicomnet.pacs.matching import (
    SQLITE,
    MatchKind,
    ParsedQuery,
    SqlCondition,
    SqlDialect,
    candidate_keys,
)

__all__ = [
    "CombinedRange",
    "combined_key",
    "combined_matches",
    "combined_range",
    "combined_sql",
    "date_time_pairs",
]

#: The time of a candidate that has a date but no time: the start of its day.
_MIDNIGHT = "000000.000000"


@dataclass(frozen=True, slots=True)
class CombinedRange:
    """A date-time range on combined keys (``YYYYMMDDHHMMSS.FFFFFF``), an end
    being open when None."""

    low: str | None
    high: str | None


def date_time_pairs(keywords: Iterable[str]) -> list[tuple[str, str]]:
    """The (``<X>Date``, ``<X>Time``) keyword pairs among `keywords`."""
    present = set(keywords)
    return [
        (keyword, f"{keyword[:-4]}Time")
        for keyword in sorted(present)
        if keyword.endswith("Date") and f"{keyword[:-4]}Time" in present
    ]


def combined_range(date: ParsedQuery, time: ParsedQuery) -> CombinedRange | None:
    """The combined range of a parsed DA and TM key value, or None if they are not
    both a single range of the same form."""
    if date.kind is not MatchKind.RANGE or time.kind is not MatchKind.RANGE:
        return None
    (d,), (t,) = date.alternatives, time.alternatives
    if (d.low is None) != (t.low is None) or (d.high is None) != (t.high is None):
        return None
    low = None if d.low is None or t.low is None else d.low + t.low
    high = None if d.high is None or t.high is None else d.high + t.high
    return CombinedRange(low, high)


def combined_key(date_value: object, time_value: object) -> str | None:
    """The point a candidate's date and time values give (None without a date)."""
    dates = candidate_keys("DA", date_value)
    if not dates:
        return None
    times = candidate_keys("TM", time_value)
    return dates[0] + (times[0] if times else _MIDNIGHT)


def combined_matches(span: CombinedRange, date_value: object, time_value: object) -> bool:
    """Whether a candidate's date and time values fall in `span`."""
    key = combined_key(date_value, time_value)
    if key is None:
        return False
    return (span.low is None or key >= span.low) and (span.high is None or key <= span.high)


def combined_sql(
    span: CombinedRange, date_column: str, time_column: str, dialect: SqlDialect = SQLITE
) -> SqlCondition:
    """A WHERE fragment for `span` on columns holding the DA and TM match keys. The
    date alone is compared too, so that an index on `date_column` can be used."""
    point = f"({date_column} || COALESCE({time_column}, '{_MIDNIGHT}'))"
    p = dialect.placeholder
    parts: list[str] = []
    params: list[str] = []
    if span.low is not None:
        parts += [f"{date_column} >= {p}", f"{point} >= {p}"]
        params += [span.low[:8], span.low]
    if span.high is not None:
        parts += [f"{date_column} <= {p}", f"{point} <= {p}"]
        params += [span.high[:8], span.high]
    return SqlCondition("(" + " AND ".join(parts) + ")", tuple(params))
