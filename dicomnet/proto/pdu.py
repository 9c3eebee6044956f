"""The seven Upper Layer PDUs and their items (PS3.8 §9.3, Annex D): encode and decode.

Sans-IO: every function here works on `bytes`/`memoryview` and raises only
`ProtocolError` for malformed input. Decoding checks every length field against
the enclosing one; trailing or missing bytes are errors.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from dicomnet.errors import ProtocolError
from dicomnet.proto.memo import BoundedMemo, IdentityMemo

__all__ = [
    "APPLICATION_CONTEXT_NAME",
    "PDU",
    "AAbort",
    "AAssociateAC",
    "AAssociateRJ",
    "AAssociateRQ",
    "AReleaseRP",
    "AReleaseRQ",
    "AsyncOperationsWindow",
    "PDUType",
    "PDataTF",
    "PresentationContextAC",
    "PresentationContextRQ",
    "PresentationDataValue",
    "RoleSelection",
    "SOPClassCommonExtendedNegotiation",
    "SOPClassExtendedNegotiation",
    "UnknownSubItem",
    "UserIdentityAC",
    "UserIdentityRQ",
    "UserInformation",
    "decode_pdu",
    "describe_rejection",
    "encode_pdata_header",
    "parse_pdu_header",
]

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
PDU_HEADER_LENGTH = 6
PDV_HEADER_LENGTH = 6  # item length (4) + presentation context ID (1) + message control header (1)

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_PDU_HEADER = struct.Struct(">BxI")
_ITEM_HEADER = struct.Struct(">BxH")
_PDV_HEADER = struct.Struct(">IBB")
_PDATA_ONE = struct.Struct(">BxIIBB")


class PDUType(IntEnum):
    """PDU type field values (PS3.8 Table 9-11 and following)."""

    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


class ItemType(IntEnum):
    """Item and sub-item type values (PS3.8 §9.3.2, Annex D)."""

    APPLICATION_CONTEXT = 0x10
    PRESENTATION_CONTEXT_RQ = 0x20
    PRESENTATION_CONTEXT_AC = 0x21
    ABSTRACT_SYNTAX = 0x30
    TRANSFER_SYNTAX = 0x40
    USER_INFORMATION = 0x50
    MAXIMUM_LENGTH = 0x51
    IMPLEMENTATION_CLASS_UID = 0x52
    ASYNCHRONOUS_OPERATIONS_WINDOW = 0x53
    ROLE_SELECTION = 0x54
    IMPLEMENTATION_VERSION_NAME = 0x55
    SOP_CLASS_EXTENDED = 0x56
    SOP_CLASS_COMMON_EXTENDED = 0x57
    USER_IDENTITY_RQ = 0x58
    USER_IDENTITY_AC = 0x59


# --- text fields -----------------------------------------------------------------------------


def _decode_uid(raw: bytes | memoryview, what: str) -> str:
    try:
        text = bytes(raw).decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not ASCII") from None
    # Trailing NUL padding is allowed for UIDs; some implementations also pad with spaces.
    return text.rstrip("\x00 ")


def _encode_uid(uid: str) -> bytes:
    return uid.encode("ascii")


def _decode_ae_title(raw: bytes | memoryview) -> str:
    # PS3.5: default repertoire. Latin-1 reads any byte and writes it back unchanged, so
    # an A-ASSOCIATE-AC echoes even an ill-formed title exactly (PS3.8 §9.3.3).
    return bytes(raw).decode("latin-1").strip(" \x00")


def _encode_ae_title(title: str) -> bytes:
    try:
        raw = title.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"AE title {title!r} has characters outside ISO 8859-1") from None
    if len(raw) > 16:
        raise ValueError(f"AE title {title!r} is longer than 16 characters")
    return raw.ljust(16, b" ")


# --- items -----------------------------------------------------------------------------------


def _item(item_type: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"item 0x{item_type:02X} value is longer than 65535 bytes")
    return _ITEM_HEADER.pack(item_type, len(value)) + value


def _iter_items(data: memoryview, where: str) -> Iterable[tuple[int, memoryview]]:
    """Yield (item type, value) for each item in `data`, checking every length."""
    offset = 0
    end = len(data)
    while offset < end:
        if end - offset < 4:
            raise ProtocolError(f"{where}: truncated item header")
        item_type, length = _ITEM_HEADER.unpack_from(data, offset)
        offset += 4
        if length > end - offset:
            raise ProtocolError(f"{where}: item 0x{item_type:02X} length {length} overruns")
        yield item_type, data[offset : offset + length]
        offset += length


def _u16_prefixed(data: memoryview, offset: int, where: str) -> tuple[memoryview, int]:
    if len(data) - offset < 2:
        raise ProtocolError(f"{where}: truncated length field")
    (length,) = _U16.unpack_from(data, offset)
    offset += 2
    if length > len(data) - offset:
        raise ProtocolError(f"{where}: field length {length} overruns")
    return data[offset : offset + length], offset + length


@dataclass(frozen=True, slots=True)
class PresentationContextRQ:
    """Presentation Context Item in A-ASSOCIATE-RQ (PS3.8 §9.3.2.2)."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]

    def encode(self) -> bytes:
        body = bytearray(bytes((self.context_id, 0, 0, 0)))
        body += _item(ItemType.ABSTRACT_SYNTAX, _encode_uid(self.abstract_syntax))
        for ts in self.transfer_syntaxes:
            body += _item(ItemType.TRANSFER_SYNTAX, _encode_uid(ts))
        return _item(ItemType.PRESENTATION_CONTEXT_RQ, bytes(body))

    @classmethod
    def decode(cls, data: memoryview) -> PresentationContextRQ:
        if len(data) < 4:
            raise ProtocolError("presentation context (RQ) item too short")
        context_id = data[0]
        abstract: str | None = None
        transfer: list[str] = []
        for item_type, value in _iter_items(data[4:], "presentation context (RQ)"):
            if item_type == ItemType.ABSTRACT_SYNTAX:
                if abstract is not None:
                    raise ProtocolError("presentation context has two abstract syntaxes")
                abstract = _decode_uid(value, "abstract syntax")
            elif item_type == ItemType.TRANSFER_SYNTAX:
                transfer.append(_decode_uid(value, "transfer syntax"))
            else:
                raise ProtocolError(
                    f"unexpected sub-item 0x{item_type:02X} in presentation context"
                )
        if abstract is None:
            raise ProtocolError(f"presentation context {context_id} has no abstract syntax")
        if not transfer:
            raise ProtocolError(f"presentation context {context_id} has no transfer syntax")
        return cls(context_id, abstract, tuple(transfer))


class PresentationContextResult(IntEnum):
    """Result/Reason of a Presentation Context Item in A-ASSOCIATE-AC (PS3.8 Table 9-18)."""

    ACCEPTANCE = 0
    USER_REJECTION = 1
    NO_REASON = 2
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


@dataclass(frozen=True, slots=True)
class PresentationContextAC:
    """Presentation Context Item in A-ASSOCIATE-AC (PS3.8 §9.3.3.2)."""

    context_id: int
    result: int
    transfer_syntax: str

    @property
    def accepted(self) -> bool:
        return self.result == PresentationContextResult.ACCEPTANCE

    def encode(self) -> bytes:
        body = bytes((self.context_id, 0, self.result, 0))
        body += _item(ItemType.TRANSFER_SYNTAX, _encode_uid(self.transfer_syntax))
        return _item(ItemType.PRESENTATION_CONTEXT_AC, body)

    @classmethod
    def decode(cls, data: memoryview) -> PresentationContextAC:
        if len(data) < 4:
            raise ProtocolError("presentation context (AC) item too short")
        context_id, result = data[0], data[2]
        if result > 4:
            raise ProtocolError(f"presentation context {context_id} has result {result}")
        transfer: str | None = None
        for item_type, value in _iter_items(data[4:], "presentation context (AC)"):
            if item_type != ItemType.TRANSFER_SYNTAX:
                raise ProtocolError(
                    f"unexpected sub-item 0x{item_type:02X} in presentation context"
                )
            if transfer is not None:
                raise ProtocolError(f"presentation context {context_id} has two transfer syntaxes")
            transfer = _decode_uid(value, "transfer syntax")
        if transfer is None:
            if result == PresentationContextResult.ACCEPTANCE:
                raise ProtocolError(f"accepted presentation context {context_id} has no syntax")
            transfer = ""
        return cls(context_id, result, transfer)


@dataclass(frozen=True, slots=True)
class AsyncOperationsWindow:
    """Asynchronous Operations Window sub-item (PS3.7 §D.3.3.3). 0 means unlimited."""

    max_invoked: int = 1
    max_performed: int = 1

    def encode(self) -> bytes:
        return _item(
            ItemType.ASYNCHRONOUS_OPERATIONS_WINDOW,
            _U16.pack(self.max_invoked) + _U16.pack(self.max_performed),
        )

    @classmethod
    def decode(cls, data: memoryview) -> AsyncOperationsWindow:
        if len(data) != 4:
            raise ProtocolError("asynchronous operations window sub-item must be 4 bytes")
        return cls(_U16.unpack_from(data, 0)[0], _U16.unpack_from(data, 2)[0])


@dataclass(frozen=True, slots=True)
class RoleSelection:
    """SCP/SCU Role Selection sub-item (PS3.7 §D.3.3.4)."""

    sop_class_uid: str
    scu_role: bool
    scp_role: bool

    def encode(self) -> bytes:
        uid = _encode_uid(self.sop_class_uid)
        return _item(
            ItemType.ROLE_SELECTION,
            _U16.pack(len(uid)) + uid + bytes((int(self.scu_role), int(self.scp_role))),
        )

    @classmethod
    def decode(cls, data: memoryview) -> RoleSelection:
        uid, offset = _u16_prefixed(data, 0, "role selection")
        if len(data) - offset != 2:
            raise ProtocolError("role selection sub-item has the wrong length")
        scu, scp = data[offset], data[offset + 1]
        if scu > 1 or scp > 1:
            raise ProtocolError("role selection values must be 0 or 1")
        return cls(_decode_uid(uid, "role selection SOP class"), bool(scu), bool(scp))


@dataclass(frozen=True, slots=True)
class SOPClassExtendedNegotiation:
    """SOP Class Extended Negotiation sub-item (PS3.7 §D.3.3.5)."""

    sop_class_uid: str
    service_class_application_information: bytes

    def encode(self) -> bytes:
        uid = _encode_uid(self.sop_class_uid)
        return _item(
            ItemType.SOP_CLASS_EXTENDED,
            _U16.pack(len(uid)) + uid + self.service_class_application_information,
        )

    @classmethod
    def decode(cls, data: memoryview) -> SOPClassExtendedNegotiation:
        uid, offset = _u16_prefixed(data, 0, "SOP class extended negotiation")
        return cls(_decode_uid(uid, "SOP class extended UID"), bytes(data[offset:]))


@dataclass(frozen=True, slots=True)
class SOPClassCommonExtendedNegotiation:
    """SOP Class Common Extended Negotiation sub-item (PS3.7 §D.3.3.6)."""

    sop_class_uid: str
    service_class_uid: str
    related_general_sop_class_uids: tuple[str, ...] = ()

    def encode(self) -> bytes:
        sop = _encode_uid(self.sop_class_uid)
        svc = _encode_uid(self.service_class_uid)
        related = b"".join(
            _U16.pack(len(u)) + u for u in map(_encode_uid, self.related_general_sop_class_uids)
        )
        body = _U16.pack(len(sop)) + sop + _U16.pack(len(svc)) + svc
        body += _U16.pack(len(related)) + related
        return _item(ItemType.SOP_CLASS_COMMON_EXTENDED, body)

    @classmethod
    def decode(cls, data: memoryview) -> SOPClassCommonExtendedNegotiation:
        where = "SOP class common extended negotiation"
        sop, offset = _u16_prefixed(data, 0, where)
        svc, offset = _u16_prefixed(data, offset, where)
        related_raw, offset = _u16_prefixed(data, offset, where)
        if offset != len(data):
            raise ProtocolError(f"{where}: trailing bytes")
        related: list[str] = []
        pos = 0
        while pos < len(related_raw):
            uid, pos = _u16_prefixed(related_raw, pos, where)
            related.append(_decode_uid(uid, "related general SOP class"))
        return cls(
            _decode_uid(sop, "SOP class UID"), _decode_uid(svc, "service class UID"), tuple(related)
        )


@dataclass(frozen=True, slots=True)
class UserIdentityRQ:
    """User Identity sub-item in A-ASSOCIATE-RQ (PS3.7 §D.3.3.7.1).

    `identity_type`: 1 username, 2 username and passcode, 3 Kerberos, 4 SAML, 5 JWT.
    """

    identity_type: int
    positive_response_requested: bool
    primary_field: bytes
    secondary_field: bytes = b""

    def __repr__(self) -> str:
        # The passcode (type 2) and the tokens (3 to 5) are secrets: never shown.
        user = f", user={self.primary_field!r}" if self.identity_type in (1, 2) else ""
        return (
            f"UserIdentityRQ(type={self.identity_type}, "
            f"positive_response_requested={self.positive_response_requested}{user})"
        )

    def encode(self) -> bytes:
        body = bytes((self.identity_type, int(self.positive_response_requested)))
        body += _U16.pack(len(self.primary_field)) + self.primary_field
        body += _U16.pack(len(self.secondary_field)) + self.secondary_field
        return _item(ItemType.USER_IDENTITY_RQ, body)

    @classmethod
    def decode(cls, data: memoryview) -> UserIdentityRQ:
        if len(data) < 2:
            raise ProtocolError("user identity sub-item too short")
        primary, offset = _u16_prefixed(data, 2, "user identity")
        secondary, offset = _u16_prefixed(data, offset, "user identity")
        if offset != len(data):
            raise ProtocolError("user identity sub-item: trailing bytes")
        return cls(data[0], bool(data[1]), bytes(primary), bytes(secondary))


@dataclass(frozen=True, slots=True)
class UserIdentityAC:
    """User Identity sub-item in A-ASSOCIATE-AC (PS3.7 §D.3.3.7.2)."""

    server_response: bytes = b""

    def encode(self) -> bytes:
        return _item(
            ItemType.USER_IDENTITY_AC, _U16.pack(len(self.server_response)) + self.server_response
        )

    @classmethod
    def decode(cls, data: memoryview) -> UserIdentityAC:
        response, offset = _u16_prefixed(data, 0, "user identity (AC)")
        if offset != len(data):
            raise ProtocolError("user identity (AC) sub-item: trailing bytes")
        return cls(bytes(response))


@dataclass(frozen=True, slots=True)
class UnknownSubItem:
    """A user information sub-item we do not know: kept and re-sent as is."""

    item_type: int
    value: bytes

    def encode(self) -> bytes:
        return _item(self.item_type, self.value)


@dataclass(frozen=True, slots=True)
class UserInformation:
    """User Information item (PS3.8 §9.3.2.3, PS3.7 Annex D.3.3)."""

    max_length: int | None = None
    implementation_class_uid: str | None = None
    implementation_version_name: str | None = None
    async_operations_window: AsyncOperationsWindow | None = None
    role_selections: tuple[RoleSelection, ...] = ()
    sop_class_extended: tuple[SOPClassExtendedNegotiation, ...] = ()
    sop_class_common_extended: tuple[SOPClassCommonExtendedNegotiation, ...] = ()
    user_identity_rq: UserIdentityRQ | None = None
    user_identity_ac: UserIdentityAC | None = None
    unknown: tuple[UnknownSubItem, ...] = ()

    def encode(self) -> bytes:
        body = bytearray()
        if self.max_length is not None:
            body += _item(ItemType.MAXIMUM_LENGTH, _U32.pack(self.max_length))
        if self.implementation_class_uid is not None:
            body += _item(
                ItemType.IMPLEMENTATION_CLASS_UID, _encode_uid(self.implementation_class_uid)
            )
        if self.implementation_version_name is not None:
            body += _item(
                ItemType.IMPLEMENTATION_VERSION_NAME,
                self.implementation_version_name.encode("latin-1"),
            )
        if self.async_operations_window is not None:
            body += self.async_operations_window.encode()
        body += _encoded_items(self.role_selections)
        for ext in self.sop_class_extended:
            body += ext.encode()
        for common in self.sop_class_common_extended:
            body += common.encode()
        if self.user_identity_rq is not None:
            body += self.user_identity_rq.encode()
        if self.user_identity_ac is not None:
            body += self.user_identity_ac.encode()
        for unknown in self.unknown:
            body += unknown.encode()
        return _item(ItemType.USER_INFORMATION, bytes(body))

    @classmethod
    def decode(cls, data: memoryview) -> UserInformation:
        max_length: int | None = None
        impl_uid: str | None = None
        impl_version: str | None = None
        window: AsyncOperationsWindow | None = None
        roles: list[tuple[int, memoryview]] = []  # decoded together
        extended: list[SOPClassExtendedNegotiation] = []
        common: list[SOPClassCommonExtendedNegotiation] = []
        identity_rq: UserIdentityRQ | None = None
        identity_ac: UserIdentityAC | None = None
        unknown: list[UnknownSubItem] = []
        for item_type, value in _iter_items(data, "user information"):
            if item_type == ItemType.MAXIMUM_LENGTH:
                if len(value) != 4:
                    raise ProtocolError("maximum length sub-item must be 4 bytes")
                max_length = _U32.unpack_from(value, 0)[0]
            elif item_type == ItemType.IMPLEMENTATION_CLASS_UID:
                impl_uid = _decode_uid(value, "implementation class UID")
            elif item_type == ItemType.IMPLEMENTATION_VERSION_NAME:
                # Latin-1, as for AE titles: any byte reads, and writes back unchanged.
                impl_version = bytes(value).decode("latin-1").strip(" \x00")
            elif item_type == ItemType.ASYNCHRONOUS_OPERATIONS_WINDOW:
                window = AsyncOperationsWindow.decode(value)
            elif item_type == ItemType.ROLE_SELECTION:
                roles.append((item_type, value))
            elif item_type == ItemType.SOP_CLASS_EXTENDED:
                extended.append(SOPClassExtendedNegotiation.decode(value))
            elif item_type == ItemType.SOP_CLASS_COMMON_EXTENDED:
                common.append(SOPClassCommonExtendedNegotiation.decode(value))
            elif item_type == ItemType.USER_IDENTITY_RQ:
                identity_rq = UserIdentityRQ.decode(value)
            elif item_type == ItemType.USER_IDENTITY_AC:
                identity_ac = UserIdentityAC.decode(value)
            else:
                unknown.append(UnknownSubItem(item_type, bytes(value)))
        return cls(
            max_length,
            impl_uid,
            impl_version,
            window,
            _decoded_items(roles, RoleSelection.decode),
            tuple(extended),
            tuple(common),
            identity_rq,
            identity_ac,
            tuple(unknown),
        )


# --- PDUs ------------------------------------------------------------------------------------

_ASSOC_FIXED = struct.Struct(">HH16s16s32s")


def _decode_associate_body(
    data: memoryview, where: str
) -> tuple[int, str, str, str, list[tuple[int, memoryview]], UserInformation]:
    if len(data) < _ASSOC_FIXED.size:
        raise ProtocolError(f"{where} PDU too short")
    version, _reserved, called, calling, _ = _ASSOC_FIXED.unpack_from(data, 0)
    app_context: str | None = None
    contexts: list[tuple[int, memoryview]] = []
    user_info: UserInformation | None = None
    for item_type, value in _iter_items(data[_ASSOC_FIXED.size :], where):
        if item_type == ItemType.APPLICATION_CONTEXT:
            app_context = _decode_uid(value, "application context name")
        elif item_type in (ItemType.PRESENTATION_CONTEXT_RQ, ItemType.PRESENTATION_CONTEXT_AC):
            contexts.append((item_type, value))
        elif item_type == ItemType.USER_INFORMATION:
            if user_info is not None:
                raise ProtocolError(f"{where} has two user information items")
            user_info = UserInformation.decode(value)
        else:
            raise ProtocolError(f"{where}: unexpected item type 0x{item_type:02X}")
    if app_context is None:
        raise ProtocolError(f"{where} has no application context item")
    if user_info is None:
        raise ProtocolError(f"{where} has no user information item")
    return (
        version,
        _decode_ae_title(called),
        _decode_ae_title(calling),
        app_context,
        contexts,
        user_info,
    )


def _encode_associate(
    pdu_type: int,
    version: int,
    called: str,
    calling: str,
    app_context: str,
    contexts: Sequence[PresentationContextRQ] | Sequence[PresentationContextAC],
    user_information: UserInformation,
) -> bytes:
    body = bytearray(
        _ASSOC_FIXED.pack(
            version, 0, _encode_ae_title(called), _encode_ae_title(calling), b"\x00" * 32
        )
    )
    body += _item(ItemType.APPLICATION_CONTEXT, _encode_uid(app_context))
    body += _encoded_items(contexts)
    body += user_information.encode()
    return _PDU_HEADER.pack(pdu_type, len(body)) + body


# The presentation context and role selection items of recent A-ASSOCIATE PDUs encoded,
# by their tuple: a requestor proposing the same (remembered) contexts, or an acceptor
# answering a repeated request with the same (remembered) answer, encodes them once.
_encoded_memo: IdentityMemo[bytes] = IdentityMemo(64)


def _encoded_items(items: Sequence[Any]) -> bytes:
    """The items (objects with `encode()`) one after the other."""
    known = _encoded_memo.get(items)
    if known is not None:
        return known
    encoded = b"".join([item.encode() for item in items])
    if isinstance(items, tuple):  # immutable: safe to remember
        _encoded_memo.put((items,), encoded)
    return encoded


# The presentation context and role selection items of recent A-ASSOCIATE PDUs decoded,
# by their bytes: a peer that proposes (or answers) the same contexts each time is
# decoded once, and the same tuple then finds the negotiation and encoding remembered.
_decoded_memo: BoundedMemo[tuple[Any, ...]] = BoundedMemo(128)
_DECODED_MEMO_MAX_BYTES = 16384  # larger ones are decoded each time


def _decoded_items(
    items: list[tuple[int, memoryview]], decode: Callable[[memoryview], Any]
) -> tuple[Any, ...]:
    """`decode` of each item's value, all of one type. Equal bytes give the same tuple."""
    if not items:
        return ()
    # The items as they were on the wire (header and value): equal bytes, equal items.
    key = b"".join([b for t, v in items for b in (_ITEM_HEADER.pack(t, len(v)), v)])
    known = _decoded_memo.get(key)
    if known is not None:
        return known
    decoded = tuple([decode(value) for _, value in items])
    if len(key) <= _DECODED_MEMO_MAX_BYTES:
        _decoded_memo.put(key, decoded)
    return decoded


def _decoded_contexts(items: list[tuple[int, memoryview]], item_type: int) -> tuple[Any, ...]:
    """The context items of an A-ASSOCIATE-RQ or -AC (`item_type`), decoded."""
    rq = item_type == ItemType.PRESENTATION_CONTEXT_RQ
    for found, _ in items:
        if found != item_type:
            raise ProtocolError(
                "A-ASSOCIATE-RQ carries an A-ASSOCIATE-AC context item"
                if rq
                else "A-ASSOCIATE-AC carries an A-ASSOCIATE-RQ context item"
            )
    return _decoded_items(
        items, PresentationContextRQ.decode if rq else PresentationContextAC.decode
    )


@dataclass(frozen=True, slots=True)
class AAssociateRQ:
    """A-ASSOCIATE-RQ PDU (PS3.8 §9.3.2)."""

    called_ae_title: str
    calling_ae_title: str
    presentation_contexts: tuple[PresentationContextRQ, ...]
    user_information: UserInformation
    application_context_name: str = APPLICATION_CONTEXT_NAME
    protocol_version: int = 1

    pdu_type = PDUType.A_ASSOCIATE_RQ

    def encode(self) -> bytes:
        return _encode_associate(
            self.pdu_type,
            self.protocol_version,
            self.called_ae_title,
            self.calling_ae_title,
            self.application_context_name,
            self.presentation_contexts,
            self.user_information,
        )

    @classmethod
    def decode(cls, data: memoryview) -> AAssociateRQ:
        version, called, calling, app, items, user_info = _decode_associate_body(
            data, "A-ASSOCIATE-RQ"
        )
        contexts = _decoded_contexts(items, ItemType.PRESENTATION_CONTEXT_RQ)
        return cls(called, calling, contexts, user_info, app, version)


@dataclass(frozen=True, slots=True)
class AAssociateAC:
    """A-ASSOCIATE-AC PDU (PS3.8 §9.3.3)."""

    called_ae_title: str
    calling_ae_title: str
    presentation_contexts: tuple[PresentationContextAC, ...]
    user_information: UserInformation
    application_context_name: str = APPLICATION_CONTEXT_NAME
    protocol_version: int = 1

    pdu_type = PDUType.A_ASSOCIATE_AC

    def encode(self) -> bytes:
        return _encode_associate(
            self.pdu_type,
            self.protocol_version,
            self.called_ae_title,
            self.calling_ae_title,
            self.application_context_name,
            self.presentation_contexts,
            self.user_information,
        )

    @classmethod
    def decode(cls, data: memoryview) -> AAssociateAC:
        version, called, calling, app, items, user_info = _decode_associate_body(
            data, "A-ASSOCIATE-AC"
        )
        contexts = _decoded_contexts(items, ItemType.PRESENTATION_CONTEXT_AC)
        return cls(called, calling, contexts, user_info, app, version)


class RejectResult(IntEnum):
    REJECTED_PERMANENT = 1
    REJECTED_TRANSIENT = 2


class RejectSource(IntEnum):
    SERVICE_USER = 1
    SERVICE_PROVIDER_ACSE = 2
    SERVICE_PROVIDER_PRESENTATION = 3


_REJECT_REASONS: dict[tuple[int, int], str] = {
    (1, 1): "no-reason-given",
    (1, 2): "application-context-name-not-supported",
    (1, 3): "calling-AE-title-not-recognized",
    (1, 7): "called-AE-title-not-recognized",
    (2, 1): "no-reason-given",
    (2, 2): "protocol-version-not-supported",
    (3, 1): "temporary-congestion",
    (3, 2): "local-limit-exceeded",
}


def describe_rejection(result: int, source: int, reason: int) -> str:
    """Name a (result, source, reason) triple as PS3.8 Table 9-21 does."""
    results = {1: "rejected-permanent", 2: "rejected-transient"}
    sources = {
        1: "DICOM UL service-user",
        2: "DICOM UL service-provider (ACSE related function)",
        3: "DICOM UL service-provider (presentation related function)",
    }
    return (
        f"association {results.get(result, f'result {result}')} by "
        f"{sources.get(source, f'source {source}')}: "
        f"{_REJECT_REASONS.get((source, reason), f'reason {reason}')}"
    )


@dataclass(frozen=True, slots=True)
class AAssociateRJ:
    """A-ASSOCIATE-RJ PDU (PS3.8 §9.3.4)."""

    result: int
    source: int
    reason: int

    pdu_type = PDUType.A_ASSOCIATE_RJ

    def encode(self) -> bytes:
        return _PDU_HEADER.pack(self.pdu_type, 4) + bytes(
            (0, self.result, self.source, self.reason)
        )

    @classmethod
    def decode(cls, data: memoryview) -> AAssociateRJ:
        if len(data) != 4:
            raise ProtocolError("A-ASSOCIATE-RJ PDU must have length 4")
        return cls(data[1], data[2], data[3])


@dataclass(frozen=True, slots=True)
class PresentationDataValue:
    """One Presentation Data Value item (PS3.8 §9.3.5.1, Annex E.2)."""

    context_id: int
    is_command: bool
    is_last: bool
    data: bytes | memoryview = field(repr=False)

    @property
    def message_control_header(self) -> int:
        return int(self.is_command) | (int(self.is_last) << 1)


@dataclass(frozen=True, slots=True)
class PDataTF:
    """P-DATA-TF PDU (PS3.8 §9.3.5): one or more presentation data values."""

    values: tuple[PresentationDataValue, ...]

    pdu_type = PDUType.P_DATA_TF

    def encode(self) -> bytes:
        body = bytearray()
        for pdv in self.values:
            body += _PDV_HEADER.pack(len(pdv.data) + 2, pdv.context_id, pdv.message_control_header)
            body += pdv.data
        return _PDU_HEADER.pack(self.pdu_type, len(body)) + body

    @classmethod
    def decode(cls, data: memoryview) -> PDataTF:
        values: list[PresentationDataValue] = []
        offset = 0
        end = len(data)
        if end == 0:
            raise ProtocolError("P-DATA-TF PDU carries no presentation data value")
        while offset < end:
            if end - offset < PDV_HEADER_LENGTH:
                raise ProtocolError("P-DATA-TF: truncated presentation data value header")
            length, context_id, header = _PDV_HEADER.unpack_from(data, offset)
            if length < 2 or length - 2 > end - offset - PDV_HEADER_LENGTH:
                raise ProtocolError(f"P-DATA-TF: presentation data value length {length} invalid")
            if header > 3:
                raise ProtocolError(f"P-DATA-TF: message control header 0x{header:02X} invalid")
            if context_id % 2 == 0:
                raise ProtocolError(f"P-DATA-TF: presentation context ID {context_id} is even")
            start = offset + PDV_HEADER_LENGTH
            offset = start + length - 2
            values.append(
                PresentationDataValue(
                    context_id, bool(header & 1), bool(header & 2), data[start:offset]
                )
            )
        return cls(tuple(values))


def encode_pdata_header(context_id: int, control: int, data_length: int) -> bytes:
    """Header of a P-DATA-TF PDU carrying exactly one PDV of `data_length` bytes."""
    return _PDATA_ONE.pack(
        PDUType.P_DATA_TF, data_length + PDV_HEADER_LENGTH, data_length + 2, context_id, control
    )


@dataclass(frozen=True, slots=True)
class AReleaseRQ:
    """A-RELEASE-RQ PDU (PS3.8 §9.3.6)."""

    pdu_type = PDUType.A_RELEASE_RQ

    def encode(self) -> bytes:
        return _PDU_HEADER.pack(self.pdu_type, 4) + b"\x00\x00\x00\x00"

    @classmethod
    def decode(cls, data: memoryview) -> AReleaseRQ:
        if len(data) != 4:
            raise ProtocolError("A-RELEASE-RQ PDU must have length 4")
        return cls()


@dataclass(frozen=True, slots=True)
class AReleaseRP:
    """A-RELEASE-RP PDU (PS3.8 §9.3.7)."""

    pdu_type = PDUType.A_RELEASE_RP

    def encode(self) -> bytes:
        return _PDU_HEADER.pack(self.pdu_type, 4) + b"\x00\x00\x00\x00"

    @classmethod
    def decode(cls, data: memoryview) -> AReleaseRP:
        if len(data) != 4:
            raise ProtocolError("A-RELEASE-RP PDU must have length 4")
        return cls()


class AbortSource(IntEnum):
    SERVICE_USER = 0
    RESERVED = 1
    SERVICE_PROVIDER = 2


class AbortReason(IntEnum):
    """A-ABORT reasons when the source is the service-provider (PS3.8 Table 9-26)."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER_VALUE = 6


@dataclass(frozen=True, slots=True)
class AAbort:
    """A-ABORT PDU (PS3.8 §9.3.8)."""

    source: int = AbortSource.SERVICE_USER
    reason: int = 0

    pdu_type = PDUType.A_ABORT

    def encode(self) -> bytes:
        return _PDU_HEADER.pack(self.pdu_type, 4) + bytes((0, 0, self.source, self.reason))

    @classmethod
    def decode(cls, data: memoryview) -> AAbort:
        if len(data) != 4:
            raise ProtocolError("A-ABORT PDU must have length 4")
        return cls(data[2], data[3])


PDU = AAssociateRQ | AAssociateAC | AAssociateRJ | PDataTF | AReleaseRQ | AReleaseRP | AAbort

_DECODERS = {
    PDUType.A_ASSOCIATE_RQ: AAssociateRQ.decode,
    PDUType.A_ASSOCIATE_AC: AAssociateAC.decode,
    PDUType.A_ASSOCIATE_RJ: AAssociateRJ.decode,
    PDUType.P_DATA_TF: PDataTF.decode,
    PDUType.A_RELEASE_RQ: AReleaseRQ.decode,
    PDUType.A_RELEASE_RP: AReleaseRP.decode,
    PDUType.A_ABORT: AAbort.decode,
}


def parse_pdu_header(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """Return (PDU type, PDU length) of the 6-byte header at `offset` (PS3.8 §9.3.1)."""
    pdu_type, length = _PDU_HEADER.unpack_from(data, offset)
    return int(pdu_type), int(length)


def decode_pdu(pdu_type: int, body: bytes | memoryview) -> PDU:
    """Decode a PDU from its type and body (the bytes after the 6-byte header)."""
    decoder = _DECODERS.get(pdu_type)  # type: ignore[call-overload]
    if decoder is None:
        raise ProtocolError(f"unrecognized PDU type 0x{pdu_type:02X}")
    view = body if isinstance(body, memoryview) else memoryview(body)
    try:
        pdu: PDU = decoder(view)
    except ProtocolError:
        raise
    except (struct.error, IndexError, ValueError, UnicodeError) as exc:  # defensive
        raise ProtocolError(f"malformed PDU 0x{pdu_type:02X}: {exc}") from exc
    return pdu


def decode_pdu_bytes(data: bytes | memoryview) -> PDU:
    """Decode one complete PDU, header included; the length must match exactly."""
    view = data if isinstance(data, memoryview) else memoryview(data)
    if len(view) < PDU_HEADER_LENGTH:
        raise ProtocolError("PDU shorter than its header")
    pdu_type, length = parse_pdu_header(view)
    if length != len(view) - PDU_HEADER_LENGTH:
        raise ProtocolError("PDU length field does not match its size")
    return decode_pdu(pdu_type, view[PDU_HEADER_LENGTH:])
