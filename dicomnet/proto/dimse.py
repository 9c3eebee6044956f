"""DIMSE messages (PS3.7 §9.3, §10.3): command sets, P-DATA fragmentation, reassembly.

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
from typing import Any, ClassVar, Final, cast

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
    "NActionRQ",
    "NActionRSP",
    "NCreateRQ",
    "NCreateRSP",
    "NDeleteRQ",
    "NDeleteRSP",
    "NEventReportRQ",
    "NEventReportRSP",
    "NGetRQ",
    "NGetRSP",
    "NSetRQ",
    "NSetRSP",
    "UnrecognizedRQ",
    "UnrecognizedRSP",
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
    "event_type_id": "EventTypeID",
    "action_type_id": "ActionTypeID",
    "attribute_identifier_list": "AttributeIdentifierList",
    "command_field": "CommandField",
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


# --- DIMSE-N (PS3.7 §10.3): requests name the instance they address with Requested SOP
# Class/Instance UID, but N-CREATE and N-EVENT-REPORT, whose instance is the one affected.


@dataclass(frozen=True, slots=True)
class NEventReportRQ(_Message):
    """N-EVENT-REPORT-RQ (PS3.7 §10.3.1.1); Event Information is the optional data set."""

    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    event_type_id: int
    command_field: ClassVar[int] = 0x0100
    is_request: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class NEventReportRSP(_Message):
    """N-EVENT-REPORT-RSP (PS3.7 §10.3.1.2); Event Reply is the optional data set."""

    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    event_type_id: int | None = None
    error_comment: str | None = None
    error_id: int | None = None
    command_field: ClassVar[int] = 0x8100
    is_request: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class NGetRQ(_Message):
    """N-GET-RQ (PS3.7 §10.3.2.1): no data set; no Attribute Identifier List means all."""

    message_id: int
    requested_sop_class_uid: str
    requested_sop_instance_uid: str
    attribute_identifier_list: tuple[int, ...] | None = None
    command_field: ClassVar[int] = 0x0110
    is_request: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class NGetRSP(_Message):
    """N-GET-RSP (PS3.7 §10.3.2.2); the Attribute List is the data set."""

    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    attribute_identifier_list: tuple[int, ...] | None = None
    error_comment: str | None = None
    error_id: int | None = None
    command_field: ClassVar[int] = 0x8110
    is_request: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class NSetRQ(_Message):
    """N-SET-RQ (PS3.7 §10.3.3.1); the Modification List is the data set."""

    message_id: int
    requested_sop_class_uid: str
    requested_sop_instance_uid: str
    command_field: ClassVar[int] = 0x0120
    is_request: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class NSetRSP(_Message):
    """N-SET-RSP (PS3.7 §10.3.3.2); the Attribute List is the optional data set."""

    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    attribute_identifier_list: tuple[int, ...] | None = None
    error_comment: str | None = None
    error_id: int | None = None
    command_field: ClassVar[int] = 0x8120
    is_request: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class NActionRQ(_Message):
    """N-ACTION-RQ (PS3.7 §10.3.4.1); Action Information is the optional data set."""

    message_id: int
    requested_sop_class_uid: str
    requested_sop_instance_uid: str
    action_type_id: int
    command_field: ClassVar[int] = 0x0130
    is_request: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class NActionRSP(_Message):
    """N-ACTION-RSP (PS3.7 §10.3.4.2); Action Reply is the optional data set."""

    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    action_type_id: int | None = None
    error_comment: str | None = None
    error_id: int | None = None
    command_field: ClassVar[int] = 0x8130
    is_request: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class NCreateRQ(_Message):
    """N-CREATE-RQ (PS3.7 §10.3.5.1): without an instance UID, the SCP assigns one."""

    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str | None = None
    command_field: ClassVar[int] = 0x0140
    is_request: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class NCreateRSP(_Message):
    """N-CREATE-RSP (PS3.7 §10.3.5.2); the Attribute List is the optional data set."""

    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    attribute_identifier_list: tuple[int, ...] | None = None
    error_comment: str | None = None
    error_id: int | None = None
    command_field: ClassVar[int] = 0x8140
    is_request: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class NDeleteRQ(_Message):
    """N-DELETE-RQ (PS3.7 §10.3.6.1): no data set."""

    message_id: int
    requested_sop_class_uid: str
    requested_sop_instance_uid: str
    command_field: ClassVar[int] = 0x0150
    is_request: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class NDeleteRSP(_Message):
    """N-DELETE-RSP (PS3.7 §10.3.6.2): no data set."""

    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    error_comment: str | None = None
    error_id: int | None = None
    command_field: ClassVar[int] = 0x8150
    is_request: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class UnrecognizedRQ(_Message):
    """A request whose Command Field no DIMSE service has: answered with 0x0211
    (Unrecognized operation, PS3.7 Annex C) in a response of that field | 0x8000."""

    command_field: int  # type: ignore[misc]
    message_id: int
    affected_sop_class_uid: str | None = None
    requested_sop_class_uid: str | None = None
    is_request: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class UnrecognizedRSP(_Message):
    """The response to an `UnrecognizedRQ`: its Command Field with the response bit set."""

    command_field: int  # type: ignore[misc]
    message_id_being_responded_to: int
    status: int = 0x0211
    affected_sop_class_uid: str | None = None
    error_comment: str | None = None
    is_request: ClassVar[bool] = False


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
    | NEventReportRQ
    | NEventReportRSP
    | NGetRQ
    | NGetRSP
    | NSetRQ
    | NSetRSP
    | NActionRQ
    | NActionRSP
    | NCreateRQ
    | NCreateRSP
    | NDeleteRQ
    | NDeleteRSP
    | UnrecognizedRQ
    | UnrecognizedRSP
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
        NEventReportRQ,
        NEventReportRSP,
        NGetRQ,
        NGetRSP,
        NSetRQ,
        NSetRSP,
        NActionRQ,
        NActionRSP,
        NCreateRQ,
        NCreateRSP,
        NDeleteRQ,
        NDeleteRSP,
    )
}
_FIELDS: dict[type[Any], tuple[tuple[str, str, bool], ...]] = {
    cls: tuple(
        (f.name, _ATTRS[f.name], f.default is not None and f.default is not f.default_factory)
        for f in fields(cls)
    )
    for cls in (*_MESSAGE_TYPES.values(), UnrecognizedRQ, UnrecognizedRSP)
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
    steps: list[tuple[int, _EncodeStep]] = [(0x0800, ("", b"", None))]
    if not any(attr == "command_field" for attr, _, _ in fields_):
        # The same for every message of the type: the whole element is the header.
        header = _ELEMENT.pack(0, 0x0100, 2) + _US.pack(cls.command_field)
        steps.append((0x0100, ("", header, None)))
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

    Only the elements of the message's type are decoded; others are skipped. A message
    of a Command Field no service has decodes to `UnrecognizedRQ` (to be answered
    0x0211) or `UnrecognizedRSP` (the answer to one we sent)."""
    elements = _command_elements(data)
    raw_field = elements.get(0x0100)
    if raw_field is None:
        raise ProtocolError("command set has no Command Field (0000,0100)")
    command_field = _decode_us(raw_field)
    cls = _MESSAGE_TYPES.get(command_field)
    if cls is None:
        cls = UnrecognizedRSP if command_field & 0x8000 else UnrecognizedRQ
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


# --- answering any request -------------------------------------------------------------------

_RESPONSE_OF: dict[type[Any], type[Any]] = {
    cls: _MESSAGE_TYPES[cls.command_field | 0x8000]
    for cls in _MESSAGE_TYPES.values()
    if cls.is_request and cls.command_field | 0x8000 in _MESSAGE_TYPES
}


def response_to(request: DimseMessage, status: int, **values: Any) -> DimseMessage:
    """The response to `request` with `status`: its SOP Class/Instance UIDs those the
    request named unless `values` say otherwise, and of `values` (Error Comment, at most
    64 characters as LO, PS3.7 Annex C; Event Type ID ...) what the response type has."""
    message_id: int = getattr(request, "message_id", 0)
    sop_class = getattr(request, "affected_sop_class_uid", None) or getattr(
        request, "requested_sop_class_uid", None
    )
    text = values.pop("error_comment", None)
    values.setdefault("affected_sop_class_uid", sop_class)
    values["error_comment"] = text[:64] if text else None
    if isinstance(request, UnrecognizedRQ):
        cf = request.command_field | 0x8000
        return UnrecognizedRSP(cf, message_id, status, sop_class, values["error_comment"])
    cls = _RESPONSE_OF[type(request)]
    values.setdefault(
        "affected_sop_instance_uid",
        getattr(request, "affected_sop_instance_uid", None)
        or getattr(request, "requested_sop_instance_uid", None),
    )
    values["message_id_being_responded_to"], values["status"] = message_id, status
    kwargs = {name: values[name] for name, _, _ in _FIELDS[cls] if values.get(name) is not None}
    return cast(DimseMessage, cls(**kwargs))


def failure_response(
    request: DimseMessage, status: int, comment: str | None = None
) -> DimseMessage:
    """A response to `request` with `status` and an Error Comment."""
    return response_to(request, status, error_comment=comment)
