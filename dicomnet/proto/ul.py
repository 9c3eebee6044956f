"""The Upper Layer protocol machine (PS3.8 §9.2), sans-IO.

One `UpperLayer` per TCP connection. The async shell feeds it bytes with
`receive_data()`, takes events from `next_event()` until `NEED_DATA`, writes out
whatever `data_to_send()` returns, and calls `handle_timer()` when the deadline
from `get_timer()` passes. Local requests (`accept()`, `release()`, `abort()`, ...)
return the bytes to write. Every decision follows `dicomnet.proto.fsm.TRANSITIONS`.

Time is an argument: every call that may start a timer or counts as activity takes
`now` (seconds on the shell's monotonic clock), so ARTIM, the association/release
request timeout and the idle timeout are plain logic, tested without sleeping.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final, cast

from dicomnet.errors import InvalidStateError, ProtocolError
from dicomnet.proto.fsm import TRANSITIONS, Action, Event, State
from dicomnet.proto.pdu import (
    PDU,
    PDU_HEADER_LENGTH,
    AAbort,
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    AbortReason,
    AbortSource,
    AReleaseRP,
    AReleaseRQ,
    PDataTF,
    PDUType,
    decode_pdu,
    parse_pdu_header,
)

__all__ = [
    "NEED_DATA",
    "Aborted",
    "AssociateAccepted",
    "AssociateRejected",
    "AssociateRequested",
    "ConnectionClosed",
    "DataReceived",
    "ReleaseConfirmed",
    "ReleaseRequested",
    "ULEvent",
    "UpperLayer",
]

# Association-phase PDUs are small (128 presentation contexts of 20 transfer syntaxes each
# take about 180 KiB, a User Identity up to 128 KiB); longer is refused on the header.
MAX_ASSOCIATION_PDU_LENGTH: Final = 512 << 10
# Consumed bytes at the front of the receive buffer are dropped past this many.
_COMPACT_AFTER: Final = 1 << 20
# With no maximum advertised (0 = unlimited) we still refuse P-DATA-TF PDUs above this.
HARD_MAX_PDU_LENGTH: Final = 64 << 20
# A P-DATA-TF body at least this long that has not fully arrived, on an established
# association, is received straight into a buffer of its own (each byte copied once); up
# to the upper bound, so that a header alone never makes us allocate more than this. Any
# other PDU grows the receive buffer only as its bytes arrive: a peer not associated yet
# holds no more memory than it has sent.
_OWN_BUFFER_MIN: Final = 64 << 10
_OWN_BUFFER_MAX: Final = 16 << 20


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


@dataclass(frozen=True, slots=True)
class AssociateRequested:
    """A-ASSOCIATE indication: the peer asks for an association (acceptor, now in Sta3)."""

    request: AAssociateRQ


@dataclass(frozen=True, slots=True)
class AssociateAccepted:
    """A-ASSOCIATE confirmation (accept): the association is established (requestor)."""

    response: AAssociateAC


@dataclass(frozen=True, slots=True)
class AssociateRejected:
    """A-ASSOCIATE confirmation (reject) (requestor)."""

    response: AAssociateRJ


@dataclass(frozen=True, slots=True)
class DataReceived:
    """P-DATA indication."""

    pdu: PDataTF


@dataclass(frozen=True, slots=True)
class ReleaseRequested:
    """A-RELEASE indication: answer with `release_response()` once done sending.

    `collision` is true when both sides asked to release at once (PS3.8 §9.2.5).
    """

    collision: bool = False


@dataclass(frozen=True, slots=True)
class ReleaseConfirmed:
    """A-RELEASE confirmation: the peer answered our A-RELEASE-RQ."""


@dataclass(frozen=True, slots=True)
class Aborted:
    """A-ABORT or A-P-ABORT indication, or a local abort forced by a timer or bad PDU.

    `source`/`reason` are those of the A-ABORT PDU (received or sent). `local` is true
    when this side aborted (`error` then says why: a `ProtocolError` or a timeout text).
    """

    source: int
    reason: int
    local: bool
    error: str = ""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The transport connection is (to be) closed; the machine is back in Sta1."""


ULEvent = (
    AssociateRequested
    | AssociateAccepted
    | AssociateRejected
    | DataReceived
    | ReleaseRequested
    | ReleaseConfirmed
    | Aborted
    | ConnectionClosed
)

_PDU_EVENTS: dict[int, Event] = {
    PDUType.A_ASSOCIATE_AC: Event.EVT3,
    PDUType.A_ASSOCIATE_RJ: Event.EVT4,
    PDUType.A_ASSOCIATE_RQ: Event.EVT6,
    PDUType.P_DATA_TF: Event.EVT10,
    PDUType.A_RELEASE_RQ: Event.EVT12,
    PDUType.A_RELEASE_RP: Event.EVT13,
    PDUType.A_ABORT: Event.EVT16,
}


class UpperLayer:
    """The PS3.8 protocol machine for one transport connection.

    `is_requestor`: this side opened the connection. `max_pdu_length`: the largest
    P-DATA-TF PDU we accept (what we advertise; 0 for no limit). `artim_timeout`:
    seconds for ARTIM and for the peer's answer to our A-ASSOCIATE-RQ or A-RELEASE-RQ.
    `idle_timeout`: seconds without any received byte after which the association is
    aborted (None: never).
    """

    def __init__(
        self,
        *,
        is_requestor: bool,
        max_pdu_length: int = 0,
        artim_timeout: float = 30.0,
        idle_timeout: float | None = None,
    ) -> None:
        self.is_requestor = is_requestor
        self.state = State.STA1
        self.max_pdu_length = max_pdu_length
        self.artim_timeout = artim_timeout
        self.idle_timeout = idle_timeout
        self._now = 0.0  # the time given by the call being handled
        self._buffer = bytearray()
        self._start = 0  # offset of the first unparsed byte in _buffer
        # A large PDU being received into its own buffer: its type, body and bytes so far.
        self._body_type = 0
        self._body: bytearray | None = None
        self._body_filled = 0
        # PDUs received in full, not parsed yet: large ones in their own buffer, P-DATA-TF
        # PDUs whole in the (immutable) bytes received. They come before the buffer's bytes.
        self._complete: deque[tuple[int, memoryview]] = deque()
        self._events: deque[ULEvent] = deque()
        self._outbound = bytearray()
        self._artim_deadline: float | None = None
        self._request_deadline: float | None = None
        self._last_received = 0.0
        self._pending_rq: AAssociateRQ | None = None
        self._pending_pdu: PDU | None = None
        self._pending_error = ""
        self._discard = False
        self._invalid_reason: int = AbortReason.INVALID_PDU_PARAMETER_VALUE
        self.abort_sent: AAbort | None = None
        self.request: AAssociateRQ | None = None
        self.response: AAssociateAC | AAssociateRJ | None = None

    # --- the table --------------------------------------------------------------------------

    def _fire(self, event: Event) -> None:
        action = TRANSITIONS.get((self.state, event))
        if action is None:
            raise InvalidStateError(
                f"{event.name} is not allowed in {self.state.name} (PS3.8 Table 9-10)"
            )
        getattr(self, _METHODS[action])()

    def _emit(self, event: ULEvent) -> None:
        self._events.append(event)

    def _send_pdu(self, pdu: PDU) -> None:
        self._outbound += pdu.encode()

    def _start_artim(self) -> None:
        self._artim_deadline = self._now + self.artim_timeout

    def _stop_artim(self) -> None:
        self._artim_deadline = None

    def _closed(self) -> None:
        self.state = State.STA1
        self._artim_deadline = None
        self._request_deadline = None
        self._emit(ConnectionClosed())

    # AE: association establishment
    def _ae_1(self) -> None:
        self.state = State.STA4

    def _ae_2(self) -> None:
        assert self._pending_rq is not None
        self._send_pdu(self._pending_rq)
        self._request_deadline = self._now + self.artim_timeout
        self.state = State.STA5

    def _ae_3(self) -> None:
        assert isinstance(self._pending_pdu, AAssociateAC)
        self.response = self._pending_pdu
        self._request_deadline = None
        self.state = State.STA6
        self._emit(AssociateAccepted(self._pending_pdu))

    def _ae_4(self) -> None:
        assert isinstance(self._pending_pdu, AAssociateRJ)
        self.response = self._pending_pdu
        self._emit(AssociateRejected(self._pending_pdu))
        self._closed()

    def _ae_5(self) -> None:
        self._start_artim()
        self.state = State.STA2

    def _ae_6(self) -> None:
        # Acceptability by the service-provider: protocol version 1 (bit 0) must be supported.
        assert isinstance(self._pending_pdu, AAssociateRQ)
        self._stop_artim()
        self.request = self._pending_pdu
        if not self._pending_pdu.protocol_version & 1:
            self.response = AAssociateRJ(1, 2, 2)  # permanent, ACSE, protocol version
            self._send_pdu(self.response)
            self._start_artim()
            self.state = State.STA13
            return
        self.state = State.STA3
        self._emit(AssociateRequested(self._pending_pdu))

    def _ae_7(self) -> None:
        assert isinstance(self._pending_pdu, AAssociateAC)
        self.response = self._pending_pdu
        self._send_pdu(self._pending_pdu)
        self.state = State.STA6

    def _ae_8(self) -> None:
        assert isinstance(self._pending_pdu, AAssociateRJ)
        self.response = self._pending_pdu
        self._send_pdu(self._pending_pdu)
        self._start_artim()
        self.state = State.STA13

    # DT: data transfer
    def _dt_1(self) -> None:
        self.state = State.STA6

    def _dt_2(self) -> None:
        assert isinstance(self._pending_pdu, PDataTF)
        self._emit(DataReceived(self._pending_pdu))
        self.state = State.STA6

    # AR: association release
    def _ar_1(self) -> None:
        self._send_pdu(AReleaseRQ())
        self._request_deadline = self._now + self.artim_timeout
        self.state = State.STA7

    def _ar_2(self) -> None:
        self.state = State.STA8
        self._emit(ReleaseRequested())

    def _ar_3(self) -> None:
        self._emit(ReleaseConfirmed())
        self._closed()

    def _ar_4(self) -> None:
        self._send_pdu(AReleaseRP())
        self._start_artim()
        self.state = State.STA13

    def _ar_5(self) -> None:
        self._stop_artim()
        self._closed()

    def _ar_6(self) -> None:
        assert isinstance(self._pending_pdu, PDataTF)
        self._emit(DataReceived(self._pending_pdu))
        self.state = State.STA7

    def _ar_7(self) -> None:
        self.state = State.STA8

    def _ar_8(self) -> None:
        self.state = State.STA9 if self.is_requestor else State.STA10
        self._emit(ReleaseRequested(collision=True))

    def _ar_9(self) -> None:
        self._send_pdu(AReleaseRP())
        self.state = State.STA11

    def _ar_10(self) -> None:
        self._request_deadline = None  # our A-RELEASE-RQ is answered
        self._emit(ReleaseConfirmed())
        self.state = State.STA12

    # AA: abort
    def _aa_1(self) -> None:
        self.abort_sent = AAbort(AbortSource.SERVICE_USER, 0)
        self._send_pdu(self.abort_sent)
        self._request_deadline = None
        self._start_artim()
        was_aborted = self.state == State.STA13
        self.state = State.STA13
        if not was_aborted:
            self._emit(Aborted(AbortSource.SERVICE_USER, 0, local=True, error=self._pending_error))

    def _aa_2(self) -> None:
        self._stop_artim()
        self._closed()

    def _aa_3(self) -> None:
        assert isinstance(self._pending_pdu, AAbort)
        self._emit(Aborted(self._pending_pdu.source, self._pending_pdu.reason, local=False))
        self._closed()

    def _aa_4(self) -> None:
        self._emit(
            Aborted(
                AbortSource.SERVICE_PROVIDER,
                AbortReason.NOT_SPECIFIED,
                local=False,
                error=self._pending_error or "transport connection closed",
            )
        )
        self._closed()

    def _aa_5(self) -> None:
        self._stop_artim()
        self._closed()

    def _aa_6(self) -> None:
        self.state = State.STA13

    def _aa_7(self) -> None:
        self._send_pdu(AAbort(AbortSource.SERVICE_PROVIDER, AbortReason.UNEXPECTED_PDU))
        self.state = State.STA13

    def _aa_8(self) -> None:
        reason = self._invalid_reason if self._pending_error else AbortReason.UNEXPECTED_PDU
        self.abort_sent = AAbort(AbortSource.SERVICE_PROVIDER, reason)
        self._send_pdu(self.abort_sent)
        self._request_deadline = None
        self._start_artim()
        self.state = State.STA13
        error = self._pending_error or f"unexpected {type(self._pending_pdu).__name__} PDU"
        self._emit(Aborted(AbortSource.SERVICE_PROVIDER, reason, local=True, error=error))

    # --- local requests (primitives) --------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes the machine produced (replies, aborts) that the shell must write."""
        if not self._outbound:
            return b""
        data = bytes(self._outbound)
        self._outbound.clear()
        return data

    def request_association(self, request: AAssociateRQ) -> None:
        """A-ASSOCIATE request primitive (Evt1): the shell now opens the connection."""
        self._fire(Event.EVT1)  # first: a refused request must leave the machine as it was
        self._pending_rq = request
        self.request = request

    def connection_made(self, now: float) -> bytes:
        """Transport connect confirm (requestor, Evt2) or indication (acceptor, Evt5)."""
        self._now = self._last_received = now
        self._fire(Event.EVT2 if self.is_requestor else Event.EVT5)
        return self.data_to_send()

    def accept(self, response: AAssociateAC) -> bytes:
        """A-ASSOCIATE response primitive, accept (Evt7)."""
        self._pending_pdu = response
        self._fire(Event.EVT7)
        return self.data_to_send()

    def reject(self, response: AAssociateRJ, now: float) -> bytes:
        """A-ASSOCIATE response primitive, reject (Evt8)."""
        self._now = now
        self._pending_pdu = response
        self._fire(Event.EVT8)
        return self.data_to_send()

    def check_send_data(self) -> None:
        """P-DATA request primitive (Evt9): raise unless data may be sent now."""
        self._fire(Event.EVT9)

    @property
    def can_send_data(self) -> bool:
        return (self.state, Event.EVT9) in TRANSITIONS

    def release(self, now: float) -> bytes:
        """A-RELEASE request primitive (Evt11)."""
        self._now = now
        self._fire(Event.EVT11)
        return self.data_to_send()

    def release_response(self, now: float) -> bytes:
        """A-RELEASE response primitive (Evt14)."""
        self._now = now
        self._fire(Event.EVT14)
        return self.data_to_send()

    def abort(self, now: float, error: str = "") -> bytes:
        """A-ABORT request primitive (Evt15). A no-op where there is nothing to abort."""
        self.request_abort(now, error)
        return self.data_to_send()

    def request_abort(self, now: float, error: str = "") -> None:
        """A-ABORT request primitive (Evt15), its PDU left for `data_to_send()`."""
        self._now = now
        if (self.state, Event.EVT15) in TRANSITIONS:
            self._pending_error = error
            self._fire(Event.EVT15)

    def connection_lost(self) -> None:
        """Transport connection closed indication (Evt17)."""
        if self.state == State.STA1:
            return
        self._pending_error = ""
        self._fire(Event.EVT17)

    # --- received bytes ---------------------------------------------------------------------

    def note_activity(self, now: float) -> None:
        """Data was sent: the idle timeout counts from `now` as well as from receipt."""
        self._last_received = now

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Feed bytes read from the transport at `now`; `b""` means the peer closed it.

        PDUs are parsed (and their events made) by `next_event()`, which works at this
        `now` too."""
        self._now = self._last_received = now
        if not data:
            self.connection_lost()
            return
        if self._discard or self.state in (State.STA1, State.STA4):
            return
        view = memoryview(data)
        while view:
            body = self._body
            if body is not None:
                # The rest of a large PDU: straight into its own buffer.
                filled = self._body_filled
                n = min(len(body) - filled, len(view))
                body[filled : filled + n] = view[:n]
                view = view[n:]
                self._body_filled = filled + n
                if self._body_filled == len(body):
                    # Nobody writes to it any more: the PDU's values can point into it.
                    self._complete.append((self._body_type, memoryview(body).toreadonly()))
                    self._body = None
                continue
            if self._start != len(self._buffer):
                taken = self._complete_begun(view)
                if taken < 0:
                    self._append(view)
                    break
                view = view[taken:]
                continue
            if len(view) >= PDU_HEADER_LENGTH and view[0] == _P_DATA_TF:
                length = int.from_bytes(view[2:PDU_HEADER_LENGTH], "big")
                end = PDU_HEADER_LENGTH + length
                if length <= self._pdu_limit(_P_DATA_TF):
                    if end <= len(view) and view.readonly:
                        # A whole P-DATA-TF in bytes nobody changes: its values can point
                        # into them, with no copy through the buffer.
                        self._complete.append((_P_DATA_TF, view[PDU_HEADER_LENGTH:end]))
                        view = view[end:]
                        continue
                    if (
                        _OWN_BUFFER_MIN <= length <= _OWN_BUFFER_MAX
                        and end > len(view)
                        and self.state is State.STA6
                    ):
                        self._start_own_buffer(_P_DATA_TF, length, b"")
                        view = view[PDU_HEADER_LENGTH:]
                        continue
            self._append(view)
            break

    def _complete_begun(self, view: memoryview) -> int:
        """A P-DATA-TF begun in an earlier chunk, the only thing in the buffer: complete it
        from `view`, so that the PDUs after it in this chunk are not copied through the
        buffer too. The bytes taken from `view`, or -1 when this does not apply."""
        buffer, start = self._buffer, self._start
        begun = len(buffer) - start
        if begun < PDU_HEADER_LENGTH:
            need = PDU_HEADER_LENGTH - begun
            if len(view) < need:
                return -1
            buffer += view[:need]  # the header first, to know the length
            return need
        pdu_type, length = parse_pdu_header(buffer, start)
        missing = PDU_HEADER_LENGTH + length - begun
        if pdu_type != _P_DATA_TF or length > self._pdu_limit(_P_DATA_TF):
            return -1  # for `_parse_one` to refuse
        if missing <= 0 or missing > len(view) or length >= _OWN_BUFFER_MIN:
            return -1  # more than one PDU buffered, the PDU goes on, or a large one
        buffer += view[:missing]
        body = memoryview(bytes(buffer[start + PDU_HEADER_LENGTH :]))  # the one copy
        self._complete.append((_P_DATA_TF, body))
        buffer.clear()
        self._start = 0
        return missing

    def _start_own_buffer(self, pdu_type: int, length: int, received: memoryview | bytes) -> None:
        """Receive a large PDU's body into a buffer of its own, each byte copied once."""
        own = bytearray(length)
        own[: len(received)] = received
        self._body = own
        self._body_filled = len(received)
        self._body_type = pdu_type

    def _append(self, data: bytes | bytearray | memoryview) -> None:
        if self._start and self._start == len(self._buffer):
            self._buffer.clear()
            self._start = 0
        self._buffer += data

    def _pdu_limit(self, pdu_type: int) -> int:
        if pdu_type == PDUType.P_DATA_TF:
            return self.max_pdu_length or HARD_MAX_PDU_LENGTH
        return MAX_ASSOCIATION_PDU_LENGTH

    def next_event(self) -> ULEvent | _NeedData:
        """The next event, or `NEED_DATA` when more bytes must be received first."""
        while not self._events:
            if not self._parse_one():
                return NEED_DATA
        return self._events.popleft()

    def _parse_one(self) -> bool:
        """Process one PDU from the buffer; False when it holds no complete PDU."""
        buffer = self._buffer
        start = self._start
        if self.state in (State.STA1, State.STA4):
            buffer.clear()
            self._start = 0
            self._body = None
            self._complete.clear()
            return False
        if self._complete:
            self._decode_and_fire(*self._complete.popleft())
            return True
        if self._body is not None:
            return False  # the buffer is empty while a large PDU is arriving
        if len(buffer) - start < PDU_HEADER_LENGTH:
            return False
        pdu_type, length = parse_pdu_header(buffer, start)
        if pdu_type not in _PDU_EVENTS:
            self._invalid(f"unrecognized PDU type 0x{pdu_type:02X}", AbortReason.UNRECOGNIZED_PDU)
            return True
        limit = self._pdu_limit(pdu_type)
        if length > limit:
            self._invalid(f"PDU length {length} exceeds the maximum of {limit}")
            return True
        end = start + PDU_HEADER_LENGTH + length
        if len(buffer) < end:
            if (
                _OWN_BUFFER_MIN <= length <= _OWN_BUFFER_MAX
                and pdu_type == _P_DATA_TF
                and self.state is State.STA6
            ):
                # Receive the rest of this PDU straight into a buffer of its own.
                with memoryview(buffer) as view:
                    received = view[start + PDU_HEADER_LENGTH :]
                    self._start_own_buffer(pdu_type, length, received)
                    received.release()
                buffer.clear()
                self._start = 0
            return False
        with memoryview(buffer) as view:
            body = bytes(view[start + PDU_HEADER_LENGTH : end])  # the one copy of the PDU
        if end == len(buffer):
            buffer.clear()
            self._start = 0
        elif end > _COMPACT_AFTER:
            del buffer[:end]
            self._start = 0
        else:
            self._start = end
        self._decode_and_fire(pdu_type, body)
        return True

    def _decode_and_fire(self, pdu_type: int, body: bytes | memoryview) -> None:
        if pdu_type == _P_DATA_TF and self.state is State.STA6:
            # The steady state's one transition, Evt10 in Sta6 (DT-2: P-DATA indication,
            # stay in Sta6), without the table lookup: it runs for every PDU received.
            try:
                pdata = decode_pdu(_P_DATA_TF, body)
            except ProtocolError as exc:
                self._invalid(str(exc))
                return
            self._events.append(DataReceived(cast(PDataTF, pdata)))
            return
        event = _PDU_EVENTS[pdu_type]
        try:
            pdu = decode_pdu(pdu_type, body)
        except ProtocolError as exc:
            self._invalid(str(exc))
            return
        self._pending_pdu = pdu
        self._pending_error = ""
        self._fire(event)

    def _invalid(self, error: str, reason: int = AbortReason.INVALID_PDU_PARAMETER_VALUE) -> None:
        """Evt19: unrecognized or invalid PDU. Nothing more is read from this connection."""
        self._buffer.clear()
        self._start = 0
        self._body = None
        self._complete.clear()
        self._pending_pdu = None
        self._pending_error = error
        self._invalid_reason = reason
        self._fire(Event.EVT19)
        # After an invalid PDU the framing is lost: nothing more is read.
        self._discard = True

    # --- timers -----------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """The earliest deadline (clock seconds) at which `handle_timer()` must be called."""
        deadline = self._artim_deadline
        request = self._request_deadline
        if request is not None and (deadline is None or request < deadline):
            deadline = request
        if self.idle_timeout is not None and self.state in _IDLE_STATES:
            idle = self._last_received + self.idle_timeout
            if deadline is None or idle < deadline:
                deadline = idle
        return deadline

    def handle_timer(self, now: float) -> None:
        """Run whatever timer has expired by `now`."""
        self._now = now
        if self._artim_deadline is not None and now >= self._artim_deadline:
            self._artim_deadline = None
            self._fire(Event.EVT18)
            return
        if self._request_deadline is not None and now >= self._request_deadline:
            self._request_deadline = None
            what = "A-ASSOCIATE-RQ" if self.state == State.STA5 else "A-RELEASE-RQ"
            self.request_abort(now, f"no answer to {what} within {self.artim_timeout:g} s")
            return
        if (
            self.idle_timeout is not None
            and self.state in _IDLE_STATES
            and now >= self._last_received + self.idle_timeout
        ):
            self.request_abort(now, f"nothing received for {self.idle_timeout:g} s")


_P_DATA_TF = int(PDUType.P_DATA_TF)
_IDLE_STATES = frozenset({State.STA3, State.STA6, State.STA8, State.STA9, State.STA12})
# The actions are the methods named after them.
_METHODS = {action: "_" + action.name.lower() for action in Action}
