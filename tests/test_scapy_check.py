"""An independent codec as an outside check: scapy's ``scapy.contrib.dicom``.

(a) Every PDU our requestor and our acceptor send in real associations (over TCP, through
a recording proxy) is parsed by scapy, which must consume exactly the bytes sent, build
them back identically and read the same fields our own decoder reads and that we meant
to send: PDU type and length, AE titles, application context, presentation context IDs,
abstract and transfer syntaxes, results, maximum PDU length, implementation UID and
version, asynchronous operations window, role selection, user identity, SOP class
(common) extended negotiation, PDV context IDs, flags and data, reject and abort fields.

Two disagreements, where scapy is wrong:

- scapy reads the User Identity sub-item's Secondary-field-length only when the identity
  type is 2 (username and passcode). PS3.7 Table D.3-14 has the two-byte length in every
  User Identity (RQ) sub-item (zero unless the type is 2); only the Secondary-field itself
  is absent. For other types scapy leaves those two zero bytes unparsed; the test expects
  exactly that and nothing else.
- scapy reads at most 32 sub-items in a User Information item (a `max_count` of its
  own). PS3.8 §9.3.2.3 and PS3.7 §D.3.3.4 set no such limit: one SCP/SCU Role Selection
  sub-item per SOP class, and our default contexts (and ``dicomnet get``) ask for a role
  for each storage class they propose, so our A-ASSOCIATE-RQ (and the A-ASSOCIATE-AC
  granting them) carry over 32; stock scapy then loses the whole User Information item.
  The comparisons run with that limit raised; a test shows the stock limit's effect.

(b) Fuzzed PDUs from scapy (``fuzz()``: a seeded, bounded barrage of A-ASSOCIATE-RQ
with fuzzed items and sub-items, P-DATA-TF after a valid association, unexpected
A-ASSOCIATE-AC, A-RELEASE and A-ABORT) sent to a real ``dicomnet serve`` leave it
serving: an echo succeeds afterwards and its log has no traceback.
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import pytest
from peers import HOST, ServerFactory, build_associate_rq, pynetdicom_echo
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import dicomnet
from dicomnet.proto.contexts import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    STUDY_ROOT_FIND,
    VERIFICATION,
    PresentationContext,
)
from dicomnet.proto.pdu import (
    AAbort,
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    PDataTF,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityRQ,
    UserInformation,
    decode_pdu_bytes,
)
from fuzz.capture import Connection, Proxy, split_pdus

scapy_dicom = pytest.importorskip("scapy.contrib.dicom")
scapy_all = pytest.importorskip("scapy.all")

pytestmark = [pytest.mark.timeout(120)]

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SERVER_AET = "SCAPYSCP"
CLIENT_MAX_PDU = 32768
SERVER_MAX_PDU = 65536


# --- (a) what we send, read by scapy ---------------------------------------------------------


def _text(value: bytes) -> str:
    return value.decode("latin-1").strip(" \x00")


def _uid(value: bytes) -> str:
    return value.decode("ascii").rstrip("\x00 ")


def _dump(packet: Any) -> str:
    return str(packet.show(dump=True))


def scapy_view(raw: bytes) -> dict[str, Any]:
    """What scapy reads from one whole PDU, after checking it consumed exactly `raw`."""
    d = scapy_dicom
    packet = d.DICOM(raw)
    assert bytes(packet) == raw, "scapy does not build the PDU back identically"
    view: dict[str, Any] = {"type": packet.pdu_type, "length": packet.length}
    body = packet.payload
    leftovers: list[bytes] = []
    if isinstance(body, d.A_ASSOCIATE_RQ | d.A_ASSOCIATE_AC):
        view |= _associate_view(body, leftovers)
    elif isinstance(body, d.P_DATA_TF):
        view["pdvs"] = [
            (pdv.context_id, bool(pdv.is_command), bool(pdv.is_last), bytes(pdv.data))
            for pdv in body.pdv_items
        ]
    elif isinstance(body, d.A_ASSOCIATE_RJ):
        view["reject"] = (body.result, body.source, body.reason_diag)
    elif isinstance(body, d.A_ABORT):
        view["abort"] = (body.source, body.reason_diag)
    view["leftovers"] = leftovers
    identity = view.get("user", {}).get("identity")
    # scapy's deviation (module docstring): for an identity type other than 2 it skips the
    # Secondary-field-length, and makes the two bytes a list element of their own.
    expected = [b"\x00\x00"] if identity is not None and identity[0] != 2 else []
    assert leftovers == expected, f"scapy left {leftovers!r} unparsed"
    dump = _dump(packet)
    unparsed = dump.count("###[ Raw ]###") + dump.count("###[ Padding ]###")
    assert unparsed == len(leftovers), f"scapy left bytes unparsed:\n{dump}"
    return view


def _associate_view(body: Any, leftovers: list[bytes]) -> dict[str, Any]:
    d = scapy_dicom
    view: dict[str, Any] = {
        "called": _text(body.called_ae_title),
        "calling": _text(body.calling_ae_title),
        "contexts": [],
    }
    for item in body.variable_items:
        if item.item_type == 0x10:
            view["application_context"] = _uid(item[d.DICOMApplicationContext].uid)
        elif item.item_type == 0x20:
            pc = item[d.DICOMPresentationContextRQ]
            syntaxes = [(i.item_type, _uid(i.payload.uid)) for i in pc.sub_items]
            abstract = [uid for kind, uid in syntaxes if kind == 0x30]
            transfer = tuple(uid for kind, uid in syntaxes if kind == 0x40)
            view["contexts"].append((pc.context_id, abstract, transfer))
        elif item.item_type == 0x21:
            pc = item[d.DICOMPresentationContextAC]
            transfer = [_uid(i[d.DICOMTransferSyntax].uid) for i in pc.sub_items]
            view["contexts"].append((pc.context_id, pc.result, transfer[0] if transfer else ""))
        elif item.item_type == 0x50:
            view["user"] = _user_view(item[d.DICOMUserInformation], leftovers)
    return view


def _user_view(info: Any, leftovers: list[bytes]) -> dict[str, Any]:
    d = scapy_dicom
    user: dict[str, Any] = {"roles": [], "extended": [], "common": []}
    for sub in info.sub_items:
        if not isinstance(sub, d.DICOMVariableItem):  # bytes scapy could not place
            leftovers.append(bytes(sub))
            continue
        kind = sub.item_type
        if kind == 0x51:
            user["max_length"] = sub[d.DICOMMaximumLength].max_pdu_length
        elif kind == 0x52:
            user["implementation_uid"] = _uid(sub[d.DICOMImplementationClassUID].uid)
        elif kind == 0x55:
            user["implementation_version"] = _text(
                sub[d.DICOMImplementationVersionName].getfieldval("name")
            )
        elif kind == 0x53:
            w = sub[d.DICOMAsyncOperationsWindow]
            user["window"] = (w.max_ops_invoked, w.max_ops_performed)
        elif kind == 0x54:
            r = sub[d.DICOMSCPSCURoleSelection]
            user["roles"].append((_uid(r.sop_class_uid), bool(r.scu_role), bool(r.scp_role)))
        elif kind == 0x56:
            e = sub[d.DICOMSOPClassExtendedNegotiation]
            info_bytes = bytes(e.service_class_application_information)
            user["extended"].append((_uid(e.sop_class_uid), info_bytes))
        elif kind == 0x57:
            c = sub[d.DICOMSOPClassCommonExtendedNegotiation]
            related = bytes(c.related_sop_class_uids)
            user["common"].append((_uid(c.sop_class_uid), _uid(c.service_class_uid), related))
        elif kind == 0x58:
            u = sub[d.DICOMUserIdentity]
            secondary = bytes(u.secondary_field) if u.user_identity_type == 2 else b""
            primary = bytes(u.primary_field)
            positive = bool(u.positive_response_requested)
            user["identity"] = (u.user_identity_type, positive, primary, secondary)
        elif kind == 0x59:
            user["identity_response"] = bytes(sub[d.DICOMUserIdentityResponse].server_response)
    return user


def our_view(raw: bytes) -> dict[str, Any]:
    """The same fields as our decoder reads them."""
    pdu = decode_pdu_bytes(raw)
    view: dict[str, Any] = {"type": raw[0], "length": len(raw) - 6}
    if isinstance(pdu, AAssociateRQ | AAssociateAC):
        view["called"], view["calling"] = pdu.called_ae_title, pdu.calling_ae_title
        view["application_context"] = pdu.application_context_name
        if isinstance(pdu, AAssociateRQ):
            view["contexts"] = [
                (c.context_id, [c.abstract_syntax], c.transfer_syntaxes)
                for c in pdu.presentation_contexts
            ]
        else:
            view["contexts"] = [
                (c.context_id, c.result, c.transfer_syntax) for c in pdu.presentation_contexts
            ]
        view["user"] = _our_user(pdu.user_information)
    elif isinstance(pdu, PDataTF):
        view["pdvs"] = [(v.context_id, v.is_command, v.is_last, bytes(v.data)) for v in pdu.values]
    elif isinstance(pdu, AAssociateRJ):
        view["reject"] = (pdu.result, pdu.source, pdu.reason)
    elif isinstance(pdu, AAbort):
        view["abort"] = (pdu.source, pdu.reason)
    return view


def _our_user(info: UserInformation) -> dict[str, Any]:
    user: dict[str, Any] = {
        "roles": [(r.sop_class_uid, r.scu_role, r.scp_role) for r in info.role_selections],
        "extended": [
            (e.sop_class_uid, e.service_class_application_information)
            for e in info.sop_class_extended
        ],
        "common": [
            (
                c.sop_class_uid,
                c.service_class_uid,
                b"".join(
                    len(u).to_bytes(2, "big") + u.encode() for u in c.related_general_sop_class_uids
                ),
            )
            for c in info.sop_class_common_extended
        ],
    }
    if info.max_length is not None:
        user["max_length"] = info.max_length
    if info.implementation_class_uid is not None:
        user["implementation_uid"] = info.implementation_class_uid
    if info.implementation_version_name is not None:
        user["implementation_version"] = info.implementation_version_name
    if info.async_operations_window is not None:
        w = info.async_operations_window
        user["window"] = (w.max_invoked, w.max_performed)
    if info.user_identity_rq is not None:
        u = info.user_identity_rq
        user["identity"] = (
            u.identity_type,
            u.positive_response_requested,
            u.primary_field,
            u.secondary_field,
        )
    if info.user_identity_ac is not None:
        user["identity_response"] = info.user_identity_ac.server_response
    return user


def _u16_prefixed(uid: str) -> bytes:
    return len(uid).to_bytes(2, "big") + uid.encode()


@contextlib.contextmanager
def scapy_user_information_limit(limit: int) -> Iterator[None]:
    """Set scapy's cap on User Information sub-items (stock: 32) for a while."""
    field = next(f for f in scapy_dicom.DICOMUserInformation.fields_desc if f.name == "sub_items")
    stock = field.max_count
    field.max_count = limit
    try:
        yield
    finally:
        field.max_count = stock


def _server_ae() -> dicomnet.AE:
    ae = dicomnet.AE(SERVER_AET, max_pdu_length=SERVER_MAX_PDU, async_operations_window=(4, 4))
    ae.sop_class_extended[STUDY_ROOT_FIND] = b"\x01"

    @ae.on_association
    async def admit(request: Any) -> bytes:
        if request.pdu.calling_ae_title == "REJECTME":
            raise dicomnet.Reject(1, 1, 3)
        return b"server-token"

    @ae.on_store
    async def store(request: Any) -> int:
        return 0x0000

    @ae.on_find
    async def find(request: Any) -> Any:
        match = Dataset()
        match.QueryRetrieveLevel = "STUDY"
        match.StudyInstanceUID = "1.2.3.4"
        yield match

    return ae


def _proposed() -> list[PresentationContext]:
    storage = [
        PresentationContext(uid, (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN))
        for uid in (f"1.2.840.10008.5.1.4.1.1.{n}" for n in range(3, 20))
    ]
    return [
        PresentationContext(VERIFICATION),
        PresentationContext(STUDY_ROOT_FIND),
        PresentationContext(CT, scu_role=True, scp_role=True),
        PresentationContext(MR, (IMPLICIT_VR_LITTLE_ENDIAN,), scu_role=True, scp_role=False),
        *storage,
    ]


def _instance() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "SCAPY"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PixelData = bytes(100_000)  # more than one PDV at the server's maximum PDU length
    ds.Rows, ds.Columns, ds.BitsAllocated = 250, 200, 16
    return ds


async def _sessions(port: int) -> None:
    common = dict(aec=SERVER_AET, max_pdu_length=CLIENT_MAX_PDU, contexts=_proposed())
    password = UserIdentityRQ(2, True, b"alice", b"secret")
    extended = [SOPClassExtendedNegotiation(STUDY_ROOT_FIND, b"\x01\x01")]
    common_extended = [SOPClassCommonExtendedNegotiation(CT, "1.2.840.10008.4.2", (MR,))]
    async with dicomnet.connect(
        HOST,
        port,
        aet="SCAPYSCU",
        user_identity=password,
        async_operations_window=(4, 4),
        sop_class_extended=extended,
        sop_class_common_extended=common_extended,
        **common,  # type: ignore[arg-type]
    ) as assoc:
        await assoc.echo()
        await assoc.store(_instance())
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        assert len([m async for m in assoc.find(query, model="study")]) == 1
    jwt = UserIdentityRQ(5, False, b"eyJhbGciOiJub25lIn0.e30.")
    async with dicomnet.connect(HOST, port, aet="JWTSCU", user_identity=jwt, **common) as assoc:  # type: ignore[arg-type]
        await assoc.echo()
    async with dicomnet.connect(HOST, port, aet="DEFAULTSCU", aec=SERVER_AET) as assoc:
        await assoc.echo()  # the default contexts: a role selection per storage class
    with pytest.raises(dicomnet.AssociationRejected):
        async with dicomnet.connect(HOST, port, aet="REJECTME", **common):  # type: ignore[arg-type]
            pass
    with pytest.raises(RuntimeError):
        async with dicomnet.connect(HOST, port, aet="ABORTSCU", **common):  # type: ignore[arg-type]
            raise RuntimeError("abort this association")  # the requestor sends A-ABORT


def _acceptor_abort(port: int) -> None:
    """A hand-made requestor that sends an unknown PDU type: our acceptor aborts."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(build_associate_rq(called=SERVER_AET, calling="RAWSCU"))
        sock.sendall(b"\x09\x00\x00\x00\x00\x00")
        while sock.recv(65536):
            pass


@pytest.fixture(scope="module")
def recorded() -> Iterator[list[tuple[str, Connection]]]:
    """The associations of `_sessions` and `_acceptor_abort`, recorded through a proxy:
    (who sent the requestor side, connection)."""
    connections: list[tuple[str, Connection]] = []

    async def main() -> None:
        with anyio.fail_after(60):
            async with _server_ae().serve(HOST, 0) as server:
                proxy = Proxy(server.port)
                proxy.label = "ours"
                await _sessions(proxy.port)
                proxy.label = "raw"
                await anyio.to_thread.run_sync(_acceptor_abort, proxy.port)
                await anyio.sleep(0.5)  # the last bytes through the proxy
                proxy.close()
                connections.extend((c.label, c) for c in proxy.connections)

    anyio.run(main)
    yield connections


def test_scapy_reads_every_pdu_we_send_as_we_do(recorded: list[tuple[str, Connection]]) -> None:
    with scapy_user_information_limit(256):
        _compare_all(recorded)


def _compare_all(recorded: list[tuple[str, Connection]]) -> None:
    sent_by: dict[str, set[int]] = {"requestor": set(), "acceptor": set()}
    checked = 0
    for label, conn in recorded:
        sides = [("acceptor", bytes(conn.to_client))]
        if label == "ours":
            sides.append(("requestor", bytes(conn.to_server)))
        for role, stream in sides:
            pdus = _whole_pdus(stream)
            for raw in pdus:
                ours, theirs = our_view(raw), scapy_view(raw)
                theirs.pop("leftovers")
                assert theirs == ours, f"{role} PDU 0x{raw[0]:02X}: scapy {theirs} != ours {ours}"
                sent_by[role].add(raw[0])
                checked += 1
    assert sent_by["requestor"] == {0x01, 0x04, 0x05, 0x07}, sent_by
    assert sent_by["acceptor"] == {0x02, 0x03, 0x04, 0x06, 0x07}, sent_by
    assert checked >= 20


def test_stock_scapy_loses_user_information_past_32_sub_items(
    recorded: list[tuple[str, Connection]],
) -> None:
    conn = next(c for label, c in recorded if label == "ours" and b"DEFAULTSCU" in c.to_server)
    for stream in (conn.to_server, conn.to_client):  # our A-ASSOCIATE-RQ, then our -AC
        raw = _whole_pdus(bytes(stream))[0]
        ours = our_view(raw)
        assert len(ours["user"]["roles"]) > 30  # with max length, implementation UID: > 32
        assert "user" not in _scapy_view_unchecked(raw)  # stock scapy: the item is lost
        with scapy_user_information_limit(256):
            theirs = scapy_view(raw)
        theirs.pop("leftovers")
        assert theirs == ours


def _scapy_view_unchecked(raw: bytes) -> dict[str, Any]:
    packet = scapy_dicom.DICOM(raw)
    leftovers: list[bytes] = []
    try:
        return _associate_view(packet.payload, leftovers)
    except IndexError:  # scapy's packet has no DICOMUserInformation layer
        return {}


def _whole_pdus(stream: bytes) -> list[bytes]:
    pdus = split_pdus(stream, shrink_pdata=False)
    assert sum(len(p) for p in pdus) == len(stream), "a stream ends in the middle of a PDU"
    return pdus


def test_scapy_sees_what_we_meant_to_send(recorded: list[tuple[str, Connection]]) -> None:
    """Not only the same as our decoder: the values we configured, as scapy reads them."""
    first = next(conn for label, conn in recorded if label == "ours")
    rq = scapy_view(_whole_pdus(bytes(first.to_server))[0])
    ac = scapy_view(_whole_pdus(bytes(first.to_client))[0])
    assert (rq["called"], rq["calling"]) == (SERVER_AET, "SCAPYSCU")
    assert (ac["called"], ac["calling"]) == (SERVER_AET, "SCAPYSCU")
    proposed = _proposed()
    assert [c[0] for c in rq["contexts"]] == list(range(1, 2 * len(proposed), 2))
    assert [c[1] for c in rq["contexts"]] == [[p.abstract_syntax] for p in proposed]
    assert [c[0] for c in ac["contexts"]] == [c[0] for c in rq["contexts"]]
    # Verification, Study Root FIND, CT and MR storage: accepted, in a syntax proposed.
    for (cid, result, syntax), (_, _, offered) in zip(
        ac["contexts"][:4], rq["contexts"][:4], strict=True
    ):
        assert result == 0 and syntax in offered, (cid, result, syntax)
    assert rq["user"]["max_length"] == CLIENT_MAX_PDU
    assert ac["user"]["max_length"] == SERVER_MAX_PDU
    assert rq["user"]["window"] == ac["user"]["window"] == (4, 4)
    assert (CT, True, True) in rq["user"]["roles"] and (MR, True, False) in rq["user"]["roles"]
    assert rq["user"]["identity"] == (2, True, b"alice", b"secret")
    assert ac["user"]["identity_response"] == b"server-token"
    assert ac["user"]["extended"] == [(STUDY_ROOT_FIND, b"\x01")]
    jwt = next(conn for label, conn in recorded if label == "ours" and b"JWTSCU" in conn.to_server)
    jwt_rq = scapy_view(_whole_pdus(bytes(jwt.to_server))[0])
    assert jwt_rq["user"]["identity"][:3] == (5, False, b"eyJhbGciOiJub25lIn0.e30.")
    assert jwt_rq["leftovers"] == [b"\x00\x00"]  # scapy's deviation, see the docstring
    flags = {
        (cid, cmd, last)
        for label, conn in recorded
        for raw in _whole_pdus(bytes(conn.to_server))
        if label == "ours" and raw[0] == 4
        for cid, cmd, last, _ in scapy_view(raw)["pdvs"]
    }
    assert {(True, True), (False, False), (False, True)} <= {(c, last) for _, c, last in flags}


# --- (b) scapy's fuzzed PDUs against `dicomnet serve` ----------------------------------------

BARRAGE = 300
SEED = 20261205


def _valid_items() -> list[Any]:
    d = scapy_dicom
    return [
        d.DICOMVariableItem() / d.DICOMApplicationContext(),
        d.build_presentation_context_rq(1, VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN]),
        d.build_user_information(max_pdu_length=16384, implementation_class_uid="1.2.3"),
    ]


def _fuzzed_sub_item() -> Any:
    d = scapy_dicom
    kind = random.choice(
        [
            d.DICOMUserIdentity,
            d.DICOMSCPSCURoleSelection,
            d.DICOMAsyncOperationsWindow,
            d.DICOMSOPClassExtendedNegotiation,
            d.DICOMSOPClassCommonExtendedNegotiation,
            d.DICOMMaximumLength,
            d.DICOMImplementationVersionName,
        ]
    )
    return d.DICOMVariableItem() / scapy_all.fuzz(kind())


def _framed(pdu_type: int, layer: Any) -> bytes:
    """A PDU of `pdu_type` around `layer` built once (fuzzed fields draw new values each
    time they are built, so scapy's own length would not match the body sent)."""
    d = scapy_dicom
    return bytes(d.DICOM(pdu_type=pdu_type) / scapy_all.Raw(load=bytes(layer)))


def _barrage_case(index: int, valid_rq: bytes) -> tuple[bytes, bytes]:
    """(bytes to send first and wait for an answer to, the fuzzed bytes)."""
    d, fuzz = scapy_dicom, scapy_all.fuzz
    kind = index % 6
    if kind == 0:  # everything fuzzed, the PDU header too
        return b"", bytes(fuzz(d.DICOM() / d.A_ASSOCIATE_RQ(variable_items=_valid_items())))
    if kind == 1:  # a fuzzed request body in a PDU of the right length
        return b"", _framed(1, fuzz(d.A_ASSOCIATE_RQ(variable_items=_valid_items())))
    if kind == 2:  # a valid request with fuzzed user information sub-items
        subs = [d.DICOMVariableItem() / d.DICOMMaximumLength(max_pdu_length=16384)]
        subs += [_fuzzed_sub_item() for _ in range(random.randint(1, 4))]
        user = d.DICOMVariableItem() / d.DICOMUserInformation(sub_items=subs)
        items = [*_valid_items()[:2], user]
        rq = d.A_ASSOCIATE_RQ(called_ae_title=b"DICOMNET", calling_ae_title=b"SCAPY")
        rq.variable_items = items
        return b"", _framed(1, rq)
    if kind == 3:  # fuzzed P-DATA-TF on an association
        pdvs = [fuzz(d.PresentationDataValueItem()) for _ in range(random.randint(1, 3))]
        return valid_rq, _framed(4, d.P_DATA_TF(pdv_items=pdvs))
    if kind == 4:  # fuzzed release / abort / reject on an association
        pdu_type, layer = random.choice(
            [(5, d.A_RELEASE_RQ), (6, d.A_RELEASE_RP), (7, d.A_ABORT), (3, d.A_ASSOCIATE_RJ)]
        )
        return valid_rq, _framed(pdu_type, fuzz(layer()))
    # an A-ASSOCIATE-AC (fuzzed) sent to an acceptor
    return b"", _framed(2, fuzz(d.A_ASSOCIATE_AC(variable_items=_valid_items())))


def _send(port: int, first: bytes, data: bytes) -> bytes:
    """Send `first` and read its answer, then `data`; read until the server closes."""
    received = bytearray()
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.settimeout(10)
        if first:
            sock.sendall(first)
            received += sock.recv(65536)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    return bytes(received)


def test_scapy_fuzzed_pdus_leave_serve_serving(dicomnet_server: ServerFactory) -> None:
    server = dicomnet_server()
    random.seed(SEED)  # scapy's fuzz() draws from `random`
    valid_rq = build_associate_rq(called="DICOMNET", calling="SCAPY")
    cases = [_barrage_case(i, valid_rq) for i in range(BARRAGE)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda case: _send(server.port, *case), cases))
    assert len(answers) == BARRAGE
    assert server.alive()
    outcome = pynetdicom_echo(server.port, aec="DICOMNET")
    assert outcome.established and outcome.status == 0x0000, outcome
    log = server.log_text(tail=None)
    assert "Traceback" not in log, log[-5000:]
    # ... and the associations the barrage broke ended with a line saying why.
    refused = [line for line in log.splitlines() if "invalid" in line or "unexpected" in line]
    assert len(refused) >= 30, log[-5000:]
    # A whole PDU in Sta2 (a fuzzed A-ASSOCIATE-RQ in a PDU of the right length, or an
    # A-ASSOCIATE-AC) is answered: A-ASSOCIATE-AC or -RJ, or A-ABORT (PS3.8 Table 9-10,
    # Evt6 / Evt19 in Sta2), even from a peer that half-closed after sending it.
    for index, answer in enumerate(answers):
        if index % 6 in (1, 2, 5):
            assert answer[:1] in (b"\x02", b"\x03", b"\x07"), (index, cases[index][1][:64])
    # Whatever came back is a PDU an acceptor may send.
    kinds = {a[0] for a in answers if a}
    assert kinds <= {0x02, 0x03, 0x04, 0x06, 0x07}, kinds


def test_peer_that_half_closes_still_gets_the_answer(dicomnet_server: ServerFactory) -> None:
    """Found by the barrage above: a requestor that sends its last PDU and then shuts down
    its side of the connection (FIN) got no answer from ``serve`` (under uvloop the
    transport was closed at EOF before the answer was written)."""
    server = dicomnet_server()
    good = build_associate_rq(called="DICOMNET", calling="HALFCLOSE")
    for _ in range(5):
        assert _send(server.port, b"", good)[:1] == b"\x02"  # A-ASSOCIATE-AC
        bad = good[:74] + b"\x99" + good[75:]  # an unknown item type (PS3.8 §9.3.2)
        assert _send(server.port, b"", bad)[:1] == b"\x07"  # A-ABORT
