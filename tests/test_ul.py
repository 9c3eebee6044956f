"""The Upper Layer protocol machine (`dicomnet.proto.ul.UpperLayer`) walked cell by cell
through PS3.8 Table 9-10, plus framing, timers (on a FakeClock) and whole exchanges
between an in-memory requestor/acceptor pair.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import strategies as sx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomnet.errors import InvalidStateError
from dicomnet.proto.dimse import CEchoRQ, CommandReceived, MessageAssembler, encode_message
from dicomnet.proto.fsm import ACTION_NEXT_STATES, TRANSITIONS, Action, Event, State
from dicomnet.proto.pdu import (
    AAbort,
    AAssociateRJ,
    AAssociateRQ,
    AReleaseRP,
    AReleaseRQ,
    PDataTF,
    PresentationDataValue,
    decode_pdu_bytes,
    parse_pdu_header,
)
from dicomnet.proto.ul import (
    HARD_MAX_PDU_LENGTH,
    MAX_ASSOCIATION_PDU_LENGTH,
    NEED_DATA,
    Aborted,
    AssociateAccepted,
    AssociateRejected,
    AssociateRequested,
    ConnectionClosed,
    DataReceived,
    ReleaseConfirmed,
    ReleaseRequested,
    ULEvent,
    UpperLayer,
)
from dicomnet.testing import (
    FakeClock,
    UpperLayerPair,
    build_abort,
    build_associate_ac,
    build_associate_rj,
    build_associate_rq,
    build_p_data,
)

ARTIM = 30.0
MAX_PDU = 16384
RQ = build_associate_rq(called_ae_title="STORESCP", calling_ae_title="STORESCU")
AC = build_associate_ac(RQ)
RJ = build_associate_rj(1, 1, 7)
PDATA = build_p_data(b"\x01\x02\x03\x04", 1, is_command=True, is_last=True)
INCOMING_ABORT = AAbort(source=2, reason=4)
GARBAGE = bytes.fromhex("09 00 00000000")  # PDU type 09H does not exist: Evt19


def drain(ul: UpperLayer, limit: int = 10_000) -> list[ULEvent]:
    """Every event `ul` has until NEED_DATA (bounded: a machine must never loop)."""
    events: list[ULEvent] = []
    for _ in range(limit):
        event = ul.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)  # type: ignore[arg-type]
    raise AssertionError("next_event() never returned NEED_DATA")


def feed(ul: UpperLayer, data: bytes) -> list[ULEvent]:
    """Bytes received, then every event (no bytes is not fed: it would mean "closed")."""
    if data:
        ul.receive_data(data)
    return drain(ul)


def pdus_in(data: bytes) -> list[object]:
    """Split written bytes into decoded PDUs (and check they are well-formed)."""
    out: list[object] = []
    offset = 0
    while offset < len(data):
        _, length = parse_pdu_header(data, offset)
        out.append(decode_pdu_bytes(data[offset : offset + 6 + length]))
        offset += 6 + length
    return out


# --- driving a machine into each state -------------------------------------------------------

REQUESTOR, ACCEPTOR = True, False
STATE_ROLES: dict[State, tuple[bool, ...]] = {
    State.STA1: (REQUESTOR, ACCEPTOR),
    State.STA2: (ACCEPTOR,),
    State.STA3: (ACCEPTOR,),
    State.STA4: (REQUESTOR,),
    State.STA5: (REQUESTOR,),
    State.STA6: (REQUESTOR, ACCEPTOR),
    State.STA7: (REQUESTOR, ACCEPTOR),
    State.STA8: (REQUESTOR, ACCEPTOR),
    State.STA9: (REQUESTOR,),  # release collision, requestor side
    State.STA10: (ACCEPTOR,),  # release collision, acceptor side
    State.STA11: (REQUESTOR,),
    State.STA12: (ACCEPTOR,),
    State.STA13: (REQUESTOR, ACCEPTOR),
}
STA13_ROUTES = ("abort", "release", "provider-abort", "reject")


class Clocked(UpperLayer):
    """An `UpperLayer` whose calls take their `now` from a fake clock when not given
    one: the tables below walk states and events, the time tests move the clock."""

    def __init__(self, clock: FakeClock, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.clock = clock

    def _at(self, now: float | None) -> float:
        return self.clock() if now is None else now

    def connection_made(self, now: float | None = None) -> bytes:
        return super().connection_made(self._at(now))

    def receive_data(self, data: bytes | bytearray | memoryview, now: float | None = None) -> None:
        super().receive_data(data, self._at(now))

    def handle_timer(self, now: float | None = None) -> None:
        super().handle_timer(self._at(now))

    def reject(self, response: AAssociateRJ, now: float | None = None) -> bytes:
        return super().reject(response, self._at(now))

    def release(self, now: float | None = None) -> bytes:
        return super().release(self._at(now))

    def release_response(self, now: float | None = None) -> bytes:
        return super().release_response(self._at(now))

    def abort(self, now: float | str | None = None, error: str = "") -> bytes:  # type: ignore[override]
        if isinstance(now, str):
            return super().abort(self.clock(), now)
        return super().abort(self._at(now), error)


@dataclass
class Driven:
    ul: Clocked
    clock: FakeClock


def make(is_requestor: bool, **kwargs: object) -> Driven:
    clock = FakeClock(1000.0)
    options: dict[str, object] = {"max_pdu_length": MAX_PDU, "artim_timeout": ARTIM}
    options.update(kwargs)
    return Driven(Clocked(clock, is_requestor=is_requestor, **options), clock)


def _established(d: Driven) -> None:
    ul = d.ul
    if ul.is_requestor:
        ul.request_association(RQ)
        ul.connection_made()
        assert feed(ul, AC.encode()) == [AssociateAccepted(AC)]
    else:
        ul.connection_made()
        assert feed(ul, RQ.encode()) == [AssociateRequested(RQ)]
        ul.accept(AC)


def drive(state: State, is_requestor: bool, route: str = "abort", **kwargs: object) -> Driven:
    """A fresh machine brought into `state` by the shortest legal sequence of primitives
    and received PDUs (the collision states through crossing A-RELEASE-RQs)."""
    d = make(is_requestor, **kwargs)
    ul = d.ul
    if state == State.STA1:
        pass
    elif state in (State.STA4, State.STA5):
        assert is_requestor
        ul.request_association(RQ)
        if state == State.STA5:
            ul.connection_made()
    elif state in (State.STA2, State.STA3):
        assert not is_requestor
        ul.connection_made()
        if state == State.STA3:
            feed(ul, RQ.encode())
    elif state == State.STA13 and route == "reject":
        if is_requestor:
            ul.request_association(RQ)
            ul.connection_made()
            d.clock.advance(ARTIM)  # no answer: association request timeout
            ul.handle_timer()
        else:
            ul.connection_made()
            feed(ul, RQ.encode())
            ul.reject(RJ)
    else:
        _established(d)
        if state == State.STA7:
            ul.release()
        elif state == State.STA8:
            feed(ul, AReleaseRQ().encode())
        elif state in (State.STA9, State.STA10, State.STA11, State.STA12):
            ul.release()
            feed(ul, AReleaseRQ().encode())  # the peer asked too: release collision
            if state == State.STA11:
                ul.release_response()
            elif state == State.STA12:
                feed(ul, AReleaseRP().encode())
        elif state == State.STA13:
            if route == "abort":
                ul.abort("going away")
            elif route == "release":
                feed(ul, AReleaseRQ().encode())
                ul.release_response()
            elif route == "provider-abort":
                feed(ul, AC.encode())  # unexpected in Sta6: AA-8
            else:  # pragma: no cover
                raise AssertionError(route)
    drain(ul)
    ul.data_to_send()
    assert ul.state == state, (state, is_requestor, route)
    return d


@pytest.mark.parametrize(
    ("state", "is_requestor"),
    [(s, r) for s, roles in STATE_ROLES.items() for r in roles],
)
def test_drive_reaches_every_state(state: State, is_requestor: bool) -> None:
    d = drive(state, is_requestor)
    assert d.ul.state == state
    assert d.ul.data_to_send() == b""


# --- firing one event ------------------------------------------------------------------------


def fire(d: Driven, event: Event) -> tuple[bytes, list[ULEvent]]:
    """Make `event` happen to the machine; return (bytes it wrote, events it emitted)."""
    ul = d.ul
    sent = b""
    if event == Event.EVT1:
        ul.request_association(RQ)
    elif event in (Event.EVT2, Event.EVT5):
        sent = ul.connection_made()
    elif event == Event.EVT7:
        sent = ul.accept(AC)
    elif event == Event.EVT8:
        sent = ul.reject(RJ)
    elif event == Event.EVT9:
        ul.check_send_data()
    elif event == Event.EVT11:
        sent = ul.release()
    elif event == Event.EVT14:
        sent = ul.release_response()
    elif event == Event.EVT15:
        sent = ul.abort("local reason")
    elif event == Event.EVT17:
        ul.connection_lost()
    elif event == Event.EVT18:
        deadline = ul.get_timer()
        assert deadline is not None, "ARTIM must be running"
        d.clock.now = deadline
        ul.handle_timer()
    else:
        data = {
            Event.EVT3: AC.encode(),
            Event.EVT4: RJ.encode(),
            Event.EVT6: RQ.encode(),
            Event.EVT10: PDATA.encode(),
            Event.EVT12: AReleaseRQ().encode(),
            Event.EVT13: AReleaseRP().encode(),
            Event.EVT16: INCOMING_ABORT.encode(),
            Event.EVT19: GARBAGE,
        }[event]
        ul.receive_data(data)
    events = drain(ul)
    return sent + ul.data_to_send(), events


def _role_for(state: State, event: Event) -> tuple[bool, ...]:
    if state == State.STA1:
        return (REQUESTOR,) if event in (Event.EVT1, Event.EVT2) else (ACCEPTOR,)
    return STATE_ROLES[state]


WALK = [
    (state, event, role, route)
    for (state, event) in sorted(TRANSITIONS)
    for role in _role_for(state, event)
    for route in (STA13_ROUTES if state == State.STA13 else ("",))
]


def _expect(
    action: Action, d: Driven, event: Event, before: State, sent: bytes, events: list[ULEvent]
) -> None:
    ul = d.ul
    now = d.clock()
    artim_running = ul.get_timer() == now + ARTIM
    if action == Action.AE_1:
        assert (ul.state, sent, events) == (State.STA4, b"", [])
    elif action == Action.AE_2:
        assert (ul.state, sent, events) == (State.STA5, RQ.encode(), [])
        assert artim_running  # waiting for A-ASSOCIATE-AC/RJ
    elif action == Action.AE_3:
        assert (ul.state, sent, events) == (State.STA6, b"", [AssociateAccepted(AC)])
        assert ul.response == AC and ul.get_timer() is None
    elif action == Action.AE_4:
        assert (ul.state, sent) == (State.STA1, b"")
        assert events == [AssociateRejected(RJ), ConnectionClosed()]
    elif action == Action.AE_5:
        assert (ul.state, sent, events) == (State.STA2, b"", [])
        assert artim_running
    elif action == Action.AE_6:
        assert (ul.state, sent, events) == (State.STA3, b"", [AssociateRequested(RQ)])
        assert ul.request == RQ and ul.get_timer() is None  # ARTIM stopped
    elif action == Action.AE_7:
        assert (ul.state, sent, events) == (State.STA6, AC.encode(), [])
    elif action == Action.AE_8:
        assert (ul.state, sent, events) == (State.STA13, RJ.encode(), [])
        assert artim_running
    elif action == Action.DT_1:
        assert (ul.state, sent, events) == (State.STA6, b"", [])
    elif action == Action.DT_2:
        assert (ul.state, sent, events) == (State.STA6, b"", [DataReceived(PDATA)])
    elif action == Action.AR_1:
        assert (ul.state, sent, events) == (State.STA7, AReleaseRQ().encode(), [])
        assert artim_running  # waiting for A-RELEASE-RP
    elif action == Action.AR_2:
        assert (ul.state, sent, events) == (State.STA8, b"", [ReleaseRequested(False)])
    elif action == Action.AR_3:
        assert (ul.state, sent) == (State.STA1, b"")
        assert events == [ReleaseConfirmed(), ConnectionClosed()]
    elif action == Action.AR_4:
        assert (ul.state, sent, events) == (State.STA13, AReleaseRP().encode(), [])
        assert artim_running
    elif action == Action.AR_5:
        assert (ul.state, sent, events) == (State.STA1, b"", [ConnectionClosed()])
    elif action == Action.AR_6:
        assert (ul.state, sent, events) == (State.STA7, b"", [DataReceived(PDATA)])
    elif action == Action.AR_7:
        assert (ul.state, sent, events) == (State.STA8, b"", [])
    elif action == Action.AR_8:
        collision = State.STA9 if ul.is_requestor else State.STA10
        assert (ul.state, sent, events) == (collision, b"", [ReleaseRequested(collision=True)])
    elif action == Action.AR_9:
        assert (ul.state, sent, events) == (State.STA11, AReleaseRP().encode(), [])
    elif action == Action.AR_10:
        assert (ul.state, sent, events) == (State.STA12, b"", [ReleaseConfirmed()])
    elif action == Action.AA_1:
        assert (ul.state, sent) == (State.STA13, AAbort(0, 0).encode())
        error = "local reason" if event == Event.EVT15 else events[0].error  # type: ignore[union-attr]
        assert events == [Aborted(0, 0, local=True, error=error)]
        assert artim_running
        if event == Event.EVT19:
            assert error  # says what was wrong with the PDU
    elif action == Action.AA_2:
        assert (ul.state, sent, events) == (State.STA1, b"", [ConnectionClosed()])
        assert ul.get_timer() is None
    elif action == Action.AA_3:
        assert (ul.state, sent) == (State.STA1, b"")
        assert events == [Aborted(2, 4, local=False), ConnectionClosed()]
    elif action == Action.AA_4:
        assert (ul.state, sent) == (State.STA1, b"")
        assert len(events) == 2 and events[1] == ConnectionClosed()
        aborted = events[0]
        assert isinstance(aborted, Aborted) and not aborted.local
        assert (aborted.source, aborted.reason) == (2, 0)  # A-P-ABORT indication
    elif action == Action.AA_5:
        assert (ul.state, sent, events) == (State.STA1, b"", [ConnectionClosed()])
        assert ul.get_timer() is None
    elif action == Action.AA_6:
        assert (ul.state, sent, events) == (State.STA13, b"", [])
    elif action == Action.AA_7:
        assert (ul.state, events) == (State.STA13, [])
        (abort,) = pdus_in(sent)
        assert isinstance(abort, AAbort) and abort.source == 2
    elif action == Action.AA_8:
        assert ul.state == State.STA13
        (abort,) = pdus_in(sent)
        assert isinstance(abort, AAbort) and abort.source == 2
        expected_reason = 2 if event != Event.EVT19 else abort.reason
        assert abort.reason == expected_reason and abort.reason in (1, 2, 4, 5, 6)
        assert len(events) == 1
        aborted = events[0]
        assert isinstance(aborted, Aborted) and aborted.local and aborted.error
        assert (aborted.source, aborted.reason) == (2, abort.reason)
        assert artim_running
    else:  # pragma: no cover
        raise AssertionError(action)
    assert ul.state in ACTION_NEXT_STATES[action]


@pytest.mark.parametrize(
    ("state", "event", "is_requestor", "route"),
    WALK,
    ids=[
        f"{s.name}-{e.name}-{'rq' if r else 'ac'}{'-' + route if route else ''}"
        for s, e, r, route in WALK
    ],
)
def test_table_cell(state: State, event: Event, is_requestor: bool, route: str) -> None:
    d = drive(state, is_requestor, route or "abort")
    action = TRANSITIONS[(state, event)]
    sent, events = fire(d, event)
    _expect(action, d, event, state, sent, events)


LOCAL_PRIMITIVES: dict[Event, Callable[[UpperLayer], object]] = {
    Event.EVT1: lambda ul: ul.request_association(build_associate_rq(calling_ae_title="OTHER")),
    Event.EVT7: lambda ul: ul.accept(AC),
    Event.EVT8: lambda ul: ul.reject(RJ),
    Event.EVT9: lambda ul: ul.check_send_data(),
    Event.EVT11: lambda ul: ul.release(),
    Event.EVT14: lambda ul: ul.release_response(),
}
REFUSED = [
    (state, event, role)
    for state, roles in STATE_ROLES.items()
    for role in roles
    for event in (*LOCAL_PRIMITIVES, Event.EVT2 if role else Event.EVT5)
    if (state, event) not in TRANSITIONS
]


@pytest.mark.parametrize(
    ("state", "event", "is_requestor"),
    REFUSED,
    ids=[f"{s.name}-{e.name}-{'rq' if r else 'ac'}" for s, e, r in REFUSED],
)
def test_local_primitive_without_a_cell_is_refused(
    state: State, event: Event, is_requestor: bool
) -> None:
    d = drive(state, is_requestor)
    request, response = d.ul.request, d.ul.response
    with pytest.raises(InvalidStateError):
        if event in (Event.EVT2, Event.EVT5):
            d.ul.connection_made()
        else:
            LOCAL_PRIMITIVES[event](d.ul)
    assert d.ul.state == state
    assert d.ul.data_to_send() == b""
    assert drain(d.ul) == []
    assert (d.ul.request, d.ul.response) == (request, response)


@pytest.mark.parametrize("state", [State.STA1, State.STA2, State.STA13])
def test_abort_where_the_table_has_no_cell_is_a_no_op(state: State) -> None:
    d = drive(state, STATE_ROLES[state][-1])
    assert d.ul.abort("nothing to abort") == b""
    assert d.ul.state == state and drain(d.ul) == []


def test_connection_lost_in_sta1_is_a_no_op() -> None:
    d = drive(State.STA1, ACCEPTOR)
    d.ul.connection_lost()
    d.ul.receive_data(b"")
    assert d.ul.state == State.STA1 and drain(d.ul) == []


@pytest.mark.parametrize("state", [State.STA1, State.STA4])
def test_bytes_without_a_connection_are_ignored(state: State) -> None:
    d = drive(state, REQUESTOR)
    assert feed(d.ul, AC.encode() + GARBAGE) == []
    assert d.ul.state == state and d.ul.data_to_send() == b""


def test_can_send_data_only_in_sta6_and_sta8() -> None:
    for state, roles in STATE_ROLES.items():
        for role in roles:
            assert drive(state, role).ul.can_send_data == (state in (State.STA6, State.STA8))


def test_receive_empty_bytes_is_transport_closed() -> None:
    d = drive(State.STA6, ACCEPTOR)
    d.ul.receive_data(b"")
    events = drain(d.ul)
    assert isinstance(events[0], Aborted) and events[-1] == ConnectionClosed()
    assert d.ul.state == State.STA1


def test_unacceptable_protocol_version_is_rejected_by_the_provider() -> None:
    # AE-6, "otherwise" branch: A-ASSOCIATE-RJ (permanent, ACSE, protocol version not
    # supported, PS3.8 Table 9-21), ARTIM started, Sta13, no indication to the user.
    d = drive(State.STA2, ACCEPTOR)
    rq = build_associate_rq(protocol_version=2)
    assert feed(d.ul, rq.encode()) == []
    assert d.ul.state == State.STA13
    assert pdus_in(d.ul.data_to_send()) == [AAssociateRJ(1, 2, 2)]
    assert d.ul.get_timer() == d.clock() + ARTIM


@pytest.mark.parametrize(
    "bad",
    [
        GARBAGE,
        bytes.fromhex("07 00 00000005 0000000000"),  # A-ABORT of length 5
        bytes.fromhex("04 00 00000000"),  # P-DATA-TF without PDVs
        bytes.fromhex("04 00 00000007 00000003 02 03 00"),  # even presentation context ID
        bytes.fromhex("00 00 00000004 00000000"),
    ],
)
def test_invalid_pdu_in_sta6_aborts_and_stops_reading(bad: bytes) -> None:
    d = drive(State.STA6, REQUESTOR)
    events = feed(d.ul, bad + PDATA.encode())
    assert len(events) == 1 and isinstance(events[0], Aborted) and events[0].local
    (abort,) = pdus_in(d.ul.data_to_send())
    assert isinstance(abort, AAbort) and abort.source == 2
    # After an invalid PDU the framing is lost: nothing more is read (the P-DATA is dropped).
    assert feed(d.ul, PDATA.encode()) == []
    assert d.ul.state == State.STA13


# --- framing through the machine -------------------------------------------------------------

PARTIAL = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PARTIAL
@given(sx.associate_rqs, st.data())
def test_associate_rq_cut_anywhere_needs_data_then_arrives(
    rq: AAssociateRQ, data: st.DataObject
) -> None:
    rq = AAssociateRQ(
        rq.called_ae_title,
        rq.calling_ae_title,
        rq.presentation_contexts,
        rq.user_information,
        rq.application_context_name,
        protocol_version=1,
    )
    raw = rq.encode()
    cut = data.draw(st.integers(0, len(raw) - 1))
    d = drive(State.STA2, ACCEPTOR)
    assert feed(d.ul, raw[:cut]) == []
    assert d.ul.state == State.STA2 and d.ul.data_to_send() == b""
    assert feed(d.ul, raw[cut:]) == [AssociateRequested(rq)]
    assert d.ul.state == State.STA3


def test_every_cut_of_every_pdu_kind() -> None:
    cases: list[tuple[State, bool, bytes, list[ULEvent]]] = [
        (State.STA2, ACCEPTOR, RQ.encode(), [AssociateRequested(RQ)]),
        (State.STA5, REQUESTOR, AC.encode(), [AssociateAccepted(AC)]),
        (State.STA5, REQUESTOR, RJ.encode(), [AssociateRejected(RJ), ConnectionClosed()]),
        (State.STA6, ACCEPTOR, PDATA.encode(), [DataReceived(PDATA)]),
        (State.STA6, ACCEPTOR, AReleaseRQ().encode(), [ReleaseRequested()]),
        (State.STA7, REQUESTOR, AReleaseRP().encode(), [ReleaseConfirmed(), ConnectionClosed()]),
        (
            State.STA6,
            REQUESTOR,
            INCOMING_ABORT.encode(),
            [Aborted(2, 4, local=False), ConnectionClosed()],
        ),
    ]
    for state, role, raw, expected in cases:
        for cut in range(len(raw)):
            d = drive(state, role)
            assert feed(d.ul, raw[:cut]) == [], (state, cut)
            assert d.ul.state == state and d.ul.data_to_send() == b""
            assert feed(d.ul, raw[cut:]) == expected, (state, cut)
        # and one byte at a time
        d = drive(state, role)
        seen: list[ULEvent] = []
        for i in range(len(raw)):
            seen += feed(d.ul, raw[i : i + 1])
            if i < len(raw) - 1:
                assert seen == []
        assert seen == expected


@PARTIAL
@given(st.lists(sx.p_data_tfs, min_size=1, max_size=6), st.data())
def test_a_stream_of_p_data_in_random_pieces(pdus: list[PDataTF], data: st.DataObject) -> None:
    stream = b"".join(p.encode() for p in pdus)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    d = drive(State.STA6, ACCEPTOR, max_pdu_length=0)
    events: list[ULEvent] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        events += feed(d.ul, stream[start:cut])
        start = cut
    assert events == [DataReceived(p) for p in pdus]
    assert d.ul.state == State.STA6 and d.ul.data_to_send() == b""


def large_pdv(context_id: int, size: int, fill: int) -> PresentationDataValue:
    return PresentationDataValue(context_id, False, False, bytes([fill]) * size)


@PARTIAL
@given(
    st.lists(
        st.tuples(
            st.sampled_from([10, 1_000, 65_530, 65_536, 70_000, 200_000]), st.integers(0, 255)
        ),
        min_size=1,
        max_size=5,
    ),
    st.data(),
)
def test_large_p_data_in_random_pieces_arrive_intact_and_stay_so(
    sizes: list[tuple[int, int]], data: st.DataObject
) -> None:
    """Large PDUs are received into buffers of their own; what was handed out never
    changes as more bytes arrive."""
    pdus = [PDataTF((large_pdv(1, size, fill),)) for size, fill in sizes]
    stream = b"".join(p.encode() for p in pdus)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    d = drive(State.STA6, ACCEPTOR, max_pdu_length=0)
    events: list[ULEvent] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        events += feed(d.ul, stream[start:cut])
        start = cut
    assert events == [DataReceived(p) for p in pdus]
    for event in events:
        assert isinstance(event, DataReceived)
        (value,) = [pdv.data for pdv in event.pdu.values]
        assert isinstance(value, bytes) or value.readonly
    # More traffic after them leaves the values handed out as they were.
    feed(d.ul, stream)
    assert events == [DataReceived(p) for p in pdus]


def test_a_large_pdu_header_alone_allocates_little() -> None:
    """A peer announcing a huge PDU gets no buffer of that size until its bytes arrive."""
    d = drive(State.STA6, ACCEPTOR, max_pdu_length=0)
    header = bytes.fromhex("04 00") + HARD_MAX_PDU_LENGTH.to_bytes(4, "big")
    tracemalloc.start()
    try:
        assert feed(d.ul, header + b"\x00" * 100) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert d.ul.state == State.STA6


@pytest.mark.parametrize("pdu_type", [1, 2, 3, 5, 6, 7])
def test_an_association_pdu_header_allocates_only_what_arrives(pdu_type: int) -> None:
    """A peer not associated yet (an A-ASSOCIATE-RQ header announcing the most we take,
    then a trickle of bytes) holds about what it sent, not what it announced."""
    state = State.STA2 if pdu_type == 1 else State.STA6
    d = drive(state, ACCEPTOR)
    header = bytes((pdu_type, 0)) + MAX_ASSOCIATION_PDU_LENGTH.to_bytes(4, "big")
    tracemalloc.start()
    try:
        assert feed(d.ul, header) == []
        for _ in range(10):
            assert feed(d.ul, b"\x00" * 100) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 10, peak
    assert d.ul.state == state


def test_an_associate_rq_trickled_byte_by_byte_is_cut_at_artim() -> None:
    """ARTIM runs from the connection to the whole A-ASSOCIATE-RQ: bytes arriving do not
    restart it (PS3.8 §9.1.4)."""
    d = drive(State.STA2, ACCEPTOR)
    start = d.clock()
    encoded = RQ.encode()
    step = 2 * ARTIM / len(encoded)  # the whole request would take twice ARTIM
    events: list[ULEvent] = []
    for byte in encoded:
        d.clock.advance(step)
        d.ul.handle_timer()
        events += drain(d.ul)
        if d.ul.state != State.STA2:
            break
        events += feed(d.ul, bytes((byte,)))
    assert events == [ConnectionClosed()]
    assert d.ul.state == State.STA1
    assert start + ARTIM <= d.clock() < start + ARTIM + 2 * step


GARBAGE_SETTINGS = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@GARBAGE_SETTINGS
@given(st.binary(min_size=1, max_size=400), st.data())
def test_garbage_in_sta2_ends_in_abort_or_close(garbage: bytes, data: st.DataObject) -> None:
    d = drive(State.STA2, ACCEPTOR)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(garbage)), max_size=5)))
    events: list[ULEvent] = []
    sent = b""
    start = 0
    for cut in [*cuts, len(garbage)]:
        events += feed(d.ul, garbage[start:cut])  # never raises, never loops
        sent += d.ul.data_to_send()
        start = cut
    kinds = {type(e) for e in events}
    assert kinds <= {Aborted, ConnectionClosed, AssociateRequested}
    for pdu in pdus_in(sent):
        assert isinstance(pdu, (AAbort, AAssociateRJ))
    if d.ul.state == State.STA2:  # only an incomplete PDU so far
        assert events == [] and sent == b""
    elif d.ul.state == State.STA13:
        assert sent.startswith(AAbort(0, 0).encode()) or isinstance(pdus_in(sent)[0], AAssociateRJ)
    # Whatever happened, the transport closing brings the machine back to Sta1.
    d.ul.connection_lost()
    drain(d.ul)
    assert d.ul.state == State.STA1


@GARBAGE_SETTINGS
@given(
    st.integers(0, 0xFF).filter(lambda t: not 1 <= t <= 7),
    st.binary(min_size=5, max_size=100),
)
def test_unrecognized_pdu_type_in_sta2_aborts_at_once(pdu_type: int, tail: bytes) -> None:
    d = drive(State.STA2, ACCEPTOR)
    events = feed(d.ul, bytes((pdu_type,)) + tail)
    assert d.ul.state == State.STA13
    assert d.ul.data_to_send() == AAbort(0, 0).encode()  # AA-1
    assert len(events) == 1 and isinstance(events[0], Aborted)


def test_oversize_p_data_is_refused_on_the_header_alone() -> None:
    d = drive(State.STA6, ACCEPTOR)
    header = bytes.fromhex("04 00") + (MAX_PDU + 1).to_bytes(4, "big")
    events = feed(d.ul, header)  # no body at all
    assert len(events) == 1 and isinstance(events[0], Aborted)
    assert str(MAX_PDU) in events[0].error
    (abort,) = pdus_in(d.ul.data_to_send())
    assert abort == AAbort(2, 6)
    assert d.ul.state == State.STA13
    # Exactly the maximum is fine: it waits for the body.
    d = drive(State.STA6, ACCEPTOR)
    assert feed(d.ul, bytes.fromhex("04 00") + MAX_PDU.to_bytes(4, "big")) == []
    assert d.ul.state == State.STA6


def test_oversize_p_data_without_a_local_maximum() -> None:
    d = drive(State.STA6, ACCEPTOR, max_pdu_length=0)
    assert feed(d.ul, bytes.fromhex("04 00") + HARD_MAX_PDU_LENGTH.to_bytes(4, "big")) == []
    d = drive(State.STA6, ACCEPTOR, max_pdu_length=0)
    events = feed(d.ul, bytes.fromhex("04 00") + (HARD_MAX_PDU_LENGTH + 1).to_bytes(4, "big"))
    assert len(events) == 1 and isinstance(events[0], Aborted)


@pytest.mark.parametrize("pdu_type", [1, 2, 3, 5, 6, 7])
def test_oversize_association_pdu_is_refused_on_the_header_alone(pdu_type: int) -> None:
    d = drive(State.STA2, ACCEPTOR)
    header = bytes((pdu_type, 0)) + (MAX_ASSOCIATION_PDU_LENGTH + 1).to_bytes(4, "big")
    events = feed(d.ul, header)
    assert len(events) == 1 and isinstance(events[0], Aborted)
    assert d.ul.data_to_send() == AAbort(0, 0).encode()  # Evt19 in Sta2: AA-1
    assert d.ul.state == State.STA13


def test_huge_length_header_in_sta5_is_refused() -> None:
    d = drive(State.STA5, REQUESTOR)
    events = feed(d.ul, bytes.fromhex("02 00 FFFFFFFF"))
    assert len(events) == 1 and isinstance(events[0], Aborted)
    assert d.ul.state == State.STA13


# --- timers on the fake clock ----------------------------------------------------------------


def test_artim_in_sta2_closes_when_no_associate_rq_arrives() -> None:
    d = drive(State.STA2, ACCEPTOR)
    start = d.clock()
    assert d.ul.get_timer() == start + ARTIM
    d.clock.now = start + ARTIM - 0.001
    d.ul.handle_timer()  # too early: nothing happens
    assert d.ul.state == State.STA2 and drain(d.ul) == []
    d.clock.now = start + ARTIM
    d.ul.handle_timer()
    assert drain(d.ul) == [ConnectionClosed()]  # AA-2: close, nothing sent
    assert d.ul.state == State.STA1 and d.ul.data_to_send() == b""
    assert d.ul.get_timer() is None


def test_associate_rq_in_time_stops_artim() -> None:
    d = drive(State.STA2, ACCEPTOR)
    d.clock.advance(ARTIM / 2)
    feed(d.ul, RQ.encode())
    assert d.ul.get_timer() is None
    d.clock.advance(10 * ARTIM)
    d.ul.handle_timer()
    assert d.ul.state == State.STA3


@pytest.mark.parametrize("route", STA13_ROUTES)
@pytest.mark.parametrize("is_requestor", [REQUESTOR, ACCEPTOR])
def test_artim_in_sta13_closes(route: str, is_requestor: bool) -> None:
    d = drive(State.STA13, is_requestor, route)
    deadline = d.ul.get_timer()
    assert deadline is not None and deadline <= d.clock() + ARTIM
    d.clock.now = deadline - 0.5
    d.ul.handle_timer()
    assert d.ul.state == State.STA13
    d.clock.now = deadline
    d.ul.handle_timer()
    assert drain(d.ul) == [ConnectionClosed()]
    assert d.ul.state == State.STA1 and d.ul.data_to_send() == b""


def test_association_request_timeout_in_sta5_aborts() -> None:
    d = drive(State.STA5, REQUESTOR)
    assert d.ul.get_timer() == d.clock() + ARTIM
    d.clock.advance(ARTIM)
    d.ul.handle_timer()
    events = drain(d.ul)
    assert len(events) == 1 and isinstance(events[0], Aborted)
    assert events[0].local and "A-ASSOCIATE-RQ" in events[0].error
    assert d.ul.data_to_send() == AAbort(0, 0).encode()
    assert d.ul.state == State.STA13
    # then ARTIM (restarted by AA-1) closes the connection
    assert d.ul.get_timer() == d.clock() + ARTIM
    d.clock.advance(ARTIM)
    d.ul.handle_timer()
    assert drain(d.ul) == [ConnectionClosed()] and d.ul.state == State.STA1


def test_release_timeout_in_sta7_aborts() -> None:
    d = drive(State.STA7, REQUESTOR)
    assert d.ul.get_timer() == d.clock() + ARTIM
    d.clock.advance(ARTIM / 2)
    feed(d.ul, PDATA.encode())  # data still arriving does not answer the release
    d.clock.advance(ARTIM / 2)
    d.ul.handle_timer()
    events = drain(d.ul)
    assert len(events) == 1 and isinstance(events[0], Aborted)
    assert "A-RELEASE-RQ" in events[0].error
    assert d.ul.data_to_send() == AAbort(0, 0).encode()
    assert d.ul.state == State.STA13


def test_release_timeout_is_kept_through_a_requestor_side_collision() -> None:
    # Sta9 and Sta11 still await the peer's A-RELEASE-RP.
    for state in (State.STA9, State.STA11):
        d = drive(state, REQUESTOR)
        deadline = d.ul.get_timer()
        assert deadline == d.clock() + ARTIM
        d.clock.now = deadline
        d.ul.handle_timer()
        assert d.ul.state == State.STA13
        assert d.ul.data_to_send() == AAbort(0, 0).encode()


def test_release_timeout_ends_when_the_release_rp_arrives_in_a_collision() -> None:
    # Sta12: the A-RELEASE-RP answering our A-RELEASE-RQ arrived (AR-10); only our own
    # A-RELEASE response is missing, which is not the peer's fault.
    d = drive(State.STA12, ACCEPTOR)
    assert d.ul.get_timer() is None
    d.clock.advance(10 * ARTIM)
    d.ul.handle_timer()
    assert d.ul.state == State.STA12
    assert d.ul.release_response() == AReleaseRP().encode()
    assert d.ul.state == State.STA13


def test_idle_timeout_in_sta6() -> None:
    d = drive(State.STA6, ACCEPTOR, idle_timeout=10.0)
    last = d.clock()
    assert d.ul.get_timer() == last + 10.0
    d.clock.advance(9.0)
    d.ul.handle_timer()
    assert d.ul.state == State.STA6
    feed(d.ul, PDATA.encode())  # anything received restarts the idle timer
    deadline = d.clock() + 10.0
    assert d.ul.get_timer() == deadline
    d.clock.now = deadline - 0.001
    d.ul.handle_timer()
    assert d.ul.state == State.STA6
    d.clock.now = deadline
    d.ul.handle_timer()
    events = drain(d.ul)
    assert len(events) == 1 and isinstance(events[0], Aborted)
    assert events[0].local and "nothing received" in events[0].error
    assert d.ul.data_to_send() == AAbort(0, 0).encode()
    assert d.ul.state == State.STA13


def test_no_idle_timer_unless_asked() -> None:
    d = drive(State.STA6, REQUESTOR)
    assert d.ul.get_timer() is None
    d.clock.advance(1e9)
    d.ul.handle_timer()
    assert d.ul.state == State.STA6


# --- whole exchanges between a pair ----------------------------------------------------------


def test_association_data_release() -> None:
    pair = UpperLayerPair()
    exchange = pair.associate(RQ, AC)
    assert exchange.acceptor == [AssociateRequested(RQ)]
    assert exchange.requestor == [AssociateAccepted(AC)]
    assert pdus_in(exchange.to_acceptor) == [RQ]
    assert pdus_in(exchange.to_requestor) == [AC]
    assert pair.requestor.state == pair.acceptor.state == State.STA6

    # A C-ECHO-RQ, fragmented to the acceptor's maximum, reassembled on the other side.
    pair.requestor.check_send_data()
    message = encode_message(1, CEchoRQ(message_id=7), None, MAX_PDU)
    exchange = pair.from_requestor(message)
    assembler = MessageAssembler()
    results = [
        assembler.feed(pdv)
        for event in exchange.acceptor
        if isinstance(event, DataReceived)
        for pdv in event.pdu.values
    ]
    assert results == [CommandReceived(1, CEchoRQ(message_id=7), False)]

    # A data set bigger than the peer's maximum PDU goes in many PDUs, each accepted.
    pair.acceptor.check_send_data()
    dataset = bytes(range(256)) * 300
    exchange = pair.from_acceptor(encode_message(1, CEchoRQ(9), dataset, MAX_PDU))
    received = [e for e in exchange.requestor if isinstance(e, DataReceived)]
    assert len(received) > len(dataset) // MAX_PDU
    assert b"".join(bytes(v.data) for e in received[1:] for v in e.pdu.values) == dataset

    exchange = pair.from_requestor(pair.requestor.release(pair.clock()))
    assert exchange.acceptor == [ReleaseRequested()]
    assert pair.requestor.state == State.STA7 and pair.acceptor.state == State.STA8
    # the acceptor may still send data before answering (Sta8, AR-7; Sta7, AR-6)
    pair.acceptor.check_send_data()
    exchange = pair.from_acceptor(PDATA.encode())
    assert exchange.requestor == [DataReceived(PDATA)]
    exchange = pair.from_acceptor(pair.acceptor.release_response(pair.clock()))
    assert exchange.requestor == [ReleaseConfirmed(), ConnectionClosed()]
    assert exchange.acceptor == [ConnectionClosed()]  # Evt17 in Sta13: AR-5
    assert pair.requestor.state == pair.acceptor.state == State.STA1
    assert pair.requestor.get_timer() is None and pair.acceptor.get_timer() is None


def test_release_collision_between_a_pair() -> None:
    pair = UpperLayerPair()
    pair.associate()
    pair.send_to_acceptor(pair.requestor.release(pair.clock()))
    pair.send_to_requestor(pair.acceptor.release(pair.clock()))
    exchange = pair.pump()
    assert exchange.requestor == [ReleaseRequested(collision=True)]
    assert exchange.acceptor == [ReleaseRequested(collision=True)]
    assert pair.requestor.state == State.STA9
    assert pair.acceptor.state == State.STA10
    # PS3.8 §9.2.5: the requestor answers first, then the acceptor.
    with pytest.raises(InvalidStateError):
        pair.acceptor.release_response(pair.clock())
    exchange = pair.from_requestor(pair.requestor.release_response(pair.clock()))
    assert exchange.acceptor == [ReleaseConfirmed()]
    assert pair.requestor.state == State.STA11 and pair.acceptor.state == State.STA12
    exchange = pair.from_acceptor(pair.acceptor.release_response(pair.clock()))
    assert exchange.requestor == [ReleaseConfirmed(), ConnectionClosed()]
    assert exchange.acceptor == [ConnectionClosed()]
    assert pair.requestor.state == pair.acceptor.state == State.STA1


@pytest.mark.parametrize("aborter", ["requestor", "acceptor"])
def test_abort_between_a_pair(aborter: str) -> None:
    pair = UpperLayerPair()
    pair.associate()
    if aborter == "requestor":
        exchange = pair.from_requestor(pair.requestor.abort(pair.clock(), "bye"))
        mine, theirs = exchange.requestor, exchange.acceptor
    else:
        exchange = pair.from_acceptor(pair.acceptor.abort(pair.clock(), "bye"))
        mine, theirs = exchange.acceptor, exchange.requestor
    assert mine == [Aborted(0, 0, local=True, error="bye"), ConnectionClosed()]
    assert theirs == [Aborted(0, 0, local=False), ConnectionClosed()]
    assert pair.requestor.state == pair.acceptor.state == State.STA1


def test_rejection_between_a_pair() -> None:
    pair = UpperLayerPair()
    exchange = pair.connect(RQ)
    assert exchange.acceptor == [AssociateRequested(RQ)]
    exchange = pair.from_acceptor(pair.acceptor.reject(build_associate_rj(2, 3, 1), pair.clock()))
    assert exchange.requestor == [AssociateRejected(AAssociateRJ(2, 3, 1)), ConnectionClosed()]
    assert exchange.acceptor == [ConnectionClosed()]  # Evt17 in Sta13
    assert pair.requestor.state == pair.acceptor.state == State.STA1
    assert pair.requestor.response == AAssociateRJ(2, 3, 1)


def test_provider_rejection_between_a_pair() -> None:
    pair = UpperLayerPair()
    exchange = pair.connect(build_associate_rq(protocol_version=0x0002))
    assert exchange.acceptor == [ConnectionClosed()]
    assert exchange.requestor == [AssociateRejected(AAssociateRJ(1, 2, 2)), ConnectionClosed()]


def test_oversize_p_data_between_a_pair_is_aborted() -> None:
    pair = UpperLayerPair(acceptor_max_pdu_length=1024)
    pair.associate()
    pair.requestor.check_send_data()
    exchange = pair.from_requestor(build_p_data(bytes(1019)).encode())  # PDU length 1025
    assert len(exchange.acceptor) == 2
    aborted = exchange.acceptor[0]
    assert isinstance(aborted, Aborted) and aborted.local and aborted.source == 2
    assert exchange.requestor == [Aborted(2, 6, local=False), ConnectionClosed()]
    assert pair.requestor.state == pair.acceptor.state == State.STA1


def test_artim_on_a_pair_when_the_requestor_never_speaks() -> None:
    pair = UpperLayerPair(artim_timeout=5.0)
    pair.acceptor.connection_made(pair.clock())
    assert pair.advance(4.9).acceptor == []
    assert pair.advance(0.1).acceptor == [ConnectionClosed()]
    assert pair.acceptor.state == State.STA1


def test_unanswered_associate_rq_on_a_pair() -> None:
    pair = UpperLayerPair(artim_timeout=5.0)
    pair.connect()
    assert pair.acceptor.state == State.STA3 and pair.requestor.state == State.STA5
    exchange = pair.advance(5.0)
    # The requestor gives up (A-ABORT), the acceptor learns of it and closes (AA-3);
    # the requestor then sees the transport close in Sta13 (AR-5).
    assert exchange.acceptor == [Aborted(0, 0, local=False), ConnectionClosed()]
    assert len(exchange.requestor) == 2
    assert isinstance(exchange.requestor[0], Aborted) and exchange.requestor[0].local
    assert pdus_in(exchange.to_acceptor) == [AAbort(0, 0)]
    assert pair.requestor.state == pair.acceptor.state == State.STA1


def test_unanswered_release_on_a_pair_without_close_propagation() -> None:
    pair = UpperLayerPair(artim_timeout=5.0, propagate_close=False)
    pair.associate()
    exchange = pair.from_requestor(pair.requestor.release(pair.clock()))
    assert exchange.acceptor == [ReleaseRequested()]
    exchange = pair.advance(5.0)  # the acceptor never answers
    assert isinstance(exchange.requestor[0], Aborted)
    assert exchange.acceptor == [Aborted(0, 0, local=False), ConnectionClosed()]
    assert pair.requestor.state == State.STA13  # nobody closed its transport
    assert pair.advance(5.0).requestor == [ConnectionClosed()]  # ARTIM


def test_builders_and_fake_clock() -> None:
    # The builders' defaults: Verification, implementation UID, max length.
    rq = build_associate_rq()
    assert [c.abstract_syntax for c in rq.presentation_contexts] == ["1.2.840.10008.1.1"]
    assert rq.user_information.implementation_class_uid
    assert rq.user_information.max_length == MAX_PDU
    ac = build_associate_ac(rq, results={1: 3})
    assert [(c.context_id, c.result) for c in ac.presentation_contexts] == [(1, 3)]
    assert (ac.called_ae_title, ac.calling_ae_title) == (rq.called_ae_title, rq.calling_ae_title)
    assert build_abort(2, 1) == AAbort(2, 1)
    clock = FakeClock()
    assert clock.advance(2.5) == 2.5 == clock()
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_whole_p_data_in_received_bytes_are_not_copied() -> None:
    """P-DATA-TF PDUs that arrive whole in bytes (immutable) hand out values that point
    into those bytes; from a buffer the sender may reuse, they are copied."""
    first = build_p_data(b"command", 1, is_command=True)
    second = build_p_data(b"data set" * 100, 1, is_command=False)
    received = first.encode() + second.encode() + first.encode()[:5]  # and a piece of a third
    d = drive(State.STA6, ACCEPTOR)
    events = feed(d.ul, received)
    assert events == [DataReceived(first), DataReceived(second)]
    for event in events:
        assert isinstance(event, DataReceived)
        (value,) = [pdv.data for pdv in event.pdu.values]
        assert isinstance(value, memoryview) and value.obj is received
    assert feed(d.ul, first.encode()[5:]) == [DataReceived(first)]  # the rest of the third
    reused = bytearray(second.encode())
    (event,) = feed(d.ul, reused)
    reused[:] = bytes(len(reused))
    assert event == DataReceived(second)


def test_a_whole_p_data_over_the_maximum_length_still_aborts() -> None:
    d = drive(State.STA6, ACCEPTOR, max_pdu_length=100)
    too_long = build_p_data(b"x" * 200, 1, is_command=False)
    (event,) = feed(d.ul, too_long.encode())
    assert isinstance(event, Aborted) and "exceeds the maximum" in (event.error or "")
    assert d.ul.state == State.STA13


def test_time_is_only_what_the_calls_say() -> None:
    ul = UpperLayer(is_requestor=False, artim_timeout=30.0)  # no clock of its own
    ul.connection_made(500.0)  # Evt5, AE-5: ARTIM starts at the given time
    assert ul.get_timer() == 530.0
    ul.handle_timer(529.9)
    assert ul.state == State.STA2
    ul.handle_timer(530.0)  # Evt18 in Sta2: AA-2, closed
    assert ul.state == State.STA1


@PARTIAL
@given(st.integers(1, 40), st.integers(2_000, 70_000))
def test_after_a_pdu_that_straddles_two_chunks_the_rest_are_not_copied(
    count: int, chunk: int
) -> None:
    """16 KiB P-DATA-TFs (DCMTK's default) read in chunks that cut them anywhere: only the
    PDU cut by a chunk's end is copied; the others point into the chunk they came in."""
    pdus = [build_p_data(bytes([n % 251]) * 16_372, 1, is_command=False) for n in range(count)]
    stream = b"".join(p.encode() for p in pdus)
    d = drive(State.STA6, ACCEPTOR)
    events: list[ULEvent] = []
    chunks = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    pointing = 0
    for piece in chunks:
        for event in feed(d.ul, piece):
            assert isinstance(event, DataReceived)
            (value,) = [pdv.data for pdv in event.pdu.values]
            pointing += isinstance(value, memoryview) and value.obj is piece
            events.append(event)
    assert events == [DataReceived(p) for p in pdus]
    cut = sum(1 for n in range(1, len(chunks)) if (n * chunk) % len(pdus[0].encode()))
    assert pointing >= count - cut  # at most the PDUs cut by a chunk boundary were copied
