"""The values the index stores, read from data sets and from stored files: quickly from the
file's first bytes when its head allows, else through pydicom. See `dicomnet.pacs.index`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

from dicomnet.pacs.combined import (
    CombinedRange,
    combined_matches,
)
from dicomnet.pacs.index_schema import (
    STORED_TAG_SET,
    TEXT_VRS,
)
from dicomnet.pacs.matching import (
    match_key,
    normalize,
)
from dicomnet.proto.codec import UNSCANNED_TRANSFER_SYNTAXES, part10_meta, top_level_values

__all__ = [
    "META_KEYWORDS",
    "NeedsPydicom",
    "RawTexts",
    "encodable",
    "from_text",
    "has_non_ascii",
    "pairs_match",
    "quick_values",
    "stored_text",
    "walk_files",
]

# -- values ---------------------------------------------------------------------------------


def stored_text(
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


META_KEYWORDS = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
_META_TAGS = {
    0x00020002: META_KEYWORDS[0],
    0x00020003: META_KEYWORDS[1],
    0x00020010: META_KEYWORDS[2],
}
_STORED_TAG_INTS = frozenset(int(tag) for tag in STORED_TAG_SET)
# Bytes read from the start of a file to index it without pydicom; more is left to pydicom.
_QUICK_FIRST = 16 << 10
_QUICK_HEAD = 256 << 10


class NeedsPydicom(Exception):
    """A value the quick path does not read exactly as pydicom would."""


def _read(fd: int, size: int) -> bytes:
    """Up to `size` bytes from `fd`: fewer only at the end of the file."""
    chunks = []
    while size > 0 and (chunk := os.read(fd, size)):
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def quick_values(path: str) -> tuple[dict[int, bytes], dict[str, str], int] | None:
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


class RawTexts:
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
    """What `stored_text` gives for an attribute read by pydicom, from its raw value; raises
    `NeedsPydicom` for what only pydicom reads right (other character sets, odd IS)."""
    try:
        value = raw.decode("ascii")
    except UnicodeDecodeError:
        raise NeedsPydicom from None
    items = value.rstrip(" \x00").split("\\")
    if any(item.startswith(" ") for item in items):
        raise NeedsPydicom  # pydicom's own stripping differs from VR to VR
    if vr == "IS":
        if items == [""]:
            return "", None  # pydicom reads an empty IS as None
        if not all(item.rstrip().isdigit() and item.rstrip() == str(int(item)) for item in items):
            raise NeedsPydicom  # only plain digits: pydicom has its own view of the rest
    texts = [normalize(vr, item) for item in items]
    text = "\\".join(texts).rstrip("\\")
    return text, match_key(vr, texts[0])


def from_text(vr: str, text: str | None) -> object:
    if text is None or text == "":
        return None
    if "\\" in text and vr not in ("LT", "ST", "UT", "UR"):
        return text.split("\\")
    return text


def pairs_match(pairs: list[tuple[int, int, CombinedRange]], response: Dataset) -> bool:
    """Whether each combined date-time range holds the response's date and time."""
    for date_tag, time_tag, span in pairs:
        date, time = response.get(date_tag), response.get(time_tag)
        date_value = None if date is None else date.value
        time_value = None if time is None else time.value
        if not combined_matches(span, date_value, time_value):
            return False
    return True


def has_non_ascii(dataset: Dataset) -> bool:
    for elem in dataset.iterall():
        if elem.VR not in TEXT_VRS or elem.value is None:
            continue
        values = elem.value if isinstance(elem.value, (MultiValue, list)) else [elem.value]
        for value in values:
            if isinstance(value, (str, PersonName)) and not str(value).isascii():
                return True
    return False


def encodable(dataset: Dataset, charset: list[str]) -> bool:
    """True if every text value of `dataset` can be written in the single-byte,
    non-ISO 2022 character set `charset`."""
    if len(charset) != 1 or charset[0].startswith("ISO 2022") or charset[0] not in python_encoding:
        return False
    codec = python_encoding[charset[0]]
    for elem in dataset.iterall():
        if elem.VR not in TEXT_VRS or elem.value is None:
            continue
        values = elem.value if isinstance(elem.value, (MultiValue, list)) else [elem.value]
        for value in values:
            try:
                str(value).encode(codec)
            except (UnicodeEncodeError, LookupError):
                return False
    return True


def walk_files(folder: Path) -> Iterator[Path]:
    """``*.dcm`` files under `folder`, skipping hidden folders and files (``.tmp``)."""
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.lower().endswith(".dcm") and not name.startswith("."):
                yield Path(current, name)
