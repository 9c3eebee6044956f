"""Fast encoding and decoding of flat data sets in the little endian transfer syntaxes.

Most DIMSE traffic besides images is small identifiers: a C-FIND request and thousands of
pending responses, each a flat list of text elements (PS3.4 §C.4.1.1.3). pydicom's general
reader and writer spend most of their time on machinery these do not need, so this module
handles the common case directly and returns None for anything else, which the callers in
`dicomnet.storage` then give to pydicom:

- encoding (PS3.5 §7.1.2, §7.1.3): text values that are ASCII, binary numbers, OB/UN bytes
  and raw elements already in little endian; not sequences, ambiguous VRs or values pydicom
  would have to convert. ASCII text encodes the same in every character set of PS3.3
  §C.12.1.1.2, so the data set's Specific Character Set does not matter here.
- decoding: elements of defined length with a known VR (or implicit VR); not sequences or
  undefined lengths. The result is the same `Dataset` of raw elements pydicom's
  `read_dataset` builds, with the same original encoding.
- the head of a Part-10 file (PS3.10 §7.1): its file meta and the SOP Class and Instance
  UIDs at the start of its data set, which is all an SCU needs to send it.

Both produce exactly what pydicom would; a property test checks it.
"""

from __future__ import annotations

from collections.abc import MutableSequence
from struct import Struct
from typing import Any, cast

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import (
    DataElement,
    RawDataElement,
    convert_raw_data_element,
    empty_value_for_VR,
)
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

__all__ = [
    "UNSCANNED_TRANSFER_SYNTAXES",
    "decode_flat",
    "encode_flat",
    "part10_meta",
    "scan_part10_head",
    "top_level_values",
]

_TAG = Struct("<HH")
_TAG_LENGTH32 = Struct("<HHL")  # implicit VR: tag, 4-byte length
_SHORT_HEADER = Struct("<HH2sH")  # explicit VR, 2-byte length
_LONG_HEADER = Struct("<HH2s2xL")  # explicit VR, reserved 2 bytes, 4-byte length
_U16 = Struct("<H")
_U32 = Struct("<L")

# PS3.5 §7.1.2: explicit VRs with a 4-byte length.
_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_LONG_VR_BYTES = frozenset(vr.encode() for vr in _LONG_VRS)
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UR", "UT"}
)
_NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d"}
_KNOWN_VR_BYTES = frozenset(
    vr.encode()
    for vr in (
        "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI "
        "UL UN UR US UT UV"
    ).split()
)
_SPECIFIC_CHARACTER_SET = 0x00080005


class _Unsupported(Exception):
    """The data set needs pydicom."""


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, MultiValue | list | tuple) and all(isinstance(v, str) for v in value):
        return "\\".join(value)
    raise _Unsupported


def _number_string(value: Any) -> str:
    # As pydicom writes IS and DS: the original string when there is one (PS3.5 §6.2).
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(getattr(v, "original_string", None) or str(v) for v in value)
    if isinstance(value, str | int | float):
        original = getattr(value, "original_string", None)
        return original if isinstance(original, str) else str(value)
    raise _Unsupported


def _person_name(value: Any) -> bytes:
    values = value if isinstance(value, MultiValue | list | tuple) else [value]
    parts: list[bytes] = []
    for v in values:
        if isinstance(v, PersonName):
            original = v.original_string
            parts.append(original if original is not None else str(v).encode("ascii"))
        elif isinstance(v, str):
            parts.append(v.encode("ascii"))
        else:
            raise _Unsupported
    return b"\\".join(parts)


def _value_bytes(vr: str, value: Any) -> bytes:
    """The encoded, padded value of a (non-raw) element, PS3.5 §6.2."""
    if value is None or (isinstance(value, str | bytes | MultiValue | list | tuple) and not value):
        return b""
    if vr in _TEXT_VRS:
        data = _text(value).encode("ascii")
    elif vr == "PN":
        data = _person_name(value)
    elif vr == "UI":
        data = _text(value).encode("ascii")
        return data + b"\x00" if len(data) % 2 else data
    elif vr in ("IS", "DS"):
        data = _number_string(value).encode("ascii")
    elif vr in _NUMBER_FORMATS:
        fmt = _NUMBER_FORMATS[vr]
        if isinstance(value, MultiValue | list | tuple):
            numbers = list(value)
        else:
            numbers = [value]
        if not all(type(n) in (int, float) for n in numbers):
            raise _Unsupported
        return Struct(f"<{len(numbers)}{fmt}").pack(*numbers)
    elif vr in ("OB", "UN"):
        if not isinstance(value, bytes):
            raise _Unsupported
        return value + b"\x00" if len(value) % 2 else value
    else:
        raise _Unsupported
    return data + b" " if len(data) % 2 else data


def _element(tag: int, element: Any, implicit: bool, raw_ok: bool) -> list[bytes]:
    if element.is_raw:
        vr = element.VR
        value = element.value
        if value is None and element.length == 0:
            value = b""  # an empty value read without a VR
        if (
            not raw_ok
            or not element.is_little_endian
            or element.length == 0xFFFFFFFF
            or value is None  # deferred: not read
            or len(value) % 2
            or vr == "SQ"
            or (vr is None and not implicit)
        ):
            raise _Unsupported
    else:
        vr = element.VR
        if vr == "SQ" or len(vr) != 2 or element.is_buffered or element.is_undefined_length:
            raise _Unsupported
        value = _value_bytes(vr, element.value)
    group, number = tag >> 16, tag & 0xFFFF
    length = len(value)
    if implicit:
        return [_TAG_LENGTH32.pack(group, number, length), value]
    if vr in _LONG_VRS:
        return [_LONG_HEADER.pack(group, number, vr.encode(), length), value]
    if length > 0xFFFF:
        raise _Unsupported
    return [_SHORT_HEADER.pack(group, number, vr.encode(), length), value]


def encode_flat(dataset: Dataset, implicit: bool) -> bytes | None:
    """`dataset` in implicit or explicit VR little endian, or None if pydicom must do it."""
    parts: list[bytes] = []
    raw_ok: bool | None = None
    try:
        for tag, element in sorted(dataset.items()):
            if not tag & 0xFFFF and tag >> 16 > 6:
                continue  # retired group lengths are not written (PS3.5 §7.2)
            if raw_ok is None and element.is_raw:
                # Raw values are written as they are unless the character set changed.
                raw_ok = dataset.original_character_set == getattr(dataset, "_character_set", None)
            parts += _element(tag, element, implicit, bool(raw_ok))
    except (_Unsupported, UnicodeEncodeError):
        return None
    return b"".join(parts)


def decode_flat(data: bytes, implicit: bool) -> Dataset | None:
    """`data` (little endian) as a `Dataset` of raw elements, or None if pydicom must do it."""
    elements: dict[BaseTag, RawDataElement | DataElement] = {}
    end = len(data)
    position = 0
    long_vrs = _LONG_VR_BYTES
    known_vrs = _KNOWN_VR_BYTES
    while position < end:
        vr: str | None
        if implicit:
            if position + 8 > end:
                return None
            group, number, length = _TAG_LENGTH32.unpack_from(data, position)
            start = position + 8
            vr = None
        else:
            if position + 8 > end:
                return None
            group, number, vr_bytes, length = _SHORT_HEADER.unpack_from(data, position)
            if vr_bytes in long_vrs:
                if position + 12 > end:
                    return None
                length = _U32.unpack_from(data, position + 8)[0]
                start = position + 12
            elif vr_bytes in known_vrs:
                start = position + 8
            else:
                return None  # not explicit VR after all, or an unknown VR
            vr = vr_bytes.decode()
            if vr == "SQ":
                return None
        if length == 0xFFFFFFFF or group == 0xFFFE:
            return None
        stop = start + length
        if stop > end:
            return None
        tag = BaseTag(group << 16 | number)
        value = data[start:stop] if length else cast(bytes | None, empty_value_for_VR(vr, raw=True))
        elements[tag] = RawDataElement(tag, vr, length, value, start, implicit, True)
        position = stop
    dataset = Dataset(elements)
    encoding: str | MutableSequence[str] = default_encoding
    charset = elements.get(BaseTag(_SPECIFIC_CHARACTER_SET))
    if isinstance(charset, RawDataElement):
        encoding = convert_encodings(convert_raw_data_element(charset).value)
    dataset.set_original_encoding(implicit, True, encoding)
    return dataset


_IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
# Transfer syntaxes the scanners leave to pydicom: deflated, big endian.
UNSCANNED_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")


def _uid(value: bytes) -> str | None:
    try:
        return value.rstrip(b"\x00 ").decode("ascii")
    except UnicodeDecodeError:
        return None


def _element_at(head: bytes, position: int, implicit: bool) -> tuple[int, int, int] | None:
    """(tag, value start, value length) of the element at `position`, if it is all there."""
    header = _header_at(head, position, implicit)
    if header is None:
        return None
    start, length = header
    if length == 0xFFFFFFFF or start + length > len(head):
        return None
    group, number = _TAG.unpack_from(head, position)
    return group << 16 | number, start, length


def scan_part10_head(head: bytes) -> tuple[str, str, str, int] | None:
    """(Transfer Syntax UID, SOP Class UID, SOP Instance UID, offset of the data set) from
    the first bytes of a Part-10 file, or None if pydicom must read it.

    The UIDs come from (0008,0016) and (0008,0018) of the data set, else from the file
    meta's (0002,0002) and (0002,0003), as pydicom's reading of the same file gives them.
    """
    file_meta = part10_meta(head)
    if file_meta is None:
        return None
    raw_meta, position = file_meta
    meta = {
        tag: _uid(raw_meta[tag]) for tag in (0x00020002, 0x00020003, 0x00020010) if tag in raw_meta
    }
    offset = position
    transfer_syntax = meta.get(0x00020010)
    if not transfer_syntax or transfer_syntax in UNSCANNED_TRANSFER_SYNTAXES:
        return None
    implicit = transfer_syntax == _IMPLICIT_VR_LITTLE_ENDIAN
    sop: dict[int, str | None] = {}
    while True:  # the data set, up to (0008,0018)
        if position + 4 <= len(head) and _TAG.unpack_from(head, position) > (0x0008, 0x0018):
            break
        found = _element_at(head, position, implicit)
        if found is None:
            return None
        tag, start, length = found
        if tag in (0x00080016, 0x00080018):
            sop[tag] = _uid(head[start : start + length])
        position = start + length
        if tag == 0x00080018:
            break
    if None in meta.values() or None in sop.values():
        return None  # a UID that is not ASCII: let pydicom make of it what it can
    sop_class = sop.get(0x00080016) or meta.get(0x00020002)
    sop_instance = sop.get(0x00080018) or meta.get(0x00020003)
    if not sop_class or not sop_instance:
        return None
    return transfer_syntax, sop_class, sop_instance, offset


def part10_meta(head: bytes) -> tuple[dict[int, bytes], int] | None:
    """The file meta elements of a Part-10 file's first bytes (tag -> raw value) and the
    offset of its data set (PS3.10 §7.1), or None if they are not all there or odd."""
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    meta: dict[int, bytes] = {}
    position = 132
    end = len(head)
    while position + 2 <= end and _U16.unpack_from(head, position)[0] == 2:
        # Explicit VR little endian (PS3.5 §7.1.2), unpacked in place: this runs for every
        # file the index reads.
        if position + 8 > end:
            return None
        group, number, vr, length = _SHORT_HEADER.unpack_from(head, position)
        if vr in _LONG_VR_BYTES:
            if position + 12 > end:
                return None
            start = position + 12
            length = _U32.unpack_from(head, position + 8)[0]
        elif vr in _KNOWN_VR_BYTES:
            start = position + 8
        else:
            return None
        if length == 0xFFFFFFFF or start + length > end:
            return None
        meta[group << 16 | number] = head[start : start + length]
        position = start + length
    if position + 2 > end:
        return None
    return meta, position


def _header_at(data: bytes, position: int, implicit: bool) -> tuple[int, int] | None:
    """(value start, value length) of the element at `position`; the value may run past
    the end of `data`. None if the header itself is not all there or has an unknown VR."""
    end = len(data)
    if position + 8 > end:
        return None
    if implicit:
        return position + 8, _U32.unpack_from(data, position + 4)[0]
    vr = data[position + 4 : position + 6]
    if vr in _LONG_VR_BYTES:
        if position + 12 > end:
            return None
        return position + 12, _U32.unpack_from(data, position + 8)[0]
    if vr in _KNOWN_VR_BYTES:
        return position + 8, _U16.unpack_from(data, position + 6)[0]
    return None


_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_DEPTH = 32


def _skip_sequence(data: bytes, position: int, implicit: bool, depth: int) -> int | None:
    """The position after an undefined-length sequence whose items start at `position`
    (PS3.5 §7.5), or None if it does not end within `data`."""
    if depth > _MAX_DEPTH:
        return None
    while position + 8 <= len(data):
        group, number, length = _TAG_LENGTH32.unpack_from(data, position)
        tag = group << 16 | number
        position += 8
        if tag == _SEQUENCE_END:
            return position
        if tag != _ITEM:
            return None
        if length != 0xFFFFFFFF:
            position += length
            continue
        # An item of undefined length: its elements up to the item delimiter.
        while True:
            if position + 8 > len(data):
                return None
            group, number = _TAG.unpack_from(data, position)
            if group << 16 | number == _ITEM_END:
                position += 8
                break
            header = _header_at(data, position, implicit)
            if header is None:
                return None
            start, value_length = header
            if value_length == 0xFFFFFFFF:
                after = _skip_sequence(data, start, implicit, depth + 1)
                if after is None:
                    return None
                position = after
            else:
                position = start + value_length
    return None


def top_level_values(
    data: bytes, position: int, implicit: bool, wanted: frozenset[int], complete: bool
) -> dict[int, bytes] | None:
    """The raw values of the `wanted` top-level elements of the little endian data set at
    `position`, reading no further than the last of them; sequences are skipped whatever
    their length. `complete`: `data` holds the whole data set. None if a needed part is
    not in `data` or looks odd (the caller then asks pydicom)."""
    last = max(wanted)
    found: dict[int, bytes] = {}
    end = len(data)
    while position < end:
        # Each element's header unpacked in place (no `_header_at`): this runs for every
        # element before the last wanted one, of every file the index reads.
        if position + 8 > end:
            if position + 4 > end:
                return None
            group, number = _TAG.unpack_from(data, position)
            return found if (group << 16 | number) > last else None
        if implicit:
            group, number, length = _TAG_LENGTH32.unpack_from(data, position)
            start = position + 8
        else:
            group, number, vr, length = _SHORT_HEADER.unpack_from(data, position)
            if vr in _LONG_VR_BYTES:
                if position + 12 > end:
                    return found if (group << 16 | number) > last else None
                start = position + 12
                length = _U32.unpack_from(data, position + 8)[0]
            elif vr in _KNOWN_VR_BYTES:
                start = position + 8
            else:
                start = -1  # an unknown VR: odd, unless past the last wanted element
        tag = group << 16 | number
        if tag > last:
            return found
        if group == 0xFFFE or start < 0:
            return None
        if length == 0xFFFFFFFF:
            after = _skip_sequence(data, start, implicit, 0)
            if after is None:
                return None
            position = after
            continue
        if start + length > end:
            return None
        if tag in wanted:
            found[tag] = data[start : start + length]
        position = start + length
    return found if complete and position == end else None
