"""Modality Worklist matching (PS3.4 Annex K) on pydicom data sets, whatever holds them.

A C-FIND identifier of the Modality Worklist Information Model - FIND
(1.2.840.10008.5.1.4.31, PS3.4 §K.6.1) is parsed once (`WorklistQuery.parse`); then
`query.match(item)` says whether one worklist item matches and builds its response
identifier. Each key is matched with `dicomnet.pacs.matching` (PS3.4 §C.2.2.2, the
matching kinds §K.2.2.2 names):

- Single Value, Universal, Wild Card (AE, CS, LO, PN, SH, ...; PN insensitive to case),
  Range (DA, TM, DT) and List of UID Matching, at the top level and inside sequence items.
- An item whose value is absent or empty fails every key that is not universal
  (§K.2.2.1.1.1); a key of only ``*`` is universal and matches it (its note 1).
- Sequence Matching (§C.2.2.2.6), e.g. the Scheduled Procedure Step Sequence (0040,0100):
  the key sequence's first item holds the item keys; a candidate matches when one of its
  items matches them all, and the response's sequence holds each matching item with only
  the keys asked. A key sequence without items, or with an empty item, returns the whole
  sequence (§K.2.2.1.2 note 4). A key item whose keys are all universal matches a
  candidate without the sequence (its return keys come back as an empty sequence).
- Combined date and time: in one data set (the identifier or a key item), a Scheduled
  Procedure Step Start Date (0040,0002) and Start Time (0040,0003) that are both
  non-universal are matched as one date-time range, as §C.2.2.2.5 matches a DA/TM pair
  with combined datetime matching: ``20261201-20261202`` with ``2200-0200`` is from
  2026-12-01 22:00 to 2026-12-02 02:00:59.999999, across midnight. A single value is the
  range from itself to itself; an open end leaves that side open. Likewise the End Date
  and Time (0040,0004 / 0040,0005).

Responses (§K.2.2.1.2): every key of the identifier, matching or return key, comes back
with the item's value; one the item lacks comes back empty, as a Type 2 attribute
(PS3.5 §7.4.3). Specific Character Set (0008,0005) is not matched (§C.2.2.2): the response
is in the identifier's character set when that encodes it, else in ISO_IR 192 (UTF-8).
Query/Retrieve Level (0008,0052), which a worklist identifier does not carry, is ignored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from dicomnet.pacs.index import QueryError
from dicomnet.pacs.matching import (
    MatchError,
    ParsedQuery,
    candidate_keys,
    copy_dataset,
    parse_query,
)

__all__ = [
    "DATE_TIME_PAIRS",
    "DateTimeRange",
    "Key",
    "KeyItem",
    "WorklistQuery",
    "match_item",
]

#: Date and time keys matched together as one range, when both are given.
DATE_TIME_PAIRS: tuple[tuple[int, int], ...] = (
    (0x00400002, 0x00400003),  # Scheduled Procedure Step Start Date, Start Time
    (0x00400004, 0x00400005),  # Scheduled Procedure Step End Date, End Time
)
UTF8 = "ISO_IR 192"
UNABLE_TO_PROCESS = 0xC000  # the C-FIND failure status "Unable to process"

_SPECIFIC_CHARACTER_SET = 0x00080005
_QUERY_RETRIEVE_LEVEL = 0x00080052
_DAY_START = "000000.000000"  # match keys of TM (see matching.match_key)
_DAY_END = "235959.999999"
_TEXT_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})


@dataclass(frozen=True, slots=True)
class DateTimeRange:
    """A date key and a time key matched as one range: `low` and `high` are
    ``YYYYMMDDHHMMSS.FFFFFF`` (inclusive), None where the range is open."""

    date_tag: int
    time_tag: int
    low: str | None
    high: str | None

    def matches(self, candidate: Dataset) -> bool:
        moment = _moment(candidate, self.date_tag, self.time_tag)
        if moment is None:  # no date or no time: an unknown value (§K.2.2.1.1.1)
            return False
        return (self.low is None or self.low <= moment) and (
            self.high is None or moment <= self.high
        )


@dataclass(frozen=True, slots=True)
class Key:
    """One key attribute: `query` is None for a key that is only returned (universal,
    or matched by a `DateTimeRange`); `item` holds a sequence key's item keys (None
    for a sequence key without them: the whole sequence is returned)."""

    tag: int
    vr: str
    query: ParsedQuery | None = None
    item: KeyItem | None = None


@dataclass(frozen=True, slots=True)
class KeyItem:
    """The keys of one data set: the identifier, or the item of a sequence key."""

    keys: tuple[Key, ...]
    ranges: tuple[DateTimeRange, ...] = ()

    @property
    def universal(self) -> bool:
        """True if every candidate matches (only return keys, at every depth)."""
        return not self.ranges and all(
            key.query is None and (key.item is None or key.item.universal) for key in self.keys
        )

    def match(self, candidate: Dataset) -> Dataset | None:
        """The response for `candidate` (the keys, filled from it), or None if it
        does not match."""
        if not all(each.matches(candidate) for each in self.ranges):
            return None
        out = Dataset()
        for key in self.keys:
            found = candidate.get(key.tag)
            if key.vr == "SQ":
                items = _match_sequence(key, found)
                if items is None:
                    return None
                out.add(DataElement(key.tag, "SQ", DicomSequence(items)))
                continue
            value = None if found is None else found.value
            if key.query is not None and not key.query.match_keys(candidate_keys(key.vr, value)):
                return None
            out.add(DataElement(key.tag, key.vr if found is None else found.VR, value))
        return out


@dataclass(frozen=True, slots=True)
class WorklistQuery:
    """A parsed worklist identifier; `charset` its Specific Character Set values."""

    keys: KeyItem
    charset: tuple[str, ...] = ()

    @classmethod
    def parse(cls, identifier: Dataset) -> WorklistQuery:
        """Raises the index's `QueryError` (0xC000, Unable to process) for a key value
        that cannot be matched, e.g. a date range that is not one."""
        charset = identifier.get(_SPECIFIC_CHARACTER_SET)
        values = () if charset is None else _strings(charset.value)
        return cls(_parse_item(identifier), tuple(v.strip() for v in values if v.strip()))

    def match(self, item: Dataset) -> Dataset | None:
        """The response identifier for worklist `item`, or None if it does not match."""
        out = self.keys.match(item)
        if out is not None:
            charset = _response_charset(out, self.charset)
            if charset:
                out.SpecificCharacterSet = charset[0] if len(charset) == 1 else list(charset)
        return out


def match_item(identifier: Dataset, item: Dataset) -> Dataset | None:
    """`WorklistQuery.parse(identifier).match(item)`, for one item."""
    return WorklistQuery.parse(identifier).match(item)


# -- parsing ----------------------------------------------------------------------------


def _parse_item(dataset: Dataset) -> KeyItem:
    keys = {int(elem.tag): _parse_key(elem) for elem in dataset if _is_key(int(elem.tag))}
    ranges: list[DateTimeRange] = []
    for date_tag, time_tag in DATE_TIME_PAIRS:
        if date_tag not in keys or time_tag not in keys:
            continue
        combined = _date_time_range(keys[date_tag], keys[time_tag])
        if combined is not None:
            ranges.append(combined)
            keys[date_tag] = replace(keys[date_tag], query=None)
            keys[time_tag] = replace(keys[time_tag], query=None)
    return KeyItem(tuple(keys.values()), tuple(ranges))


def _is_key(tag: int) -> bool:
    """Not a command, file meta or group length element, nor one that is never matched."""
    return tag >> 16 > 0x0002 and tag & 0xFFFF != 0 and tag not in _NOT_KEYS


_NOT_KEYS = frozenset({_SPECIFIC_CHARACTER_SET, _QUERY_RETRIEVE_LEVEL})


def _parse_key(elem: DataElement) -> Key:
    tag = int(elem.tag)
    if elem.VR == "SQ":
        item = _parse_item(elem.value[0]) if elem.value else None
        return Key(tag, "SQ", item=item if item is not None and item.keys else None)
    try:
        parsed = parse_query(elem.VR, elem.value, elem.keyword)
    except MatchError as exc:
        raise QueryError(UNABLE_TO_PROCESS, str(exc), (tag,)) from None
    return Key(tag, elem.VR, None if parsed.universal else parsed)


def _date_time_range(date: Key, time: Key) -> DateTimeRange | None:
    """The combined range of a date key and a time key, or None unless both match
    one range (or single value) each."""
    if date.query is None or time.query is None:
        return None
    if (date.query.vr, time.query.vr) != ("DA", "TM"):
        return None
    if len(date.query.alternatives) != 1 or len(time.query.alternatives) != 1:
        return None
    day, clock = date.query.alternatives[0], time.query.alternatives[0]
    low = None if day.low is None else day.low + (clock.low or _DAY_START)
    high = None if day.high is None else day.high + (clock.high or _DAY_END)
    return DateTimeRange(date.tag, time.tag, low, high)


# -- candidates -------------------------------------------------------------------------


def _moment(candidate: Dataset, date_tag: int, time_tag: int) -> str | None:
    """The candidate's date and time as one ``YYYYMMDDHHMMSS.FFFFFF``, or None."""
    date, time = candidate.get(date_tag), candidate.get(time_tag)
    days = candidate_keys("DA", None if date is None else date.value)
    clocks = candidate_keys("TM", None if time is None else time.value)
    if not days or not clocks:
        return None
    moment = days[0] + clocks[0]
    valid = len(moment) == 21 and moment[14] == "." and moment.replace(".", "").isdigit()
    return moment if valid else None


def _match_sequence(key: Key, found: DataElement | None) -> list[Dataset] | None:
    """Sequence Matching (§C.2.2.2.6): the response items, or None for no match."""
    items = list(found.value) if found is not None and found.VR == "SQ" else []
    if key.item is None:
        return [copy_dataset(item) for item in items]
    matched = [out for out in map(key.item.match, items) if out is not None]
    if matched or key.item.universal:
        return matched
    return None


# -- character sets (PS3.4 §C.2.2.2, PS3.5 §6.1) -------------------------------------------


def _response_charset(out: Dataset, requested: tuple[str, ...]) -> tuple[str, ...]:
    """The Specific Character Set values of a response: the requested ones if they
    encode every text in it, UTF-8 if they do not; none for plain ASCII asked in none."""
    wide = [text for text in _texts(out) if not text.isascii()]
    if not wide or _encodes(requested, wide):
        return requested
    return (UTF8,)


def _encodes(charset: tuple[str, ...], texts: list[str]) -> bool:
    """True if the single, non-ISO 2022 character set `charset` encodes every text."""
    codec = python_encoding.get(charset[0]) if len(charset) == 1 else None
    if codec is None or charset[0].startswith("ISO 2022"):
        return False
    try:
        for text in texts:
            text.encode(codec)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _texts(dataset: Dataset) -> Iterator[str]:
    for elem in dataset.iterall():
        if elem.VR in _TEXT_VRS and elem.value is not None:
            yield from _strings(elem.value)


def _strings(value: object) -> list[str]:
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value]
    return [str(value)]
