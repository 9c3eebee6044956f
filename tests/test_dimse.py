"""DIMSE command sets (PS3.7 §6.3, §9.3, §E.1), P-DATA fragmentation and reassembly
(PS3.8 §9.3.5, Annex E), Message IDs and DIMSE deadlines.
"""

from __future__ import annotations

import struct
from dataclasses import fields as dataclass_fields
from io import BytesIO

import pytest
import strategies as sx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue

from dicomnet.errors import ProtocolError
from dicomnet.proto.dimse import (
    CCancelRQ,
    CEchoRQ,
    CEchoRSP,
    CFindRQ,
    CommandReceived,
    CStoreRQ,
    CStoreRSP,
    DatasetFragment,
    DimseMessage,
    MessageAssembler,
    NActionRQ,
    NActionRSP,
    NCreateRQ,
    NCreateRSP,
    NDeleteRQ,
    NDeleteRSP,
    NEventReportRQ,
    NEventReportRSP,
    NGetRQ,
    NGetRSP,
    NSetRQ,
    NSetRSP,
    UnrecognizedRQ,
    UnrecognizedRSP,
    decode_command,
    encode_command,
    encode_command_pdus,
    encode_message,
    failure_response,
    fragment,
)
from dicomnet.proto.pdu import PDataTF, PresentationDataValue, decode_pdu_bytes, parse_pdu_header

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Keyword of each dataclass attribute in the command set (PS3.7 Annex E).
KEYWORDS = {
    "message_id": "MessageID",
    "message_id_being_responded_to": "MessageIDBeingRespondedTo",
    "affected_sop_class_uid": "AffectedSOPClassUID",
    "affected_sop_instance_uid": "AffectedSOPInstanceUID",
    "priority": "Priority",
    "status": "Status",
    "error_comment": "ErrorComment",
    "offending_element": "OffendingElement",
    "move_destination": "MoveDestination",
    "move_originator_ae_title": "MoveOriginatorApplicationEntityTitle",
    "move_originator_message_id": "MoveOriginatorMessageID",
    "remaining": "NumberOfRemainingSuboperations",
    "completed": "NumberOfCompletedSuboperations",
    "failed": "NumberOfFailedSuboperations",
    "warning": "NumberOfWarningSuboperations",
}
COMMAND_FIELDS = {
    "CEchoRQ": 0x0030,
    "CEchoRSP": 0x8030,
    "CStoreRQ": 0x0001,
    "CStoreRSP": 0x8001,
    "CFindRQ": 0x0020,
    "CFindRSP": 0x8020,
    "CGetRQ": 0x0010,
    "CGetRSP": 0x8010,
    "CMoveRQ": 0x0021,
    "CMoveRSP": 0x8021,
    "CCancelRQ": 0x0FFF,
    # PS3.7 §10.3 (Tables 10.3-1 to 10.3-12)
    "NEventReportRQ": 0x0100,
    "NEventReportRSP": 0x8100,
    "NGetRQ": 0x0110,
    "NGetRSP": 0x8110,
    "NSetRQ": 0x0120,
    "NSetRSP": 0x8120,
    "NActionRQ": 0x0130,
    "NActionRSP": 0x8130,
    "NCreateRQ": 0x0140,
    "NCreateRSP": 0x8140,
    "NDeleteRQ": 0x0150,
    "NDeleteRSP": 0x8150,
}

# The command fields of each DIMSE-N message, as PS3.7 Tables 10.3-1 to 10.3-12 list
# them: M (always sent), and the others (U, C) that may be; plus, for responses, the
# status-related fields of PS3.7 Annex C (Error Comment, Error ID, Attribute Identifier
# List). Group length, Command Field and Command Data Set Type are in every one.
ALWAYS = {0x0000, 0x0100, 0x0800}
RSP_STATUS_FIELDS = {0x0902, 0x0903}
N_TABLES: dict[type, tuple[set[int], set[int]]] = {
    NEventReportRQ: ({0x0002, 0x0110, 0x1000, 0x1002}, set()),
    NEventReportRSP: ({0x0120, 0x0900}, {0x0002, 0x1000, 0x1002} | RSP_STATUS_FIELDS),
    NGetRQ: ({0x0003, 0x0110, 0x1001}, {0x1005}),
    NGetRSP: ({0x0120, 0x0900}, {0x0002, 0x1000, 0x1005} | RSP_STATUS_FIELDS),
    NSetRQ: ({0x0003, 0x0110, 0x1001}, set()),
    NSetRSP: ({0x0120, 0x0900}, {0x0002, 0x1000, 0x1005} | RSP_STATUS_FIELDS),
    NActionRQ: ({0x0003, 0x0110, 0x1001, 0x1008}, set()),
    NActionRSP: ({0x0120, 0x0900}, {0x0002, 0x1000, 0x1008} | RSP_STATUS_FIELDS),
    NCreateRQ: ({0x0002, 0x0110}, {0x1000}),
    NCreateRSP: ({0x0120, 0x0900}, {0x0002, 0x1000, 0x1005} | RSP_STATUS_FIELDS),
    NDeleteRQ: ({0x0003, 0x0110, 0x1001}, set()),
    NDeleteRSP: ({0x0120, 0x0900}, {0x0002, 0x1000} | RSP_STATUS_FIELDS),
}


def elements(raw: bytes) -> list[tuple[int, int, bytes]]:
    """(group, element, value) of each implicit VR little endian element."""
    out = []
    offset = 0
    while offset < len(raw):
        group, element, length = struct.unpack_from("<HHI", raw, offset)
        out.append((group, element, raw[offset + 8 : offset + 8 + length]))
        offset += 8 + length
    assert offset == len(raw)
    return out


# --- command sets ----------------------------------------------------------------------------


def test_c_echo_rq_bytes_by_hand() -> None:
    # PS3.7 §9.3.5.1 / Annex E: implicit VR little endian, ascending tags, group length first.
    expected = (
        bytes.fromhex("0000 0000 04000000 38000000")  # (0000,0000) UL 4: 56
        + bytes.fromhex("0000 0200 12000000")  # (0000,0002) UI 18
        + b"1.2.840.10008.1.1\x00"  # padded to even length with NUL
        + bytes.fromhex("0000 0001 02000000 3000")  # (0000,0100) US: 0030H C-ECHO-RQ
        + bytes.fromhex("0000 1001 02000000 0100")  # (0000,0110) US: Message ID 1
        + bytes.fromhex("0000 0008 02000000 0101")  # (0000,0800) US: 0101H no data set
    )
    assert encode_command(CEchoRQ(message_id=1)) == expected
    assert decode_command(expected) == (CEchoRQ(1), False)


def test_c_echo_rsp_bytes_by_hand() -> None:
    expected = (
        bytes.fromhex("0000 0000 04000000 42000000")  # group length 66
        + bytes.fromhex("0000 0200 12000000")
        + b"1.2.840.10008.1.1\x00"
        + bytes.fromhex("0000 0001 02000000 3080")  # 8030H C-ECHO-RSP
        + bytes.fromhex("0000 2001 02000000 0500")  # (0000,0120) responding to 5
        + bytes.fromhex("0000 0008 02000000 0101")
        + bytes.fromhex("0000 0009 02000000 0000")  # (0000,0900) Status: success
    )
    assert encode_command(CEchoRSP(5)) == expected


def test_n_action_rq_bytes_by_hand() -> None:
    # PS3.7 Table 10.3-7: Requested SOP Class/Instance UID, Action Type ID; ascending tags.
    expected = (
        bytes.fromhex("0000 0000 04000000 62000000")  # group length 98
        + bytes.fromhex("0000 0300 14000000")  # (0000,0003) Requested SOP Class UID, 20
        + b"1.2.840.10008.1.20.1"
        + bytes.fromhex("0000 0001 02000000 3001")  # 0130H N-ACTION-RQ
        + bytes.fromhex("0000 1001 02000000 0700")  # Message ID 7
        + bytes.fromhex("0000 0008 02000000 0000")  # a data set follows
        + bytes.fromhex("0000 0110 16000000")  # (0000,1001) Requested SOP Instance UID, 22
        + b"1.2.840.10008.1.20.1.1"
        + bytes.fromhex("0000 0810 02000000 0100")  # (0000,1008) Action Type ID 1
    )
    message = NActionRQ(7, "1.2.840.10008.1.20.1", "1.2.840.10008.1.20.1.1", 1)
    assert encode_command(message, has_dataset=True) == expected
    assert decode_command(expected) == (message, True)


def test_n_create_rq_without_an_instance_leaves_the_element_out() -> None:
    raw = encode_command(NCreateRQ(2, "1.2.840.10008.3.1.2.3.3"), has_dataset=True)
    assert 0x1000 not in {e for _, e, _ in elements(raw)}
    assert decode_command(raw) == (NCreateRQ(2, "1.2.840.10008.3.1.2.3.3"), True)


@pytest.mark.parametrize("cls", list(N_TABLES), ids=lambda c: c.__name__)
def test_n_messages_carry_the_fields_of_their_table(cls: type) -> None:
    required, optional = N_TABLES[cls]
    names = [f.name for f in dataclass_fields(cls)]
    values = {
        "message_id": 3,
        "message_id_being_responded_to": 3,
        "status": 0x0112,
        "event_type_id": 2,
        "action_type_id": 1,
        "attribute_identifier_list": (0x00100010, 0x00100020),
        "error_comment": "why",
        "error_id": 9,
    }
    everything = cls(*[values.get(name, "1.2.3") for name in names])
    minimal = cls(*[values.get(name, "1.2.3") for name in names if name in _required(cls)])
    full = {e for _, e, _ in elements(encode_command(everything))}
    least = {e for _, e, _ in elements(encode_command(minimal))}
    assert full <= ALWAYS | required | optional
    assert least == ALWAYS | required
    assert decode_command(encode_command(everything)) == (everything, False)


def _required(cls: type) -> set[str]:
    from dataclasses import MISSING

    return {f.name for f in dataclass_fields(cls) if f.default is MISSING}


def test_an_unknown_command_decodes_as_unrecognized_and_is_answered_0211() -> None:
    raw = encode_command(UnrecognizedRQ(0x0999, 12, "1.2.3"))
    message, has_dataset = decode_command(raw)
    assert message == UnrecognizedRQ(0x0999, 12, "1.2.3") and not has_dataset
    answer = failure_response(message, 0x0211, "unrecognized operation")
    assert answer == UnrecognizedRSP(0x8999, 12, 0x0211, "1.2.3", "unrecognized operation")
    assert decode_command(encode_command(answer)) == (answer, False)
    values = {e: v for _, e, v in elements(encode_command(answer))}
    assert struct.unpack("<H", values[0x0100])[0] == 0x8999


def test_failure_responses_name_what_the_request_named() -> None:
    request = NSetRQ(4, "1.2.840.10008.3.1.2.3.3", "1.2.3.4")
    answer = failure_response(request, 0x0112, "x" * 80)
    assert answer == NSetRSP(
        4, 0x0112, "1.2.840.10008.3.1.2.3.3", "1.2.3.4", error_comment="x" * 64
    )
    create = failure_response(NCreateRQ(5, "1.2.840.10008.3.1.2.3.3"), 0x0111)
    assert create == NCreateRSP(5, 0x0111, "1.2.840.10008.3.1.2.3.3")


@FAST
@given(sx.dimse_messages, st.booleans())
def test_command_round_trip(message: DimseMessage, has_dataset: bool) -> None:
    raw = encode_command(message, has_dataset=has_dataset)
    assert decode_command(raw) == (message, has_dataset)
    assert decode_command(memoryview(raw)) == (message, has_dataset)


@FAST
@given(sx.dimse_messages, st.booleans())
def test_command_set_structure(message: DimseMessage, has_dataset: bool) -> None:
    raw = encode_command(message, has_dataset=has_dataset)
    parsed = elements(raw)
    group, element, value = parsed[0]
    assert (group, element, len(value)) == (0, 0, 4)
    assert struct.unpack("<I", value)[0] == len(raw) - 12  # group length after itself
    tags = [(g, e) for g, e, _ in parsed]
    assert tags == sorted(tags) and len(set(tags)) == len(tags)
    assert all(g == 0 for g, _, _ in parsed)
    assert all(len(v) % 2 == 0 for _, _, v in parsed)  # PS3.5 §7.1.1: even lengths
    values = {e: v for _, e, v in parsed}
    assert struct.unpack("<H", values[0x0100])[0] == COMMAND_FIELDS[type(message).__name__]
    assert struct.unpack("<H", values[0x0800])[0] == (0x0000 if has_dataset else 0x0101)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sx.dimse_messages, st.booleans())
def test_pydicom_reads_our_command_sets(message: DimseMessage, has_dataset: bool) -> None:
    raw = encode_command(message, has_dataset=has_dataset)
    ds = read_dataset(BytesIO(raw), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert ds.CommandField == message.command_field
    assert (ds.CommandDataSetType != 0x0101) == has_dataset
    for attr, keyword in KEYWORDS.items():
        value = getattr(message, attr, None)
        if value is None:
            assert keyword not in ds
            continue
        if attr == "offending_element":
            got = ds[keyword].value
            tags = list(got) if isinstance(got, (list, MultiValue)) else [got]
            assert [int(t) for t in tags] == list(value)
        else:
            assert ds[keyword].value == value, keyword


def test_rsp_without_sop_class_omits_the_element() -> None:
    raw = encode_command(CEchoRSP(1, affected_sop_class_uid=None))
    assert 0x0002 not in {e for _, e, _ in elements(raw)}
    raw = encode_command(CStoreRSP(3, 0x0000))
    assert {e for _, e, _ in elements(raw)} == {0x0000, 0x0100, 0x0120, 0x0800, 0x0900}


def test_store_rq_fields() -> None:
    message = CStoreRQ(
        message_id=9,
        affected_sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
        affected_sop_instance_uid="1.2.3.4.5",
        priority=2,
        move_originator_ae_title="MOVER",
        move_originator_message_id=77,
    )
    raw = encode_command(message, has_dataset=True)
    values = {e: v for _, e, v in elements(raw)}
    assert values[0x1030] == b"MOVER "  # AE padded with a space to even length
    assert values[0x1000] == b"1.2.3.4.5\x00"  # UI padded with NUL
    assert struct.unpack("<H", values[0x1031])[0] == 77
    assert decode_command(raw) == (message, True)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00",  # truncated element header
        bytes.fromhex("0000 0000 04000000 00000000"),  # no command field
        bytes.fromhex("0000 0001 02000000 3001"),  # N-ACTION-RQ without its fields
        bytes.fromhex("0000 0001 02000000 3000"),  # C-ECHO-RQ without Message ID
        bytes.fromhex("0000 0001 03000000 300000"),  # US of 3 bytes
        bytes.fromhex("0000 0001 02000000 30"),  # value overruns
        bytes.fromhex("0800 1600 02000000 3000"),  # an element outside group 0000
        bytes.fromhex("0000 0001 02000000 FF0F 0000 0109 03000000 010203"),  # AT not 4n
    ],
)
def test_malformed_command_sets(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_command(raw)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_command_bytes_raise_only_protocol_error(raw: bytes) -> None:
    try:
        message, _ = decode_command(raw)
    except ProtocolError:
        return
    assert message.command_field in COMMAND_FIELDS.values()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_command_sets_raise_only_protocol_error(data: st.DataObject) -> None:
    message = data.draw(sx.dimse_messages)
    raw = data.draw(sx.mutated(encode_command(message)))
    try:
        decode_command(raw)
    except ProtocolError:
        pass


# --- fragmentation ---------------------------------------------------------------------------

max_lengths = st.one_of(st.integers(7, 600), st.sampled_from([0, 4096, 16384, 65536]))


def split_pdus(stream: bytes) -> list[PDataTF]:
    out = []
    offset = 0
    while offset < len(stream):
        _, length = parse_pdu_header(stream, offset)
        pdu = decode_pdu_bytes(stream[offset : offset + 6 + length])
        assert isinstance(pdu, PDataTF)
        out.append(pdu)
        offset += 6 + length
    assert offset == len(stream)
    return out


@FAST
@given(
    sx.odd_context_ids,
    st.binary(max_size=3000),
    st.booleans(),
    max_lengths,
    st.booleans(),
)
def test_fragment_respects_max_pdu_length(
    context_id: int, data: bytes, is_command: bool, max_length: int, is_final: bool
) -> None:
    pieces = list(fragment(context_id, data, is_command, max_length, is_final=is_final))
    stream = b"".join(pieces)
    pdus = split_pdus(stream)
    offset = 0
    for pdu in pdus:
        _, length = parse_pdu_header(pdu.encode())
        if max_length:
            assert length <= max_length
        (pdv,) = pdu.values
        assert pdv.context_id == context_id
        assert pdv.is_command == is_command
        offset += len(pdv.data)
    assert offset == len(data)
    assert b"".join(bytes(p.values[0].data) for p in pdus) == data
    lasts = [p.values[0].is_last for p in pdus]
    assert lasts == [False] * (len(pdus) - 1) + [is_final]
    # Fragments are as large as allowed: only the last may be short.
    if max_length and len(pdus) > 1:
        assert all(len(p.values[0].data) == max_length - 6 for p in pdus[:-1])
    # The data pieces share the caller's memory.
    assert all(isinstance(p, (bytes, memoryview)) for p in pieces)
    assert all(isinstance(p, memoryview) for p in pieces[1::2])


@given(sx.odd_context_ids, st.binary(max_size=700), max_lengths)
def test_command_pdus_are_the_fragments_joined(
    context_id: int, command: bytes, max_length: int
) -> None:
    """One PDU when the command fits, else the same fragments as `fragment()` gives."""
    joined = encode_command_pdus(context_id, command, max_length)
    assert joined == b"".join(fragment(context_id, command, True, max_length))


def test_elements_of_other_message_types_are_not_decoded() -> None:
    """A command set is decoded for its message type: an element that type does not have
    is skipped like an unknown one, whatever its value."""
    message = CEchoRQ(7)
    raw = encode_command(message)
    stray_priority = struct.pack("<HHI", 0, 0x0700, 3) + b"\x01\x02\x03"  # US of 3 bytes
    body = raw[12:] + stray_priority
    command = struct.pack("<HHII", 0, 0, 4, len(body)) + body
    assert decode_command(command) == (message, False)
    # The same element is checked where it belongs.
    store = encode_command(CStoreRQ(1, "1.2", "1.2.3"), has_dataset=True)
    body = store[12:].replace(struct.pack("<HHIH", 0, 0x0700, 2, 0), stray_priority)
    with pytest.raises(ProtocolError, match="US command element must be 2 bytes"):
        decode_command(struct.pack("<HHII", 0, 0, 4, len(body)) + body)


@pytest.mark.parametrize("max_length", [7, 8, 100, 1000, 16384])
def test_fragment_counts(max_length: int) -> None:
    payload = max_length - 6
    for size in (0, 1, payload - 1, payload, payload + 1, 3 * payload, 3 * payload + 1):
        if size < 0:
            continue
        pdus = split_pdus(b"".join(fragment(1, bytes(size), False, max_length)))
        assert len(pdus) == max(1, -(-size // payload))


@FAST
@given(
    sx.dimse_messages,
    st.one_of(st.none(), st.binary(max_size=2000)),
    max_lengths,
    sx.odd_context_ids,
)
def test_encode_message_and_reassemble(
    message: DimseMessage, dataset: bytes | None, max_length: int, context_id: int
) -> None:
    stream = encode_message(context_id, message, dataset, max_length)
    pdus = split_pdus(stream)
    pdvs = [v for p in pdus for v in p.values]
    if max_length:
        assert all(len(p.encode()) - 6 <= max_length for p in pdus)
    commands = [v for v in pdvs if v.is_command]
    assert pdvs[: len(commands)] == commands  # command first, then the data set
    assert [v.is_last for v in commands] == [False] * (len(commands) - 1) + [True]

    assembler = MessageAssembler()
    results = [assembler.feed(v) for v in pdvs]
    received = [r for r in results if r is not None]
    assert received[0] == CommandReceived(context_id, message, dataset is not None)
    fragments = received[1:]
    assert all(isinstance(f, DatasetFragment) for f in fragments)
    if dataset is None:
        assert fragments == []
    else:
        assert b"".join(bytes(f.data) for f in fragments) == dataset  # type: ignore[union-attr]
        assert [f.is_last for f in fragments] == [False] * (len(fragments) - 1) + [True]  # type: ignore[union-attr]
    assert not assembler.in_message


# --- reassembly errors -----------------------------------------------------------------------


def pdv(context_id: int, command: bool, last: bool, data: bytes = b"") -> PresentationDataValue:
    return PresentationDataValue(context_id, command, last, data)


def test_dataset_before_command() -> None:
    with pytest.raises(ProtocolError):
        MessageAssembler().feed(pdv(1, False, True, b"data"))


def test_dataset_after_a_command_without_dataset() -> None:
    assembler = MessageAssembler()
    assert assembler.feed(pdv(1, True, True, encode_command(CEchoRQ(1)))) is not None
    assert not assembler.in_message
    with pytest.raises(ProtocolError):
        assembler.feed(pdv(1, False, True, b"data"))


def test_command_fragments_on_two_contexts() -> None:
    raw = encode_command(CEchoRQ(1))
    assembler = MessageAssembler()
    assert assembler.feed(pdv(1, True, False, raw[:10])) is None
    assert assembler.in_message
    with pytest.raises(ProtocolError):
        assembler.feed(pdv(3, True, True, raw[10:]))


def test_dataset_on_another_context() -> None:
    assembler = MessageAssembler()
    received = assembler.feed(
        pdv(1, True, True, encode_command(CFindRQ(1, "1.2.840.10008.5.1.4.1.2.2.1"), True))
    )
    assert isinstance(received, CommandReceived) and received.has_dataset
    assert assembler.in_message
    with pytest.raises(ProtocolError):
        assembler.feed(pdv(3, False, True, b"xx"))


def test_command_in_the_middle_of_a_dataset() -> None:
    assembler = MessageAssembler()
    assembler.feed(pdv(1, True, True, encode_command(CEchoRQ(1), has_dataset=True)))
    fragment_ = assembler.feed(pdv(1, False, False, b"part"))
    assert isinstance(fragment_, DatasetFragment) and not fragment_.is_last
    with pytest.raises(ProtocolError):
        assembler.feed(pdv(1, True, True, encode_command(CEchoRQ(2))))


def test_unaccepted_context_is_refused() -> None:
    assembler = MessageAssembler(is_context_valid=lambda cid: cid == 1)
    with pytest.raises(ProtocolError):
        assembler.feed(pdv(3, True, True, encode_command(CEchoRQ(1))))
    received = assembler.feed(pdv(1, True, True, encode_command(CEchoRQ(1))))
    assert received == CommandReceived(1, CEchoRQ(1), False)


def test_oversize_command_set_is_refused() -> None:
    assembler = MessageAssembler()
    with pytest.raises(ProtocolError):
        for _ in range(20):
            assembler.feed(pdv(1, True, False, bytes(64 * 1024)))


def test_many_messages_in_a_row() -> None:
    assembler = MessageAssembler()
    stream = b"".join(
        encode_message(1, CStoreRQ(i, "1.2.3", f"1.2.3.{i}"), bytes([i]) * 100, 64)
        for i in range(1, 6)
    ) + encode_message(1, CCancelRQ(3), None, 64)
    results = [assembler.feed(v) for p in split_pdus(stream) for v in p.values]
    commands = [r for r in results if isinstance(r, CommandReceived)]
    assert [c.message for c in commands] == [
        *(CStoreRQ(i, "1.2.3", f"1.2.3.{i}") for i in range(1, 6)),
        CCancelRQ(3),
    ]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.integers(1, 4))
def test_garbage_command_pdvs_raise_only_protocol_error(raw: bytes, pieces: int) -> None:
    assembler = MessageAssembler()
    size = max(1, -(-len(raw) // pieces))
    chunks = [raw[i : i + size] for i in range(0, len(raw), size)] or [b""]
    try:
        for index, chunk in enumerate(chunks):
            assembler.feed(pdv(1, True, index == len(chunks) - 1, chunk))
    except ProtocolError:
        pass
