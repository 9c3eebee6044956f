"""The fuzz targets: one function per target, each taking the fuzzer's bytes.

The contract every target checks: malformed input from a peer raises
`dicomnet.errors.ProtocolError` (which the association turns into an A-ABORT), or, on
the Upper Layer path, becomes an `Aborted` event; nothing else escapes. The identifier
target's contract is the SCP's: an identifier that does not decode is answered 0xA900
(`services.qr._decode_identifier` catches what the decoder raises), and planning the
query from one that does raises only `QueryError` (answered with its failure status).
Any other exception is a finding; so is a hang or a memory blow-up (the runner's
``-timeout`` and ``-rss_limit_mb``).

The same functions run under atheris (fuzz/run.py), hypothesis (tests/test_fuzz_*.py)
and the regression replay (tests/test_fuzz_regressions.py).
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicomnet.errors import ProtocolError
from dicomnet.proto.contexts import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    PATIENT_ROOT_FIND,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    VERIFICATION,
    AcceptedContext,
    PresentationContext,
    accepted_as_requestor,
    negotiate_as_acceptor,
)
from dicomnet.proto.dimse import (
    CommandReceived,
    MessageAssembler,
    UnrecognizedRSP,
    decode_command,
    encode_command,
    response_to,
)
from dicomnet.proto.extended import (
    AsyncOperationsWindowNegotiation,
    SOPClassExtendedNegotiations,
    UserIdentityNegotiation,
)
from dicomnet.proto.fsm import TRANSITIONS, Event
from dicomnet.proto.pdu import (
    PDU_HEADER_LENGTH,
    AAssociateRJ,
    PDataTF,
    decode_pdu,
    decode_pdu_bytes,
    parse_pdu_header,
)
from dicomnet.proto.ul import (
    NEED_DATA,
    AssociateAccepted,
    AssociateRequested,
    DataReceived,
    ReleaseRequested,
    UpperLayer,
)
from dicomnet.testing import build_associate_ac, build_associate_rq

__all__ = ["TARGETS", "dataset", "dimse", "identifier", "pdu", "ul"]

TRANSFER_SYNTAXES = (
    IMPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
)
_ALL_TS = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)
# What the acceptor of the Upper Layer target supports (as `dicomnet serve` would).
_SUPPORTED = {
    uid: PresentationContext(uid, _ALL_TS, scu_role=True, scp_role=True)
    for uid in (VERIFICATION, STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET, PATIENT_ROOT_FIND)
}
_OUR_RQ = build_associate_rq(
    abstract_syntaxes=(VERIFICATION, STUDY_ROOT_FIND, STUDY_ROOT_GET),
    transfer_syntaxes=(EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN),
)
_OUR_RQ_BYTES = _OUR_RQ.encode()
_THEIR_AC_BYTES = build_associate_ac(_OUR_RQ).encode()
_MAX_EVENTS = 10_000


# --- (a) the PDU decoder ---------------------------------------------------------------------


def pdu(data: bytes) -> None:
    """PS3.8 §9.3: decode `data` as one PDU (header included), then as the body of each
    PDU type; a decoded PDU must encode again to what decodes to the same PDU."""
    for decoded in _decodings(data):
        again = decode_pdu_bytes(decoded.encode())
        if again != decoded:
            raise AssertionError(f"{decoded!r} re-encodes as {again!r}")


def _decodings(data: bytes) -> list[Any]:
    decoded = []
    try:
        decoded.append(decode_pdu_bytes(data))
    except ProtocolError:
        pass
    if data:
        # The first byte picks a PDU type, the rest is its body (what the UL hands over).
        try:
            decoded.append(decode_pdu(data[0] % 8, data[1:]))
        except ProtocolError:
            pass
    return decoded


# --- (b) the Upper Layer receive path --------------------------------------------------------


class _Driver:
    """Plays the association's part around an `UpperLayer`: answers its events as the
    shell does, checks that every byte it sends is a well-formed PDU."""

    def __init__(self, layer: UpperLayer, reject: bool) -> None:
        self.layer = layer
        self.reject = reject
        self.assembler = MessageAssembler(lambda cid: cid in (1, 3, 5))
        self.now = 0.0

    def sent(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if len(view) < PDU_HEADER_LENGTH:
                raise AssertionError(f"a truncated PDU was sent: {bytes(view)!r}")
            _, length = parse_pdu_header(view)
            decode_pdu_bytes(view[: PDU_HEADER_LENGTH + length])  # ProtocolError: a finding
            view = view[PDU_HEADER_LENGTH + length :]

    def feed(self, chunk: bytes) -> None:
        self.now += 0.25
        self.layer.receive_data(chunk, self.now)
        self.drain()

    def drain(self) -> None:
        layer = self.layer
        for _ in range(_MAX_EVENTS):
            event = layer.next_event()
            if event is NEED_DATA:
                break
            self.handle(event)
            self.sent(layer.data_to_send())
        else:
            raise AssertionError("the Upper Layer made events without end")
        self.sent(layer.data_to_send())

    def handle(self, event: object) -> None:
        layer = self.layer
        if isinstance(event, AssociateRequested):
            if self.reject:
                self.sent(layer.reject(AAssociateRJ(1, 1, 7), self.now))
                return
            negotiated = negotiate_as_acceptor(
                event.request,
                _SUPPORTED,
                max_pdu_length=16384,
                implementation_class_uid="1.2.3.4",
                implementation_version_name="FUZZ",
                extensions=(
                    AsyncOperationsWindowNegotiation(4, 4),
                    UserIdentityNegotiation(server_response=b"token"),
                    SOPClassExtendedNegotiations(supported={STUDY_ROOT_FIND: b"\x01"}),
                ),
            )
            self.sent(layer.accept(negotiated.response))
        elif isinstance(event, AssociateAccepted):
            roles = _OUR_RQ.user_information.role_selections
            accepted_as_requestor(_OUR_RQ.presentation_contexts, event.response, roles)
        elif isinstance(event, DataReceived):
            self.data(event.pdu)
        elif isinstance(event, ReleaseRequested):
            if (layer.state, Event.EVT14) in TRANSITIONS:
                self.sent(layer.release_response(self.now))

    def data(self, pdata: PDataTF) -> None:
        for pdv in pdata.values:
            try:
                received = self.assembler.feed(pdv)
            except ProtocolError as exc:
                self.sent(self.layer.abort(self.now, str(exc)))
                return
            if isinstance(received, CommandReceived):
                _answer(received.message)


def _answer(message: Any) -> None:
    """What the performing side does with a request: build and encode its response."""
    if message.is_request:
        encode_command(response_to(message, 0x0000))
        encode_command(response_to(message, 0xC000, error_comment="x" * 80))
    elif not isinstance(message, UnrecognizedRSP):
        encode_command(message)


def _chunks(data: bytes, seed: int) -> list[bytes]:
    """`data` cut where a generator seeded with `seed` says (0: in one piece)."""
    if seed == 0:
        return [data]
    rng = random.Random(seed)
    limit = 1 + seed % 64
    out = []
    at = 0
    while at < len(data):
        size = rng.randint(1, limit)
        out.append(data[at : at + size])
        at += size
    return out


def ul(data: bytes) -> None:
    """The Upper Layer fed `data` in chunks, from a state the first byte picks: acceptor
    in Sta2, requestor in Sta5 (A-ASSOCIATE-RQ sent), either in Sta6 (associated: P-DATA
    through PDV reassembly and command decoding), acceptor in Sta7 (A-RELEASE-RQ sent).
    Then the timers fire and the connection closes."""
    if len(data) < 2:
        return
    mode, seed, payload = data[0] % 6, data[1], data[2:]
    requestor = mode in (1, 3)
    max_pdu = (0, 16384, 1 << 20)[data[0] // 6 % 3]
    layer = UpperLayer(is_requestor=requestor, max_pdu_length=max_pdu, idle_timeout=60.0)
    driver = _Driver(layer, reject=mode == 5)
    if requestor:
        layer.request_association(_OUR_RQ)
    driver.sent(layer.connection_made(0.0))
    if mode == 2 or mode == 4:
        driver.feed(_OUR_RQ_BYTES)
    elif mode == 3:
        driver.feed(_THEIR_AC_BYTES)
    if mode == 4:
        driver.sent(layer.release(driver.now))
    for chunk in _chunks(payload, seed):
        driver.feed(chunk)
    layer.handle_timer(driver.now + 10_000.0)
    driver.drain()
    layer.receive_data(b"", driver.now + 10_001.0)
    driver.drain()


# --- (c) command sets and PDV reassembly -----------------------------------------------------


def dimse(data: bytes) -> None:
    """PS3.7 §6.3.1, PS3.8 Annex E: the first byte picks: decode `data` as one command
    set; or as P-DATA-TF bodies (each after a 2-byte length) whose PDVs are reassembled.
    Each decoded request is answered as the performing side does."""
    if not data:
        return
    if data[0] % 2 == 0:
        try:
            message, _ = decode_command(data[1:])
        except ProtocolError:
            return
        _answer(message)
        return
    assembler = MessageAssembler(lambda cid: cid in (1, 3))
    view = memoryview(data)[1:]
    while len(view) >= 2:
        length = int.from_bytes(view[:2], "big")
        body, view = view[2 : 2 + length], view[2 + length :]
        try:
            pdata = decode_pdu(4, body)
            assert isinstance(pdata, PDataTF)
            for pdv in pdata.values:
                received = assembler.feed(pdv)
                if isinstance(received, CommandReceived):
                    _answer(received.message)
        except ProtocolError:
            return


# --- (d) identifiers -------------------------------------------------------------------------

_index: Any = None


def _the_index() -> Any:
    """One empty index per process (the SQL each query makes runs against it)."""
    global _index
    if _index is None:
        from dicomnet.pacs.index import Index

        folder = Path(tempfile.mkdtemp(prefix="dicomnet-fuzz-"))
        _index = Index(folder / "index.sqlite")
    return _index


_MODELS = ("patient", "study")
_LEVELS = (None, "PATIENT", "STUDY", "SERIES", "IMAGE")


def identifier(data: bytes) -> None:
    """PS3.4 §C.4: the identifier of a C-FIND, C-MOVE or C-GET (or an N-service data set)
    as the SCP decodes it, then planned and run as a query and as a retrieve against an
    (empty) index. The first byte picks the transfer syntax, the model, the level and the
    relational / combined date-time options."""
    if not data:
        return
    from dicomnet.pacs.index import QueryError
    from dicomnet.services.qr import _decode_identifier

    pick = data[0]
    ts = TRANSFER_SYNTAXES[pick % 4]
    model = _MODELS[pick // 4 % 2]
    level = _LEVELS[pick // 8 % 5]
    relational = bool(pick & 0x40)
    combined = bool(pick & 0x80)
    dataset, _problem = _decode_identifier(data[1:], AcceptedContext(1, STUDY_ROOT_FIND, ts))
    if dataset is None:
        return  # answered 0xA900 with the problem as Error Comment
    index = _the_index()
    try:
        matches = index.query(
            model, level, dataset, relational=relational, combined_datetime=combined
        )
        for _ in matches:
            pass
    except QueryError:
        pass
    try:
        for _ in index.files(model, level, dataset, relational=relational):
            pass
    except QueryError:
        pass


# --- (d) N-service data sets and worklist queries ---------------------------------------------


def _mpps_in_progress() -> Any:
    from pydicom.dataset import Dataset

    current = Dataset()
    current.PerformedProcedureStepStatus = "IN PROGRESS"
    current.PatientID = "P1"
    return current


def _worklist_item() -> Any:
    from pydicom.dataset import Dataset

    step = Dataset()
    step.Modality = "CT"
    step.ScheduledStationAETitle = "CT1"
    step.ScheduledProcedureStepStartDate = "20240102"
    step.ScheduledProcedureStepStartTime = "101010"
    item = Dataset()
    item.PatientName = "Doe^Jane"
    item.PatientID = "P1"
    item.AccessionNumber = "A1"
    item.ScheduledProcedureStepSequence = [step]
    return item


def dataset(data: bytes) -> None:
    """PS3.4 Annexes F, J, K: an N-service data set as the performing side decodes it
    (`storage.decode_received`; what does not decode is answered 0x0110), then read by
    the SCP handler the first byte picks: a storage commitment N-ACTION (SCP) or
    N-EVENT-REPORT (SCU), an MPPS N-CREATE or N-SET, or a worklist C-FIND identifier
    matched against an item. Bits 0-1: the transfer syntax; bits 2-4: the reader. The
    handlers' contract: a bad data set raises `DimseError` (or the index's `QueryError`
    for a query), which becomes its failure status."""
    if not data:
        return
    from dicomnet.errors import DimseError
    from dicomnet.pacs.index import QueryError
    from dicomnet.pacs.worklist_matching import WorklistQuery
    from dicomnet.services.commitment import parse_action, parse_report
    from dicomnet.services.mpps import check_create, check_set
    from dicomnet.storage import decode_received

    pick = data[0]
    try:
        received = decode_received(data[1:], TRANSFER_SYNTAXES[pick % 4])
    except Exception:  # services.nservices: answered 0x0110 (processing failure)
        return
    reader = pick // 4 % 5
    try:
        if reader == 0:
            parse_action(received)
        elif reader == 1:
            parse_report(received)
        elif reader == 2:
            check_create(received)
            check_create(received, strict=False)
        elif reader == 3:
            check_set(_mpps_in_progress(), received)
        else:
            WorklistQuery.parse(received).match(_worklist_item())
    except (DimseError, QueryError):
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "pdu": pdu,
    "ul": ul,
    "dimse": dimse,
    "identifier": identifier,
    "dataset": dataset,
}
