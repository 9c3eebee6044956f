"""PDU and item encoding (PS3.8 §9.3, PS3.7 Annex D): round trips, byte layouts, strictness.

Bad bytes must only ever raise `ProtocolError` (DESIGN.md: never struct.error,
IndexError, UnicodeDecodeError, ...).
"""

from __future__ import annotations

import struct

import pytest
import strategies as sx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomnet.errors import ProtocolError
from dicomnet.proto.pdu import (
    PDU,
    AAbort,
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    AReleaseRP,
    AReleaseRQ,
    AsyncOperationsWindow,
    PDataTF,
    PresentationContextAC,
    PresentationContextRQ,
    PresentationDataValue,
    RoleSelection,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UnknownSubItem,
    UserIdentityAC,
    UserIdentityRQ,
    UserInformation,
    decode_pdu,
    decode_pdu_bytes,
    describe_rejection,
    encode_pdata_header,
    parse_pdu_header,
)

PDU_CLASSES = (AAssociateRQ, AAssociateAC, AAssociateRJ, PDataTF, AReleaseRQ, AReleaseRP, AAbort)
ROUND_TRIP = settings(max_examples=250, deadline=None)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_or_protocol_error(call: object, *args: object) -> object:
    """Run `call`; it may return or raise ProtocolError, nothing else."""
    try:
        return call(*args)  # type: ignore[operator]
    except ProtocolError:
        return None


# --- round trips -----------------------------------------------------------------------------


@ROUND_TRIP
@given(sx.pdus)
def test_every_pdu_round_trips(pdu: PDU) -> None:
    raw = pdu.encode()
    pdu_type, length = parse_pdu_header(raw)
    assert pdu_type == pdu.pdu_type
    assert raw[1] == 0  # reserved
    assert length == len(raw) - 6
    assert decode_pdu_bytes(raw) == pdu
    assert decode_pdu(pdu_type, raw[6:]) == pdu
    assert decode_pdu(pdu_type, memoryview(raw)[6:]) == pdu


@pytest.mark.parametrize(
    ("strategy", "item_type"),
    [
        (sx.presentation_contexts_rq, 0x20),
        (sx.presentation_contexts_ac(), 0x21),
        (sx.user_informations, 0x50),
        (sx.async_operations_windows, 0x53),
        (sx.role_selections, 0x54),
        (sx.sop_class_extended, 0x56),
        (sx.sop_class_common_extended, 0x57),
        (sx.user_identities_rq, 0x58),
        (sx.user_identities_ac, 0x59),
    ],
    ids=[
        "context-rq",
        "context-ac",
        "user-info",
        "async-window",
        "role",
        "sop-ext",
        "sop-common-ext",
        "identity-rq",
        "identity-ac",
    ],
)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_every_item_round_trips(
    strategy: st.SearchStrategy[object], item_type: int, data: st.DataObject
) -> None:
    item = data.draw(strategy)
    raw = item.encode()  # type: ignore[attr-defined]
    assert raw[0] == item_type
    assert raw[1] == 0
    assert struct.unpack(">H", raw[2:4])[0] == len(raw) - 4
    assert type(item).decode(memoryview(raw)[4:]) == item  # type: ignore[attr-defined]


@settings(max_examples=200, deadline=None)
@given(sx.unknown_sub_items)
def test_unknown_sub_items_are_kept(item: UnknownSubItem) -> None:
    info = UserInformation(max_length=16384, unknown=(item,))
    raw = info.encode()
    assert UserInformation.decode(memoryview(raw)[4:]) == info
    header = bytes((item.item_type, 0)) + struct.pack(">H", len(item.value))
    assert raw.endswith(header + item.value)


@settings(max_examples=200, deadline=None)
@given(sx.odd_context_ids, st.integers(0, 3), st.integers(0, 1000))
def test_pdata_header_matches_encoded_pdu(context_id: int, control: int, size: int) -> None:
    data = bytes(range(256)) * 4
    pdv = PresentationDataValue(context_id, bool(control & 1), bool(control & 2), data[:size])
    assert encode_pdata_header(context_id, control, size) + data[:size] == PDataTF((pdv,)).encode()


# --- byte layouts written out by hand from PS3.8 §9.3 ----------------------------------------


def test_associate_rj_bytes() -> None:
    # PS3.8 Table 9-21: type 03H, reserved, length 4, reserved, result, source, reason.
    raw = bytes.fromhex("03 00 00000004 00 01 01 03")
    assert decode_pdu_bytes(raw) == AAssociateRJ(result=1, source=1, reason=3)
    assert AAssociateRJ(1, 1, 3).encode() == raw
    assert AAssociateRJ(2, 3, 1).encode() == bytes.fromhex("03 00 00000004 00 02 03 01")


def test_abort_bytes() -> None:
    # PS3.8 Table 9-26: type 07H, reserved, length 4, reserved, reserved, source, reason.
    raw = bytes.fromhex("07 00 00000004 00 00 02 06")
    assert decode_pdu_bytes(raw) == AAbort(source=2, reason=6)
    assert AAbort(2, 6).encode() == raw
    assert AAbort().encode() == bytes.fromhex("07 00 00000004 00000000")


def test_release_bytes() -> None:
    # PS3.8 Tables 9-24 and 9-25: type, reserved, length 4, four reserved bytes.
    assert AReleaseRQ().encode() == bytes.fromhex("05 00 00000004 00000000")
    assert AReleaseRP().encode() == bytes.fromhex("06 00 00000004 00000000")
    assert decode_pdu_bytes(bytes.fromhex("05 00 00000004 00000000")) == AReleaseRQ()
    assert decode_pdu_bytes(bytes.fromhex("06 00 00000004 00000000")) == AReleaseRP()


def test_p_data_tf_bytes() -> None:
    # PS3.8 Table 9-22 and Annex E.2: each PDV item is item length (4), context ID (1),
    # message control header (1: bit 0 command, bit 1 last fragment), data.
    raw = bytes.fromhex(
        "04 00 00000012"  # P-DATA-TF, length 18
        "00000006 01 03 AABBCCDD"  # PDV: length 6, context 1, command + last
        "00000004 03 00 EEFF"  # PDV: length 4, context 3, data set, not last
    )
    pdu = decode_pdu_bytes(raw)
    assert pdu == PDataTF(
        (
            PresentationDataValue(1, True, True, bytes.fromhex("AABBCCDD")),
            PresentationDataValue(3, False, False, bytes.fromhex("EEFF")),
        )
    )
    assert pdu.encode() == raw
    assert [v.message_control_header for v in pdu.values] == [3, 0]  # type: ignore[union-attr]
    assert encode_pdata_header(5, 2, 3) == bytes.fromhex("04 00 00000009 00000005 05 02")


def _hand_written_associate_rq() -> bytes:
    return (
        bytes.fromhex("01 00 000000A6")  # A-ASSOCIATE-RQ, PDU length 166
        + bytes.fromhex("0001 0000")  # protocol version 1, reserved
        + b"ANY-SCP         "  # called AE title, 16 bytes, space padded
        + b"ECHOSCU         "  # calling AE title
        + bytes(32)  # reserved
        + bytes.fromhex("10 00 0015")  # application context item, length 21
        + b"1.2.840.10008.3.1.1.1"
        + bytes.fromhex("20 00 002E 01 00 00 00")  # presentation context 1, length 46
        + bytes.fromhex("30 00 0011")  # abstract syntax, length 17
        + b"1.2.840.10008.1.1"
        + bytes.fromhex("40 00 0011")  # transfer syntax, length 17
        + b"1.2.840.10008.1.2"
        + bytes.fromhex("50 00 0013")  # user information, length 19
        + bytes.fromhex("51 00 0004 00004000")  # maximum length 16384
        + bytes.fromhex("52 00 0007")  # implementation class UID, length 7
        + b"1.2.3.4"
    )


def test_associate_rq_bytes() -> None:
    raw = _hand_written_associate_rq()
    expected = AAssociateRQ(
        called_ae_title="ANY-SCP",
        calling_ae_title="ECHOSCU",
        presentation_contexts=(
            PresentationContextRQ(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",)),
        ),
        user_information=UserInformation(max_length=16384, implementation_class_uid="1.2.3.4"),
    )
    assert len(raw) == 6 + 0xA6
    assert decode_pdu_bytes(raw) == expected
    assert expected.encode() == raw


def test_a_repeated_proposal_is_decoded_once_and_a_changed_one_anew() -> None:
    """Context and role items are remembered by their bytes: a peer proposing the same
    contexts again gets the same (immutable) objects, which the negotiation and the
    encoding of the answer remember in turn; one byte changed is decoded afresh."""
    roles = (RoleSelection("1.2.840.10008.5.1.4.1.1.2", True, True),)
    rq = AAssociateRQ(
        "ANY-SCP",
        "ECHOSCU",
        tuple(
            PresentationContextRQ(2 * i + 1, f"1.2.3.{i}", ("1.2.840.10008.1.2.1",))
            for i in range(40)
        ),
        UserInformation(
            max_length=16384, implementation_class_uid="1.2.3.4", role_selections=roles
        ),
    )
    raw = rq.encode()
    first, second = decode_pdu_bytes(raw), decode_pdu_bytes(bytes(raw))
    assert first == second == rq
    assert isinstance(first, AAssociateRQ) and isinstance(second, AAssociateRQ)
    assert first.presentation_contexts is second.presentation_contexts
    assert first.user_information.role_selections is second.user_information.role_selections
    changed = bytearray(raw)
    at = bytes(changed).index(b"1.2.3.39")
    changed[at + 7] = ord("8")  # 1.2.3.39 -> 1.2.3.38
    third = decode_pdu_bytes(bytes(changed))
    assert isinstance(third, AAssociateRQ)
    assert third.presentation_contexts[-1].abstract_syntax == "1.2.3.38"
    assert first.presentation_contexts[-1].abstract_syntax == "1.2.3.39"


def test_context_items_of_the_other_kind_are_refused_even_when_remembered() -> None:
    """The memo is keyed by item type and bytes: an A-ASSOCIATE-AC's context item in an
    A-ASSOCIATE-RQ is refused whatever was decoded before."""
    ac_item = PresentationContextAC(1, 0, "1.2.840.10008.1.2").encode()
    user = UserInformation(max_length=16384, implementation_class_uid="1.2.3.4").encode()
    head = struct.pack(">HH16s16s32s", 1, 0, b"A".ljust(16), b"B".ljust(16), bytes(32))
    app = bytes.fromhex("10 00 0015") + b"1.2.840.10008.3.1.1.1"
    body = head + app + ac_item + user
    good_ac = decode_pdu_bytes(struct.pack(">BBI", 2, 0, len(body)) + body)
    assert isinstance(good_ac, AAssociateAC)
    for _ in range(2):
        with pytest.raises(ProtocolError, match="A-ASSOCIATE-AC context item"):
            decode_pdu_bytes(struct.pack(">BBI", 1, 0, len(body)) + body)


def test_associate_ac_bytes() -> None:
    raw = (
        bytes.fromhex("02 00 0000008E")  # A-ASSOCIATE-AC, length 142
        + bytes.fromhex("0001 0000")
        + b"ANY-SCP         "
        + b"ECHOSCU         "
        + bytes(32)
        + bytes.fromhex("10 00 0015")
        + b"1.2.840.10008.3.1.1.1"
        + bytes.fromhex("21 00 0019 01 00 00 00")  # context 1, result 0 (acceptance)
        + bytes.fromhex("40 00 0011")
        + b"1.2.840.10008.1.2"
        + bytes.fromhex("21 00 0004 03 00 03 00")  # context 3, result 3, no sub-item
        + bytes.fromhex("50 00 0008 51 00 0004 00010000")  # maximum length 65536
    )
    assert len(raw) == 6 + 0x8E
    pdu = decode_pdu_bytes(raw)
    assert pdu == AAssociateAC(
        "ANY-SCP",
        "ECHOSCU",
        (
            PresentationContextAC(1, 0, "1.2.840.10008.1.2"),
            PresentationContextAC(3, 3, ""),
        ),
        UserInformation(max_length=65536),
    )
    assert isinstance(pdu, AAssociateAC)
    assert [c.accepted for c in pdu.presentation_contexts] == [True, False]


def test_extended_negotiation_sub_item_bytes() -> None:
    # PS3.7 §D.3.3.3, §D.3.3.4, §D.3.3.7: layouts written out by hand.
    assert AsyncOperationsWindow(5, 0).encode() == bytes.fromhex("53 00 0004 0005 0000")
    assert RoleSelection("1.2", False, True).encode() == bytes.fromhex(
        "54 00 0007 0003 312E32 00 01"
    )
    assert UserIdentityRQ(2, True, b"ab", b"xyz").encode() == bytes.fromhex(
        "58 00 000B 02 01 0002 6162 0003 78797A"
    )
    assert UserIdentityAC(b"ok").encode() == bytes.fromhex("59 00 0004 0002 6F6B")
    assert SOPClassExtendedNegotiation("1.2", b"\x01\x00").encode() == bytes.fromhex(
        "56 00 0007 0003 312E32 0100"
    )
    assert SOPClassCommonExtendedNegotiation("1.2", "1.3", ("1.4",)).encode() == bytes.fromhex(
        "57 00 0011 0003 312E32 0003 312E33 0005 0003 312E34"
    )


def test_uid_padding_is_tolerated() -> None:
    # A UID value may be padded with a trailing NUL (PS3.8 Annex F, PS3.5 §9.1).
    raw = (
        bytes.fromhex("20 00 0013 01 00 00 00 30 00 0004")
        + b"1.2\x00"
        + bytes.fromhex("40 00 0003")
        + b"1.3"
    )
    assert PresentationContextRQ.decode(memoryview(raw)[4:]) == PresentationContextRQ(
        1, "1.2", ("1.3",)
    )


def test_describe_rejection_names_table_9_21() -> None:
    text = describe_rejection(1, 1, 7)
    assert "rejected-permanent" in text and "called-AE-title-not-recognized" in text
    assert "local-limit-exceeded" in describe_rejection(2, 3, 2)
    assert "reason 9" in describe_rejection(1, 1, 9)


# --- strictness ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        bytes.fromhex("07 00 0000"),  # shorter than the header
        bytes.fromhex("07 00 00000004 00000000 00"),  # trailing byte
        # a whole valid PDV beyond the PDU length: trailing bytes, not a second PDV
        bytes.fromhex("04 00 00000008 00000004 01 03 AABB 00000004 01 03 CCDD"),
        bytes.fromhex("07 00 00000005 0000000000"),  # A-ABORT must have length 4
        bytes.fromhex("07 00 00000003 000000"),
        bytes.fromhex("07 00 00000004 000000"),  # length says 4, only 3 follow
        bytes.fromhex("05 00 00000005 0000000000"),
        bytes.fromhex("06 00 00000002 0000"),
        bytes.fromhex("03 00 00000003 000101"),
        bytes.fromhex("04 00 00000000"),  # P-DATA-TF without any PDV
        bytes.fromhex("04 00 00000006 00000003 01 03"),  # PDV length 3 overruns
        bytes.fromhex("04 00 00000006 00000001 01 03"),  # PDV length below 2
        bytes.fromhex("04 00 00000005 00000001 01"),  # truncated PDV header
        bytes.fromhex("04 00 00000007 00000003 01 04 00"),  # message control header 4
        bytes.fromhex("04 00 00000007 00000003 02 03 00"),  # even presentation context ID
        bytes.fromhex("08 00 00000004 00000000"),  # no such PDU type
        bytes.fromhex("00 00 00000000"),
    ],
)
def test_malformed_pdus_raise_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_pdu_bytes(raw)


def _replace(raw: bytes, old: bytes, new: bytes) -> bytes:
    assert raw.count(old) == 1
    return raw.replace(old, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # user information item length one too large (overruns the PDU)
        (bytes.fromhex("50 00 0013"), bytes.fromhex("50 00 0014")),
        # abstract syntax sub-item length overruns its presentation context
        (bytes.fromhex("30 00 0011"), bytes.fromhex("30 00 0030")),
        # a presentation context with an AC item type in an RQ
        (bytes.fromhex("20 00 002E 01"), bytes.fromhex("21 00 002E 01")),
        # maximum length sub-item of 3 bytes
        (bytes.fromhex("51 00 0004 00004000"), bytes.fromhex("51 00 0003 000040 00")),
        # an item type that does not belong in the variable field
        (bytes.fromhex("10 00 0015"), bytes.fromhex("11 00 0015")),
        # a transfer syntax that is not ASCII
        (b"1.2.840.10008.1.2" + bytes.fromhex("50"), b"1.2.840.10008.1.\xff" + bytes.fromhex("50")),
    ],
)
def test_malformed_associate_rq_items(old: bytes, new: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_pdu_bytes(_replace(_hand_written_associate_rq(), old, new))


def test_associate_rq_needs_its_mandatory_items() -> None:
    raw = _hand_written_associate_rq()
    no_user_info = raw[: -(4 + 0x13)]
    body = no_user_info[6:]
    with pytest.raises(ProtocolError, match="user information"):
        decode_pdu(1, body)
    start = raw.index(bytes.fromhex("10 00 0015"))
    no_app_context = raw[6:start] + raw[start + 4 + 21 :]
    with pytest.raises(ProtocolError, match="application context"):
        decode_pdu(1, no_app_context)
    with pytest.raises(ProtocolError):
        decode_pdu(1, raw[6 : 6 + 60])  # shorter than the fixed fields


def test_sub_item_strictness() -> None:
    with pytest.raises(ProtocolError):
        AsyncOperationsWindow.decode(memoryview(bytes(5)))
    with pytest.raises(ProtocolError):
        RoleSelection.decode(memoryview(bytes.fromhex("0003 312E32 00 02")))  # role value 2
    with pytest.raises(ProtocolError):
        RoleSelection.decode(memoryview(bytes.fromhex("0003 312E32 00")))  # one role byte
    with pytest.raises(ProtocolError):
        UserIdentityRQ.decode(memoryview(bytes.fromhex("02 01 0002 6162 0000 FF")))  # trailing
    with pytest.raises(ProtocolError):
        UserIdentityAC.decode(memoryview(bytes.fromhex("0003 6F6B")))  # overrun
    with pytest.raises(ProtocolError):
        SOPClassCommonExtendedNegotiation.decode(memoryview(bytes.fromhex("0001 31 0001 32")))
    with pytest.raises(ProtocolError):
        PresentationContextAC.decode(memoryview(bytes.fromhex("01 00 05 00")))  # result 5
    with pytest.raises(ProtocolError):
        PresentationContextAC.decode(memoryview(bytes.fromhex("01 00 00 00")))  # accepted, no TS
    with pytest.raises(ProtocolError):
        PresentationContextRQ.decode(memoryview(bytes.fromhex("01 00 00 00 30 00 0001 31")))


@settings(max_examples=50, deadline=None)
@given(st.one_of(sx.associate_rqs, sx.associate_acs))
def test_any_truncation_of_an_associate_pdu_is_refused(pdu: AAssociateRQ | AAssociateAC) -> None:
    raw = pdu.encode()
    body = raw[6:]
    # Every cut loses the user information item (last), in part or whole.
    for cut in range(len(body)):
        with pytest.raises(ProtocolError):
            decode_pdu(raw[0], body[:cut])
    with pytest.raises(ProtocolError):
        decode_pdu_bytes(raw + b"\x00")
    with pytest.raises(ProtocolError):
        decode_pdu_bytes(raw[:-1])


# --- fuzzing: only ProtocolError, ever -------------------------------------------------------


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_protocol_error(raw: bytes) -> None:
    result = _decode_or_protocol_error(decode_pdu_bytes, raw)
    assert result is None or isinstance(result, PDU_CLASSES)


@FUZZ
@given(st.integers(0, 0xFF), st.binary(max_size=600))
def test_random_bodies_raise_only_protocol_error(pdu_type: int, body: bytes) -> None:
    result = _decode_or_protocol_error(decode_pdu, pdu_type, body)
    assert result is None or isinstance(result, PDU_CLASSES)
    if not 1 <= pdu_type <= 7:
        assert result is None


@FUZZ
@given(st.sampled_from([1, 2]), st.binary(min_size=68, max_size=400))
def test_random_associate_variable_fields_raise_only_protocol_error(
    pdu_type: int, body: bytes
) -> None:
    # Past the fixed 68 bytes, so that the item parser is what gets exercised.
    result = _decode_or_protocol_error(decode_pdu, pdu_type, body)
    assert result is None or isinstance(result, (AAssociateRQ, AAssociateAC))


@FUZZ
@given(data=st.data())
def test_mutated_pdus_raise_only_protocol_error(data: st.DataObject) -> None:
    pdu = data.draw(sx.pdus)
    raw = data.draw(sx.mutated(pdu.encode()))
    result = _decode_or_protocol_error(decode_pdu_bytes, raw)
    assert result is None or isinstance(result, PDU_CLASSES)
    if len(raw) >= 6:
        result = _decode_or_protocol_error(decode_pdu, raw[0], raw[6:])
        assert result is None or isinstance(result, PDU_CLASSES)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_user_information_raises_only_protocol_error(data: st.DataObject) -> None:
    info = data.draw(sx.user_informations)
    raw = data.draw(sx.mutated(info.encode()[4:]))
    result = _decode_or_protocol_error(UserInformation.decode, memoryview(raw))
    assert result is None or isinstance(result, UserInformation)
