"""DIMSE messages (PS3.7 §9, §10): command sets, P-DATA fragmentation, reassembly.

Sans-IO. Command sets are always Implicit VR Little Endian with the Command Group
Length (0000,0000) first (PS3.7 §6.3.1). A message travels as command PDVs then,
if the command says so, data set PDVs on the same presentation context (PS3.8
Annex E).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final

from dicomnet.errors import ProtocolError
from dicomnet.proto.pdu import PDV_HEADER_LENGTH, PresentationDataValue, encode_pdata_header

__all__ = [
    "NO_DATASET",
    "CCancelRQ",
    "CEchoRQ",
    "CEchoRSP",
    "CFindRQ",
    "CFindRSP",
    "CGetRQ",
    "CGetRSP",
    "CMoveRQ",
    "CMoveRSP",
    "CStoreRQ",
    "CStoreRSP",
    "CommandReceived",
    "DatasetFragment",
    "DimseMessage",
    "MessageAssembler",
    "MessageIDs",
    "OutstandingRequests",
    "decode_command",
    "encode_command",
    "fragment",
]

NO_DATASET: Final = 0x0101
VERIFICATION_SOP_CLASS: Final = "1.2.840.10008.1.1"

# (0000,eeee) element number -> (keyword, VR)
_COMMAND_ELEMENTS: dict[int, tuple[str, str]] = {
    0x0000: ("CommandGroupLength", "UL"),
    0x0002: ("AffectedSOPClassUID", "UI"),
    0x0003: ("RequestedSOPClassUID", "UI"),
    0x0100: ("CommandField", "US"),
    0x0110: ("MessageID", "US"),
    0x0120: ("MessageIDBeingRespondedTo", "US"),
    0x0600: ("MoveDestination", "AE"),
    0x0700: ("Priority", "US"),
    0x0800: ("CommandDataSetType", "US"),
    0x0900: ("Status", "US"),
    0x0901: ("OffendingElement", "AT"),
    0x0902: ("ErrorComment", "LO"),
    0x0903: ("ErrorID", "US"),
    0x1000: ("AffectedSOPInstanceUID", "UI"),
    0x1001: ("RequestedSOPInstanceUID", "UI"),
    0x1002: ("EventTypeID", "US"),
    0x1005: ("AttributeIdentifierList", "AT"),
    0x1008: ("ActionTypeID", "US"),
    0x1020: ("NumberOfRemainingSuboperations", "US"),
    0x1021: ("NumberOfCompletedSuboperations", "US"),
    0x1022: ("NumberOfFailedSuboperations", "US"),
    0x1023: ("NumberOfWarningSuboperations", "US"),
    0x1030: ("MoveOriginatorApplicationEntityTitle", "AE"),
    0x1031: ("MoveOriginatorMessageID", "US"),
}
_KEYWORD_ELEMENT = {kw: (elem, vr) for elem, (kw, vr) in _COMMAND_ELEMENTS.items()}

# dataclass attribute name -> command keyword
_ATTRS: dict[str, str] = {
    "message_id": "MessageID",
    "message_id_being_responded_to": "MessageIDBeingRespondedTo",
    "affected_sop_class_uid": "AffectedSOPClassUID",
    "affected_sop_instance_uid": "AffectedSOPInstanceUID",
    "requested_sop_class_uid": "RequestedSOPClassUID",
    "requested_sop_instance_uid": "RequestedSOPInstanceUID",
    "priority": "Priority",
    "status": "Status",
    "error_comment": "ErrorComment",
    "error_id": "ErrorID",
    "offending_element": "OffendingElement",
    "move_destination": "MoveDestination",
    "move_originator_ae_title": "MoveOriginatorApplicationEntityTitle",
    "move_originator_message_id": "MoveOriginatorMessageID",
    "remaining": "NumberOfRemainingSuboperations",
    "completed": "NumberOfCompletedSuboperations",
    "failed": "NumberOfFailedSuboperations",
    "warning": "NumberOfWarningSuboperations",
}

_ELEMENT = struct.Struct("<HHI")
_PDU_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")


class _Message:
    command_field: ClassVar[int]
    is_request: ClassVar[bool]


@dataclass(frozen=True, slots=True)
class CEchoRQ(_Message):
    """C-ECHO-RQ (PS3.7 §9.3.5.1)."""

    message_id: int
    affected_sop_class_uid: str = VERIFICATION_SOP_CLASS
    command_field: ClassVar[int] = 0x0030
    is_request: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class CEchoRSP(_Message):
    """C-ECHO-RSP (PS3.7 §9.3.5.2)."""

    message_id_being_responded_to: int
    status: int = 0
    affected_sop_class_uid: str | None = VERIFICATION_SOP_CLASS
    error_comment: str | None = None
    command_field: ClassVar[int] = 0x8030
    is_request: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class CStoreRQ(_Message):
    """C-STORE-RQ (PS3.7 §9.3.1.1)."""

    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    priority: int = 0
    move_originator_ae_title: str | None = None
    move_originator_message_id: int | None = None
    command_field: ClassVar[int] = 0x0001
    is_request: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class CStoreRSP(_Message):
    """C-STORE-RSP (PS3.7 §9.3.1.2)."""

    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    error_comment: str | None = None
    offending_element: tuple[int, ...] | None = None
    command_field: ClassVar[int] = 0x8001
    is_request: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class CFindRQ(_Message):
    """C-FIND-RQ (PS3.7 §9.3.2.1); the identifier follows as the data set."""

    message_id: int
    affected_sop_class_uid: str
    priority: int = 0
    command_field: ClassVar[int] = 0x0020
    is_request: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class CFindRSP(_Message):
    """C-FIND-RSP (PS3.7 §9.3.2.2); pending responses carry an identifier."""

    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    error_comment: str | None = None
    offending_element: tuple[int, ...] | None = None
    command_field: ClassVar[int] = 0x8020
    is_request: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class CGetRQ(_Message):
    """C-GET-RQ (PS3.7 §9.3.3.1)."""

    message_id: int
    affected_sop_class_uid: str
    priority: int = 0
    command_field: ClassVar[int] = 0x0010
    is_request: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class CGetRSP(_Message):
    """C-GET-RSP (PS3.7 §9.3.3.2)."""

    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    error_comment: str | None = None
    command_field: ClassVar[int] = 0x8010
    is_request: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class CMoveRQ(_Message):
    """C-MOVE-RQ (PS3.7 §9.3.4.1)."""

    message_id: int
    affected_sop_class_uid: str
    move_destination: str
    priority: int = 0
    command_field: ClassVar[int] = 0x0021
    is_request: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class CMoveRSP(_Message):
    """C-MOVE-RSP (PS3.7 §9.3.4.2)."""

    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    error_comment: str | None = None
    command_field: ClassVar[int] = 0x8021
    is_request: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class CCancelRQ(_Message):
    """C-CANCEL-RQ (PS3.7 §9.3.2.3): cancels the operation it responds to."""

    message_id_being_responded_to: int
    command_field: ClassVar[int] = 0x0FFF
    is_request: ClassVar[bool] = True


DimseMessage = (
    CEchoRQ
    | CEchoRSP
    | CStoreRQ
    | CStoreRSP
    | CFindRQ
    | CFindRSP
    | CGetRQ
    | CGetRSP
    | CMoveRQ
    | CMoveRSP
    | CCancelRQ
)

_MESSAGE_TYPES: dict[int, type[Any]] = {
    cls.command_field: cls
    for cls in (
        CEchoRQ,
        CEchoRSP,
        CStoreRQ,
        CStoreRSP,
        CFindRQ,
        CFindRSP,
        CGetRQ,
        CGetRSP,
        CMoveRQ,
        CMoveRSP,
        CCancelRQ,
    )
}
_FIELDS: dict[type[Any], tuple[tuple[str, str, bool], ...]] = {
    cls: tuple(
        (f.name, _ATTRS[f.name], f.default is not None and f.default is not f.default_factory)
        for f in fields(cls)
    )
    for cls in _MESSAGE_TYPES.values()
}


# --- encoding --------------------------------------------------------------------------------


def _encode_at(value: Any) -> bytes:
    return b"".join(struct.pack("<HH", tag >> 16, tag & 0xFFFF) for tag in value)


def _encode_ascii(value: Any, pad: bytes) -> bytes:
    raw = str(value).encode("ascii", errors="replace")
    return raw + pad if len(raw) % 2 else raw


def _encode_latin1(value: Any) -> bytes:
    raw = str(value).encode("latin-1", errors="replace")
    return raw + b" " if len(raw) % 2 else raw


_ENCODE_VR: dict[str, Callable[[Any], bytes]] = {
    "US": _US.pack,
    "UL": _UL.pack,
    "AT": _encode_at,
    "UI": functools.partial(_encode_ascii, pad=b"\x00"),
    "AE": functools.partial(_encode_ascii, pad=b" "),
    "LO": _encode_latin1,
}


def encode_command(message: DimseMessage, has_dataset: bool = False) -> bytes:
    """The command set of `message` (implicit VR LE, group length first).

    Recent C-FIND responses are reused: the pending responses of one C-FIND are all the
    same message."""
    if type(message) is CFindRSP:
        try:
            return _encode_command_cached(message, has_dataset)
        except TypeError:  # a field value that cannot be hashed
            pass
    return _encode_command(message, has_dataset)


# Per message type, its elements in tag order: (attribute, element header, encoder). The
# attribute is "" for Command Data Set Type, which comes from elsewhere; Command Field is
# the same for every message of a type, its whole element is the header (no encoder).
_EncodeStep = tuple[str, bytes, Callable[[Any], bytes] | None]


def _encode_plan(
    cls: type[Any], fields_: tuple[tuple[str, str, bool], ...]
) -> tuple[_EncodeStep, ...]:
    steps: list[tuple[int, _EncodeStep]] = [
        (0x0100, ("", _ELEMENT.pack(0, 0x0100, 2) + _US.pack(cls.command_field), None)),
        (0x0800, ("", b"", None)),
    ]
    for attr, keyword, _ in fields_:
        element, vr = _KEYWORD_ELEMENT[keyword]
        steps.append((element, (attr, _ELEMENT_TAG.pack(0, element), _ENCODE_VR[vr])))
    return tuple(step for _, step in sorted(steps, key=lambda item: item[0]))


_ELEMENT_TAG = struct.Struct("<HH")
_DATASET_PRESENT = _ELEMENT.pack(0, 0x0800, 2) + _US.pack(0x0000)
_DATASET_ABSENT = _ELEMENT.pack(0, 0x0800, 2) + _US.pack(NO_DATASET)
_ENCODE_PLANS: dict[type[Any], tuple[_EncodeStep, ...]] = {
    cls: _encode_plan(cls, fields_) for cls, fields_ in _FIELDS.items()
}


def _encode_command(message: DimseMessage, has_dataset: bool) -> bytes:
    parts: list[bytes] = []
    for attr, header, encode in _ENCODE_PLANS[type(message)]:
        if encode is None:
            if header:
                parts.append(header)  # Command Field
            else:
                parts.append(_DATASET_PRESENT if has_dataset else _DATASET_ABSENT)
            continue
        value = getattr(message, attr)
        if value is None:
            continue
        raw = encode(value)
        parts += (header, _UL.pack(len(raw)), raw)
    body = b"".join(parts)
    return _GROUP_LENGTH.pack(0, 0, 4, len(body)) + body


_GROUP_LENGTH = struct.Struct("<HHII")
_encode_command_cached = functools.lru_cache(maxsize=256)(_encode_command)


# --- decoding --------------------------------------------------------------------------------


def _decode_us(raw: bytes) -> int:
    if len(raw) != 2:
        raise ProtocolError("US command element must be 2 bytes")
    return int.from_bytes(raw, "little")


def _decode_ul(raw: bytes) -> int:
    if len(raw) != 4:
        raise ProtocolError("UL command element must be 4 bytes")
    return int.from_bytes(raw, "little")


def _decode_at(raw: bytes) -> tuple[int, ...]:
    if len(raw) % 4:
        raise ProtocolError("AT command element length is not a multiple of 4")
    return tuple((g << 16) | e for g, e in struct.iter_unpack("<HH", raw))


def _decode_ascii(raw: bytes) -> str:
    return raw.decode("ascii", errors="replace").strip("\x00 ")


def _decode_latin1(raw: bytes) -> str:
    return raw.decode("latin-1", errors="replace").strip("\x00 ")


_DECODE_VR: dict[str, Callable[[bytes], Any]] = {
    "US": _decode_us,
    "UL": _decode_ul,
    "AT": _decode_at,
    "UI": _decode_ascii,
    "AE": _decode_ascii,
    "LO": _decode_latin1,
}
# Per message type, how to fill its fields: (attribute, element, decoder).
_DECODE_PLANS: dict[type[Any], tuple[tuple[str, int, Callable[[bytes], Any]], ...]] = {
    cls: tuple(
        (attr, _KEYWORD_ELEMENT[keyword][0], _DECODE_VR[_KEYWORD_ELEMENT[keyword][1]])
        for attr, keyword, _ in fields_
    )
    for cls, fields_ in _FIELDS.items()
}


def _command_elements(data: bytes | memoryview) -> dict[int, bytes]:
    """The elements of a command set, {element number: value bytes} (PS3.7 §6.3.1)."""
    raw = bytes(data)  # a command set is small: one copy, then its values are slices
    elements: dict[int, bytes] = {}
    unpack = _ELEMENT.unpack_from
    offset = 0
    end = len(raw)
    while offset < end:
        if end - offset < 8:
            raise ProtocolError("command set: truncated element header")
        group, element, length = unpack(raw, offset)
        offset += 8
        if group != 0:
            raise ProtocolError(f"command set holds element ({group:04X},{element:04X})")
        stop = offset + length
        if stop > end:
            raise ProtocolError(f"command set: element (0000,{element:04X}) overruns")
        elements[element] = raw[offset:stop]
        offset = stop
    return elements


def decode_command(data: bytes | memoryview) -> tuple[DimseMessage, bool]:
    """Decode a command set into (message, has_dataset).

    Only the elements of the message's type are decoded; others are skipped."""
    elements = _command_elements(data)
    raw_field = elements.get(0x0100)
    if raw_field is None:
        raise ProtocolError("command set has no Command Field (0000,0100)")
    command_field = _decode_us(raw_field)
    cls = _MESSAGE_TYPES.get(command_field)
    if cls is None:
        raise ProtocolError(f"unsupported DIMSE command field 0x{command_field:04X}")
    kwargs: dict[str, Any] = {}
    for attr, element, decode in _DECODE_PLANS[cls]:
        raw = elements.get(element)
        if raw is not None:
            kwargs[attr] = decode(raw)
    try:
        message = cls(**kwargs)
    except TypeError:
        missing = [a for a, _, _ in _FIELDS[cls] if a not in kwargs]
        raise ProtocolError(f"{cls.__name__} lacks required fields: {missing}") from None
    raw_type = elements.get(0x0800)
    data_set_type = NO_DATASET if raw_type is None else _decode_us(raw_type)
    return message, data_set_type != NO_DATASET


# --- fragmentation ---------------------------------------------------------------------------

DEFAULT_FRAGMENT = 1 << 20  # data bytes per PDV when the peer sets no maximum


def max_pdv_data(max_pdu_length: int) -> int:
    """Bytes of data one P-DATA-TF PDU of at most `max_pdu_length` can carry in one PDV."""
    if max_pdu_length == 0:
        return DEFAULT_FRAGMENT
    return max(1, max_pdu_length - PDV_HEADER_LENGTH)


def fragment(
    context_id: int,
    data: bytes | memoryview,
    is_command: bool,
    max_pdu_length: int,
    *,
    is_final: bool = True,
) -> Iterator[bytes | memoryview]:
    """P-DATA-TF PDUs carrying `data`, one PDV each, as header/data pieces to write.

    `is_final`: the last piece of `data` ends the command or data set (the last-fragment
    bit is set on it). The pieces share `data`'s memory (no copy).
    """
    view = memoryview(data)
    chunk = max_pdv_data(max_pdu_length)
    total = len(view)
    offset = 0
    base = 1 if is_command else 0
    while True:
        size = min(chunk, total - offset)
        last = offset + size >= total
        control = base | (2 if last and is_final else 0)
        yield encode_pdata_header(context_id, control, size)
        yield view[offset : offset + size]
        offset += size
        if last:
            return


def encode_command_pdus(context_id: int, command: bytes, max_pdu_length: int) -> bytes:
    """A command set that has no data set, as P-DATA-TF PDUs joined: one PDU when it
    fits (it always does but for a tiny maximum length)."""
    if len(command) <= max_pdv_data(max_pdu_length):
        return encode_pdata_header(context_id, 0x03, len(command)) + command
    return b"".join(fragment(context_id, command, True, max_pdu_length))


def pdata_into(
    context_id: int,
    length: int,
    max_pdu_length: int,
    *,
    is_final: bool = True,
    prefix: bytes = b"",
) -> tuple[bytearray, list[memoryview]]:
    """P-DATA-TF PDUs (one PDV each) for `length` bytes of a data set, laid out in one
    buffer with their headers in place, and the views where each PDV's data goes: the
    caller reads a file straight into them, so the bytes are copied once on their way to
    the socket. `prefix` (the command's PDUs) goes first."""
    chunk = max_pdv_data(max_pdu_length)
    pieces = max(1, -(-length // chunk))
    header_length = len(encode_pdata_header(context_id, 0, 0))
    out = bytearray(len(prefix) + length + pieces * header_length)
    view = memoryview(out)
    view[: len(prefix)] = prefix
    position = len(prefix)
    offset = 0
    slots: list[memoryview] = []
    while True:
        size = min(chunk, length - offset)
        last = offset + size >= length
        view[position : position + header_length] = encode_pdata_header(
            context_id, 2 if last and is_final else 0, size
        )
        position += header_length
        slots.append(view[position : position + size])
        position += size
        offset += size
        if last:
            return out, slots


def encode_small_message(
    context_id: int, command: bytes, dataset: bytes | memoryview, max_pdu_length: int
) -> bytes | None:
    """Command and data set as ONE P-DATA-TF PDU with two PDVs (PS3.8 §9.3.5), when
    that fits the peer's maximum length; else None. Halves the PDUs of small messages
    (C-FIND identifiers, small C-STOREs)."""
    length = PDV_HEADER_LENGTH * 2 + len(command) + len(dataset)
    if (max_pdu_length and length > max_pdu_length) or length > DEFAULT_FRAGMENT:
        return None
    return b"".join(
        (
            _PDU_HEADER.pack(0x04, length),
            _PDV_HEADER.pack(len(command) + 2, context_id, 0x03),
            command,
            _PDV_HEADER.pack(len(dataset) + 2, context_id, 0x02),
            dataset,
        )
    )


def encode_message(
    context_id: int,
    message: DimseMessage,
    dataset: bytes | memoryview | None,
    max_pdu_length: int,
) -> bytes:
    """A whole message (command and, if given, the data set) as P-DATA-TF PDUs, joined."""
    command = encode_command(message, has_dataset=dataset is not None)
    pieces = list(fragment(context_id, command, True, max_pdu_length))
    if dataset is not None:
        pieces.extend(fragment(context_id, dataset, False, max_pdu_length))
    return b"".join(pieces)


# --- reassembly ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandReceived:
    """A complete command set arrived; `has_dataset` says whether data set PDVs follow."""

    context_id: int
    message: DimseMessage
    has_dataset: bool


@dataclass(frozen=True, slots=True)
class DatasetFragment:
    """One PDV of the data set of the last command; `is_last` ends it."""

    context_id: int
    data: memoryview
    is_last: bool


class MessageAssembler:
    """Reassembles PDVs into commands and data set fragments (PS3.8 Annex E)."""

    def __init__(self, is_context_valid: Callable[[int], bool] | None = None) -> None:
        self._command = bytearray()
        self._command_context: int | None = None
        self._dataset_context: int | None = None
        self._is_context_valid = is_context_valid

    @property
    def in_message(self) -> bool:
        """A message has started and is not complete yet."""
        return self._command_context is not None or self._dataset_context is not None

    def feed(self, pdv: PresentationDataValue) -> CommandReceived | DatasetFragment | None:
        context_id = pdv.context_id
        if self._is_context_valid is not None and not self._is_context_valid(context_id):
            raise ProtocolError(f"PDV on presentation context {context_id}, which is not accepted")
        if pdv.is_command:
            if self._dataset_context is not None:
                raise ProtocolError("command fragment received in the middle of a data set")
            if self._command_context is None:
                self._command_context = context_id
            elif context_id != self._command_context:
                raise ProtocolError("command fragments on different presentation contexts")
            self._command += pdv.data
            if len(self._command) > 1 << 20:
                raise ProtocolError("command set larger than 1 MiB")
            if not pdv.is_last:
                return None
            raw = bytes(self._command)
            self._command.clear()
            self._command_context = None
            message, has_dataset = decode_command(raw)
            if has_dataset:
                self._dataset_context = context_id
            return CommandReceived(context_id, message, has_dataset)
        if self._dataset_context is None:
            raise ProtocolError("data set fragment received without a command")
        if context_id != self._dataset_context:
            raise ProtocolError("data set fragment on a different presentation context")
        if pdv.is_last:
            self._dataset_context = None
        data = pdv.data if isinstance(pdv.data, memoryview) else memoryview(pdv.data)
        return DatasetFragment(context_id, data, pdv.is_last)


# --- message IDs and DIMSE timeouts ----------------------------------------------------------


class MessageIDs:
    """Allocates Message IDs (1..65535) unique among the outstanding requests."""

    def __init__(self) -> None:
        self._next = 1
        self.outstanding: set[int] = set()

    def allocate(self) -> int:
        if len(self.outstanding) >= 0xFFFF:
            raise RuntimeError("all 65535 message IDs are outstanding")
        while True:
            candidate = self._next
            self._next = candidate % 0xFFFF + 1
            if candidate not in self.outstanding:
                self.outstanding.add(candidate)
                return candidate

    def release(self, message_id: int) -> None:
        self.outstanding.discard(message_id)


class OutstandingRequests:
    """DIMSE response deadlines per outstanding Message ID, on an injected clock.

    Each response (pending ones too) restarts that request's deadline.
    """

    def __init__(self, timeout: float | None, clock: Callable[[], float]) -> None:
        self.timeout = timeout
        self._clock = clock
        self._deadlines: dict[int, float] = {}

    def started(self, message_id: int) -> None:
        if self.timeout is not None:
            self._deadlines[message_id] = self._clock() + self.timeout

    def responded(self, message_id: int, final: bool) -> None:
        if final:
            self._deadlines.pop(message_id, None)
        elif message_id in self._deadlines and self.timeout is not None:
            self._deadlines[message_id] = self._clock() + self.timeout

    def get_timer(self) -> float | None:
        return min(self._deadlines.values()) if self._deadlines else None

    def expired(self) -> list[int]:
        now = self._clock()
        return [mid for mid, deadline in self._deadlines.items() if now >= deadline]
