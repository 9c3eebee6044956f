"""Walking a data set's structure without decoding it (PS3.5 §7): tags and lengths only.

`walk(source, implicit=, little=)` reads a data set from a `Source` (anything with
`read(n)` and `skip(n)`, so a spool file is walked by seeking past values, pixel data
included) and checks that it is a well-formed sequence of data elements:

- every element header is complete and, in explicit VR, has a VR of PS3.5 Table 6.2-1
  (§7.1.2); a value's length never runs past the end of the data, nor past the end of a
  sequence or item of defined length that holds it;
- an undefined length (§7.1.3) is used only for a sequence (SQ, an implicit VR element,
  or UN, whose content is then implicit VR little endian, §6.2.2) or for encapsulated
  pixel data (OB/OW, PS3.5 §A.4), and is closed by its delimiter; sequences hold items
  (FFFE,E000) only, items of undefined length end with (FFFE,E00D) (§7.5);
- nesting is at most `MAX_DEPTH` sequences deep.

In implicit VR, an element of defined length is walked into as a sequence when PS3.6 says
its tag is one (private sequences of defined length are skipped whole).

Values are not decoded, with two exceptions: the SOP Class UID (0008,0016) and SOP
Instance UID (0008,0018) of the top level are returned, for the SCP to compare with the
C-STORE request's (PS3.4 §B.2.3, status A900). Element order is not checked: some
modalities write elements out of order, and readers take them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from struct import Struct
from typing import Protocol

from pydicom._dicom_dict import DicomDictionary

from dicomnet.proto.contexts import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)

__all__ = [
    "MAX_DEPTH",
    "VR_NAMES",
    "ChunkSource",
    "InflatingSource",
    "MalformedDataset",
    "Source",
    "Walked",
    "walk",
    "walk_bytes",
    "walk_encoded",
]

MAX_DEPTH = 64  # sequences within sequences
UNDEFINED = 0xFFFFFFFF
VR_NAMES = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC "
    b"UI UL UN UR US UT UV".split()
)
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_SOP_CLASS_UID, _SOP_INSTANCE_UID = 0x00080016, 0x00080018
_MAX_UID_LENGTH = 256  # longer is no UID: skipped, not read
_CHUNK = 1 << 16  # bytes read from a source at a time
# In implicit VR a sequence of defined length is known by its tag (PS3.6): these are.
_SEQUENCE_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")

_HEADER = {True: Struct("<HHL"), False: Struct(">HHL")}  # tag, 4-byte length / VR + 2
_SHORT = {True: Struct("<H"), False: Struct(">H")}
_EXPLICIT_SHORT = Struct("<HH2sH")  # tag, VR, 2-byte length (little endian)
_LONG = {True: Struct("<L"), False: Struct(">L")}

# What a frame of the walk holds.
_DATASET, _SEQUENCE, _FRAGMENTS = 0, 1, 2


class MalformedDataset(ValueError):
    """The data set's structure does not parse; the message says where and why."""


class Source(Protocol):
    def read(self, size: int) -> bytes:
        """Up to `size` bytes: fewer only at the end of the data."""
        ...

    def skip(self, size: int) -> int:
        """Move on `size` bytes; how many there were (fewer only at the end)."""
        ...


@dataclass(frozen=True, slots=True)
class Walked:
    """What a walk found: the top-level SOP Class / Instance UIDs (None when absent),
    how many elements it crossed and the data set's length in bytes."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    elements: int
    length: int


@dataclass(slots=True)
class _Frame:
    kind: int
    end: int | None  # offset where it ends (defined length), or None (a delimiter ends it)
    implicit: bool
    little: bool
    item: bool = False  # an item's data set (may end with an item delimiter)


class _Walk:
    """The walk: headers are read from `buf` (refilled from the source a `_CHUNK` at a
    time, or the whole data set when given in memory), long values skipped in the source."""

    def __init__(self, source: Source, implicit: bool, little: bool, data: bytes = b"") -> None:
        self.source = source
        self.buf = data
        self.off = 0  # where the walk is in `buf`
        self.drained = bool(data)  # nothing more in the source than `buf`
        self.pos = 0  # where the walk is in the data set
        self.elements = 0
        self.uids: dict[int, str] = {}
        self.stack = [_Frame(_DATASET, None, implicit, little)]

    def fail(self, why: str) -> MalformedDataset:
        return MalformedDataset(f"{why} at byte {self.pos}")

    def fill(self, size: int) -> bool:
        """At least `size` bytes in `buf` from `off`; False if the data ends first."""
        if len(self.buf) - self.off >= size:
            return True
        if self.drained:
            return False
        rest = self.buf[self.off :]
        want = max(size - len(rest), _CHUNK)
        more = self.source.read(want)
        self.drained = len(more) < want
        self.buf, self.off = rest + more, 0
        return len(self.buf) >= size

    def read(self, size: int) -> bytes:
        if not self.fill(size):
            raise self.fail("the data set ends inside an element")
        data = self.buf[self.off : self.off + size]
        self.off += size
        self.pos += size
        return data

    def skip(self, size: int) -> None:
        available = len(self.buf) - self.off
        if size <= available:
            self.off += size
        else:
            beyond = size - available
            if self.drained or self.source.skip(beyond) < beyond:
                raise self.fail(f"a value of {size} bytes runs past the end of the data set")
            self.buf, self.off = b"", 0
        self.pos += size

    def run(self) -> Walked:
        while self.stack:
            frame = self.stack[-1]
            if frame.end is not None and self.pos >= frame.end:
                if self.pos > frame.end:  # an item of undefined length ran past it
                    raise self.fail("an item runs past the end of its sequence")
                self.stack.pop()  # a defined length ends here
                continue
            if frame.kind == _DATASET and frame.little and self.skim(frame):
                continue
            if len(self.buf) - self.off < 8 and not self.fill(8):
                if len(self.buf) == self.off:
                    break  # the end of the data (an open sequence or item: see below)
                raise self.fail("the data set ends inside an element header")
            buf, off = self.buf, self.off
            group, element, length = _HEADER[frame.little].unpack_from(buf, off)
            self.off = off + 8
            self.pos += 8
            tag = group << 16 | element
            if frame.kind == _DATASET:
                self.element(frame, tag, buf[off + 4 : off + 8], length)
            else:
                self.item(frame, tag, length)
        if len(self.stack) > 1:
            raise self.fail("a sequence or item of undefined length is not closed")
        return Walked(
            self.uids.get(_SOP_CLASS_UID),
            self.uids.get(_SOP_INSTANCE_UID),
            self.elements,
            self.pos,
        )

    def skim(self, frame: _Frame) -> bool:
        """Cross the plain elements ahead in the buffer (little endian, a defined length
        that ends in the buffer and in `frame`, no sequence, delimiter or SOP UID) in a
        tight loop; `run` takes any other element. Whether any was crossed."""
        buf, start = self.buf, self.off
        limit = len(buf)
        if frame.end is not None:
            limit = min(limit, start + frame.end - self.pos)
        off = start
        count = 0
        if frame.implicit:
            unpack = _HEADER[True].unpack_from
            while off + 8 <= limit:
                group, element, length = unpack(buf, off)
                tag = group << 16 | element
                end = off + 8 + length
                if (
                    end > limit  # also an undefined length
                    or group == 0xFFFE
                    or tag in _SEQUENCE_TAGS
                    or tag in (_SOP_CLASS_UID, _SOP_INSTANCE_UID)
                ):
                    break
                off = end
                count += 1
        else:
            unpack_explicit = _EXPLICIT_SHORT.unpack_from
            while off + 8 <= limit:
                group, element, vr, length = unpack_explicit(buf, off)
                end = off + 8 + length
                if (
                    end > limit
                    or vr in _LONG_VRS
                    or vr not in VR_NAMES
                    or group == 0xFFFE
                    or (group == 8 and element in (0x16, 0x18))
                ):
                    break
                off = end
                count += 1
        self.off = off
        self.pos += off - start
        self.elements += count
        return count > 0

    def within(self, frame: _Frame, length: int) -> None:
        if frame.end is not None and self.pos + length > frame.end:
            raise self.fail(f"a value of {length} bytes runs past its sequence or item")

    def push(self, frame: _Frame) -> None:
        if len(self.stack) > 2 * MAX_DEPTH:
            raise self.fail(f"sequences nested more than {MAX_DEPTH} deep")
        self.stack.append(frame)

    def item(self, frame: _Frame, tag: int, length: int) -> None:
        """In a sequence or encapsulated pixel data: an item or the end."""
        if tag == _SEQUENCE_END and frame.end is None:
            if length:
                raise self.fail("a sequence delimiter with a length")
            self.stack.pop()
            return
        if tag != _ITEM:
            raise self.fail(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) where an item belongs")
        if length == UNDEFINED:
            if frame.kind == _FRAGMENTS:
                raise self.fail("a pixel data fragment of undefined length")
            self.push(_Frame(_DATASET, None, frame.implicit, frame.little, item=True))
            return
        self.within(frame, length)
        if frame.kind == _FRAGMENTS:
            self.skip(length)
        else:
            self.push(_Frame(_DATASET, self.pos + length, frame.implicit, frame.little, True))

    def element(self, frame: _Frame, tag: int, head: bytes, length: int) -> None:
        """In a data set: one data element (`head`: the 4 bytes after its tag)."""
        if tag >> 16 == 0xFFFE:
            if tag == _ITEM_END and frame.item and frame.end is None and not length:
                self.stack.pop()
                return
            raise self.fail(f"a misplaced delimiter ({tag >> 16:04X},{tag & 0xFFFF:04X})")
        self.elements += 1
        vr = b""
        if not frame.implicit:
            vr = head[:2]
            if vr not in VR_NAMES:
                raise self.fail(f"{vr!r} is not a VR")
            if vr in _LONG_VRS:
                (length,) = _LONG[frame.little].unpack(self.read(4))
            else:
                (length,) = _SHORT[frame.little].unpack(head[2:])
        if length == UNDEFINED:
            if frame.implicit or vr in (b"SQ", b"UN"):
                # UN of undefined length: a sequence in implicit VR little endian.
                implicit, little = frame.implicit or vr == b"UN", frame.little or vr == b"UN"
                self.push(_Frame(_SEQUENCE, None, implicit, little))
            elif vr in (b"OB", b"OW") and tag == _PIXEL_DATA:
                self.push(_Frame(_FRAGMENTS, None, frame.implicit, frame.little))
            else:
                raise self.fail(f"an undefined length for VR {vr.decode()}")
            return
        if frame.end is not None:
            self.within(frame, length)
        if vr == b"SQ" or (frame.implicit and tag in _SEQUENCE_TAGS):
            self.push(_Frame(_SEQUENCE, self.pos + length, frame.implicit, frame.little))
        elif (
            tag in (_SOP_CLASS_UID, _SOP_INSTANCE_UID)
            and len(self.stack) == 1
            and length <= _MAX_UID_LENGTH
        ):
            self.uids[tag] = self.read(length).decode("latin-1").rstrip("\x00 ")
        elif length <= len(self.buf) - self.off:  # most values: within what was read
            self.off += length
            self.pos += length
        else:
            self.skip(length)


def walk(source: Source, *, implicit: bool, little: bool = True) -> Walked:
    """Walk the data set `source` holds, in the given encoding; raises
    `MalformedDataset` when its structure does not parse (see the module docstring)."""
    return _Walk(source, implicit, little).run()


def walk_encoded(source: Source, transfer_syntax: str) -> Walked:
    """`walk` over a data set in `transfer_syntax` (implicit VR little endian, deflated,
    explicit VR big endian, else explicit VR little endian), inflating a deflated one."""
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    little = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        source = InflatingSource(source)
    return walk(source, implicit=implicit, little=little)


class ChunkSource:
    """A data set held in pieces (e.g. a spool's memory buffers), read in order."""

    def __init__(self, chunks: list[bytes | memoryview]) -> None:
        self._chunks = [memoryview(c).cast("B") for c in chunks if len(c)]
        self._index = 0
        self._offset = 0

    def _take(self, size: int, out: list[memoryview] | None) -> int:
        taken = 0
        while taken < size and self._index < len(self._chunks):
            chunk = self._chunks[self._index]
            part = chunk[self._offset : self._offset + size - taken]
            if out is not None:
                out.append(part)
            taken += len(part)
            self._offset += len(part)
            if self._offset == len(chunk):
                self._index += 1
                self._offset = 0
        return taken

    def read(self, size: int) -> bytes:
        parts: list[memoryview] = []
        self._take(size, parts)
        return b"".join(parts)

    def skip(self, size: int) -> int:
        return self._take(size, None)


class InflatingSource:
    """A deflated data set (PS3.5 §A.5) from `raw`, inflated as it is read, a bounded
    piece at a time (never held whole)."""

    _PIECE = 1 << 16

    def __init__(self, raw: Source) -> None:
        self._raw = raw
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = bytearray()
        self._offset = 0  # what is read of `_buffer`
        self._raw_done = False

    def _fill(self, size: int) -> None:
        while len(self._buffer) - self._offset < size and not self._inflater.eof:
            data = self._inflater.unconsumed_tail
            if not data:
                if self._raw_done:
                    return
                data = self._raw.read(self._PIECE)
                self._raw_done = not data
            try:
                self._buffer += self._inflater.decompress(data, max(size, self._PIECE))
            except zlib.error as exc:
                raise MalformedDataset(f"the deflated data set does not inflate: {exc}") from None
            if self._raw_done and not self._inflater.unconsumed_tail:
                return

    def read(self, size: int) -> bytes:
        self._fill(size)
        data = bytes(self._buffer[self._offset : self._offset + size])
        self._offset += len(data)
        if self._offset >= self._PIECE:
            del self._buffer[: self._offset]
            self._offset = 0
        return data

    def skip(self, size: int) -> int:
        skipped = 0
        while skipped < size:
            piece = self.read(min(size - skipped, self._PIECE))
            if not piece:
                break
            skipped += len(piece)
        return skipped


class _Bytes:
    def __init__(self, data: bytes | memoryview) -> None:
        self._data = memoryview(data).cast("B")
        self._pos = 0

    def read(self, size: int) -> bytes:
        chunk = self._data[self._pos : self._pos + size]
        self._pos += len(chunk)
        return bytes(chunk)

    def skip(self, size: int) -> int:
        size = max(0, min(size, len(self._data) - self._pos))
        self._pos += size
        return size


def walk_bytes(data: bytes | memoryview, *, implicit: bool, little: bool = True) -> Walked:
    """`walk` over data set bytes in memory."""
    return _Walk(_Bytes(b""), implicit, little, bytes(data)).run()
