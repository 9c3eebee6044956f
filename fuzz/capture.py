"""Record real associations and cut them into the seed corpus of each fuzz target.

    PYTHONPATH=. python fuzz/capture.py [--out fuzz/corpus] [--raw DIR]

Starts ``dicomnet serve``, DCMTK ``storescp`` and a pynetdicom SCP on loopback, each
behind a recording TCP proxy, then runs real clients through the proxies: DCMTK
``echoscu``, ``storescu``, ``findscu``, ``movescu`` (its sub-association, from
``serve`` to movescu, goes through a proxy too), ``getscu``; pynetdicom with
extended negotiation (role selection, user identity, asynchronous operations
window, SOP class (common) extended negotiation) and an A-ABORT; the ``dicomnet``
CLI as requestor against DCMTK and pynetdicom (an accepted and a rejected
association). Each side's bytes are cut into PDUs and written as small files:

- ``pdu/``: each distinct PDU, header included;
- ``ul/``: each side's byte stream, for the state the ``ul`` target starts it in;
- ``dimse/``: each command set, and each stream's P-DATA-TF bodies;
- ``identifier/``: each C-FIND / C-MOVE / C-GET identifier, with its transfer syntax;
- ``dataset/``: the storage commitment, MPPS and worklist data sets dicomnet sends.

Rerunning replaces the files it wrote (names are content hashes). Needs DCMTK on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dicomnet.errors import ProtocolError  # noqa: E402
from dicomnet.proto.dimse import CommandReceived, DatasetFragment, MessageAssembler  # noqa: E402
from dicomnet.proto.pdu import (  # noqa: E402
    AAssociateAC,
    PDataTF,
    decode_pdu_bytes,
)

HOST = "127.0.0.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
TS_INDEX = {  # as fuzz/targets.py TRANSFER_SYNTAXES
    "1.2.840.10008.1.2": 0,
    "1.2.840.10008.1.2.1": 1,
    "1.2.840.10008.1.2.2": 2,
    "1.2.840.10008.1.2.1.99": 3,
}
MAX_FILE = 8 << 10  # bytes per corpus file
MAX_PDATA_PER_STREAM = 4
MAX_PDV_DATA = 512  # a longer PDV (pixel data) is cut to this in the seeds


# --- recording proxy -------------------------------------------------------------------------


@dataclass
class Connection:
    label: str
    to_server: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)


class Proxy:
    """Forwards 127.0.0.1:port to `upstream`, keeping each connection's bytes both ways."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.label = "?"
        self.connections: list[Connection] = []
        self._listener = socket.create_server((HOST, 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection((HOST, self.upstream), timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            conn = Connection(self.label)
            self.connections.append(conn)
            threading.Thread(
                target=_pump, args=(client, server, conn.to_server), daemon=True
            ).start()
            threading.Thread(
                target=_pump, args=(server, client, conn.to_client), daemon=True
            ).start()

    def close(self) -> None:
        self._listener.close()


def _pump(src: socket.socket, dst: socket.socket, record: bytearray) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            record += data
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


# --- peers and clients -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


@contextlib.contextmanager
def process(argv: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            wait_port(port)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run(argv: list[str], timeout: float = 60.0) -> None:
    result = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if result.returncode:
        text = (result.stdout + result.stderr).decode(errors="replace")[-400:]
        print(f"  ({argv[0]} exited {result.returncode}: {text.strip()})", file=sys.stderr)


def write_instances(folder: Path) -> tuple[list[Path], str]:
    """Two small CT images of one study: one explicit, one implicit VR little endian."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

    study, series = generate_uid(), generate_uid()
    paths = []
    for number, ts in enumerate((ExplicitVRLittleEndian, ImplicitVRLittleEndian), 1):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = generate_uid()
        ds.PatientName = "Fuzz^Seed"
        ds.PatientID = "FUZZ1"
        ds.PatientBirthDate = "19700101"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.StudyDate = "20240102"
        ds.StudyTime = "101010"
        ds.AccessionNumber = "A1"
        ds.StudyID = "1"
        ds.Modality = "CT"
        ds.SeriesNumber = 1
        ds.InstanceNumber = number
        ds.Rows = ds.Columns = 16
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = bytes(range(256))
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ts
        path = folder / f"ct{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, study


def pynetdicom_scu(port: int, called: str) -> None:
    """Extended negotiation of every kind, an echo and a C-FIND, then an A-ABORT."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, build_role
    from pynetdicom.pdu_primitives import (
        AsynchronousOperationsWindowNegotiation,
        SOPClassCommonExtendedNegotiation,
        SOPClassExtendedNegotiation,
        UserIdentityNegotiation,
    )

    CTImageStorage = "1.2.840.10008.5.1.4.1.1.2"
    StudyRootQueryRetrieveInformationModelFind = "1.2.840.10008.5.1.4.1.2.2.1"
    StudyRootQueryRetrieveInformationModelGet = "1.2.840.10008.5.1.4.1.2.2.3"
    Verification = "1.2.840.10008.1.1"

    ae = AE("PYNETDICOM")
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2
    identity.primary_field = b"alice"
    identity.secondary_field = b"secret"
    identity.positive_response_requested = True
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 4
    window.maximum_number_operations_performed = 4
    extended = SOPClassExtendedNegotiation()
    extended.sop_class_uid = StudyRootQueryRetrieveInformationModelFind
    extended.service_class_application_information = b"\x01\x01\x01"
    common = SOPClassCommonExtendedNegotiation()
    common.sop_class_uid = CTImageStorage
    common.service_class_uid = "1.2.840.10008.4.2"
    common.related_general_sop_class_identification = ["1.2.840.10008.5.1.4.1.1.2.1"]
    roles = [build_role(CTImageStorage, scp_role=True, scu_role=True)]
    assoc = ae.associate(
        HOST, port, ae_title=called, ext_neg=[identity, window, extended, common, *roles]
    )
    if assoc.is_established:
        assoc.send_c_echo()
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientName = "F*"
        query.StudyInstanceUID = ""
        query.StudyDate = "20200101-"
        for _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            pass
        assoc.abort()


@contextlib.contextmanager
def pynetdicom_scp(port: int) -> Iterator[None]:
    from pynetdicom import AE, evt

    ae = AE("PYSCP")
    ae.require_called_aet = True
    ae.add_supported_context("1.2.840.10008.1.1")
    server = ae.start_server(
        (HOST, port), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0)]
    )
    assert server is not None
    try:
        yield
    finally:
        server.shutdown()


# --- cutting the streams into corpus files ---------------------------------------------------


def split_pdus(stream: bytes, *, shrink_pdata: bool = True) -> list[bytes]:
    """The whole PDUs of `stream`; with `shrink_pdata`, each P-DATA-TF's values cut to
    `MAX_PDV_DATA` bytes."""
    pdus = []
    at = 0
    while at + 6 <= len(stream):
        end = at + 6 + int.from_bytes(stream[at + 2 : at + 6], "big")
        if end > len(stream):
            break
        pdus.append(shrink(stream[at:end]) if shrink_pdata else stream[at:end])
        at = end
    return pdus


def shrink(raw: bytes) -> bytes:
    if raw[0] != 4 or len(raw) <= MAX_PDV_DATA + 12:
        return raw
    pdata = decode_pdu_bytes(raw)
    assert isinstance(pdata, PDataTF)
    values = tuple(replace(pdv, data=bytes(pdv.data[:MAX_PDV_DATA])) for pdv in pdata.values)
    return PDataTF(values).encode()


class Corpus:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.written: dict[str, int] = {}

    def add(self, target: str, data: bytes, name: str) -> None:
        if target != "pdu":  # a PDU stays whole (its P-DATA-TF values are already cut)
            data = data[:MAX_FILE]
        digest = hashlib.sha1(data).hexdigest()[:12]
        folder = self.root / target
        folder.mkdir(parents=True, exist_ok=True)
        if any(folder.glob(f"*-{digest}")):
            return
        (folder / f"{name}-{digest}").write_bytes(data)
        self.written[target] = self.written.get(target, 0) + 1


def contexts_of(pdus: list[bytes]) -> dict[int, str]:
    """Accepted context ID -> transfer syntax, from the A-ASSOCIATE-AC among `pdus`."""
    for raw in pdus:
        if raw[0] == 2:
            ac = decode_pdu_bytes(raw)
            assert isinstance(ac, AAssociateAC)
            return {c.context_id: c.transfer_syntax for c in ac.presentation_contexts if c.accepted}
    return {}


def cut(conn: Connection, corpus: Corpus) -> None:
    client, server = split_pdus(bytes(conn.to_server)), split_pdus(bytes(conn.to_client))
    syntaxes = contexts_of(server)
    for side, pdus in (("c", client), ("s", server)):
        stream = b"".join(pdus)
        name = f"{conn.label}-{side}"
        pdata = 0
        for raw in pdus:
            if raw[0] == 4:
                pdata += 1
                if pdata > MAX_PDATA_PER_STREAM:
                    continue
            corpus.add("pdu", raw, f"{name}-{raw[0]}")
        first_is_rq = bool(pdus) and pdus[0][0] in (1, 2)
        # ul: mode 0 acceptor in Sta2 (the requestor's stream), 1 requestor in Sta5 (the
        # acceptor's), 2 / 3 the same once associated (without their first PDU).
        mode = 0 if side == "c" else 1
        for seed in (0, 7):
            corpus.add("ul", bytes((mode, seed)) + stream, f"{name}-m{mode}")
        if first_is_rq and len(pdus) > 1:
            rest = b"".join(pdus[1:])
            corpus.add("ul", bytes((mode + 2, 0)) + rest, f"{name}-m{mode + 2}")
        bodies = [raw[6:] for raw in pdus if raw[0] == 4 and len(raw) - 6 < 0x10000]
        if bodies:
            framed = b"".join(len(b).to_bytes(2, "big") + b for b in bodies[:MAX_PDATA_PER_STREAM])
            corpus.add("dimse", b"\x01" + framed, f"{name}-pdata")
        messages(pdus, syntaxes, corpus, name)


def messages(pdus: list[bytes], syntaxes: dict[int, str], corpus: Corpus, name: str) -> None:
    assembler = MessageAssembler()
    command: bytearray = bytearray()
    dataset = bytearray()
    current: CommandReceived | None = None
    for raw in pdus:
        if raw[0] != 4:
            continue
        pdata = decode_pdu_bytes(raw)
        assert isinstance(pdata, PDataTF)
        for pdv in pdata.values:
            if pdv.is_command:
                command += pdv.data
                if pdv.is_last:
                    corpus.add("dimse", b"\x00" + bytes(command), f"{name}-cmd")
                    command.clear()
            try:
                received = assembler.feed(pdv)
            except ProtocolError:
                return
            if isinstance(received, CommandReceived):
                current = received
                dataset.clear()
            elif isinstance(received, DatasetFragment) and current is not None:
                dataset += received.data
                if received.is_last:
                    identifier(current, bytes(dataset), syntaxes, corpus, name)


def identifier(
    command: CommandReceived, data: bytes, syntaxes: dict[int, str], corpus: Corpus, name: str
) -> None:
    kind = type(command.message).__name__
    if kind not in ("CFindRQ", "CMoveRQ", "CGetRQ", "CFindRSP", "NActionRQ", "NEventReportRQ"):
        return
    ts = syntaxes.get(command.context_id)
    if ts not in TS_INDEX:
        return
    # fuzz/targets.py identifier(): bits 0-1 transfer syntax, 2 model, 3-5 level (0: None).
    model = 0 if "patient" in name else 1
    corpus.add("identifier", bytes((TS_INDEX[ts] | model << 2,)) + data, f"{name}-{kind}")


# --- N-service data sets ---------------------------------------------------------------------


def _dataset(**values: object) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def dataset_seeds(corpus: Corpus) -> None:
    """Seeds of the ``dataset`` target: the N-service data sets and the worklist query
    dicomnet itself sends (no peer at hand sends storage commitment or MPPS here)."""
    from dicomnet.services.commitment import (
        CommitmentResult,
        action_information,
        report_information,
    )
    from dicomnet.storage import encode_dataset

    refs = [(CT, "1.2.3.4.5"), ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.6")]
    _, report = report_information(
        CommitmentResult("1.2.3.99", (refs[0],), ((*refs[1], 0x0110),), "PACS")
    )
    step = _dataset(
        StudyInstanceUID="1.2.3", AccessionNumber="A1", ReferencedStudySequence=[],
        RequestedProcedureID="R1", RequestedProcedureDescription="",
        ScheduledProcedureStepID="S1", ScheduledProcedureStepDescription="",
        ScheduledProtocolCodeSequence=[],
    )  # fmt: skip
    create = _dataset(
        ScheduledStepAttributesSequence=[step], PatientName="Doe^Jane", PatientID="P1",
        PatientBirthDate="19700101", PatientSex="F", ReferencedPatientSequence=[],
        PerformedProcedureStepID="PPS1", PerformedStationAETitle="CT1",
        PerformedStationName="", PerformedLocation="",
        PerformedProcedureStepStartDate="20240102", PerformedProcedureStepStartTime="101010",
        PerformedProcedureStepStatus="IN PROGRESS", PerformedProcedureStepDescription="",
        PerformedProcedureTypeDescription="", PerformedProcedureStepEndDate="",
        PerformedProcedureStepEndTime="", Modality="CT", StudyID="1",
        ProcedureCodeSequence=[], PerformedProtocolCodeSequence=[], PerformedSeriesSequence=[],
    )  # fmt: skip
    series = _dataset(SeriesInstanceUID="1.2.3.4", RetrieveAETitle="", ReferencedImageSequence=[])
    completed = _dataset(
        PerformedProcedureStepStatus="COMPLETED", PerformedProcedureStepEndDate="20240102",
        PerformedProcedureStepEndTime="111111", PerformedSeriesSequence=[series],
    )  # fmt: skip
    sps = _dataset(
        Modality="CT", ScheduledProcedureStepStartDate="20240101-20240131",
        ScheduledStationAETitle="",
    )  # fmt: skip
    worklist = _dataset(PatientName="Doe*", PatientID="", ScheduledProcedureStepSequence=[sps])
    readers = {  # fuzz/targets.py dataset(): bits 2-4 pick the reader
        "action": action_information("1.2.3.99", refs),
        "report": report,
        "mpps-create": create,
        "mpps-set": completed,
        "worklist": worklist,
    }
    for reader, (name, ds) in enumerate(readers.items()):
        for ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
            pick = TS_INDEX[ts] | reader << 2
            corpus.add("dataset", bytes((pick,)) + encode_dataset(ds, ts), f"dicomnet-{name}")


# --- the sessions ----------------------------------------------------------------------------


def capture(work: Path) -> list[Connection]:
    python = sys.executable
    env_cli = [python, "-m", "dicomnet"]
    storage, received, logs = work / "storage", work / "received", work / "logs"
    for folder in (storage, received, logs):
        folder.mkdir(parents=True, exist_ok=True)
    files, study_uid = write_instances(work)
    serve_port, storescp_port, movescu_port, pyscp_port = (free_port() for _ in range(4))
    move_proxy = Proxy(movescu_port)
    move_proxy.label = "dicomnet-move-sub"
    serve = [
        *env_cli,
        "serve",
        "--port",
        str(serve_port),
        "--storage",
        str(storage),
        "--peer",
        f"MOVESCU={HOST}:{move_proxy.port}",
        "--peer",
        f"GETSCU={HOST}:1",
    ]
    storescp = ["storescp", "-aet", "STORESCP", "-od", str(received), str(storescp_port)]
    connections: list[Connection] = []
    with (
        process(serve, serve_port, logs / "serve.log"),
        process(storescp, storescp_port, logs / "storescp.log"),
        pynetdicom_scp(pyscp_port),
    ):
        to_serve, to_storescp, to_pyscp = Proxy(serve_port), Proxy(storescp_port), Proxy(pyscp_port)
        p = str(to_serve.port)
        a = ["-aec", "DICOMNET"]
        study = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]
        sessions: list[tuple[Proxy, str, list[str]]] = [
            (to_serve, "dcmtk-echoscu", ["echoscu", *a, "-aet", "ECHOSCU", HOST, p]),
            (
                to_serve,
                "dcmtk-storescu",
                ["storescu", *a, "-aet", "STORESCU", HOST, p, *map(str, files)],
            ),
            (
                to_serve,
                "dcmtk-storescu-propose-lossless",
                ["storescu", *a, "-xs", HOST, p, str(files[0])],
            ),
            (
                to_serve,
                "dcmtk-findscu-study",
                [
                    "findscu",
                    "-S",
                    *a,
                    "-k",
                    "QueryRetrieveLevel=STUDY",
                    "-k",
                    "PatientID=FUZZ1",
                    "-k",
                    "StudyInstanceUID",
                    "-k",
                    "PatientName=F*",
                    "-k",
                    "StudyDate=20200101-",
                    HOST,
                    p,
                ],
            ),
            (
                to_serve,
                "dcmtk-findscu-patient",
                [
                    "findscu",
                    "-P",
                    *a,
                    "-k",
                    "QueryRetrieveLevel=PATIENT",
                    "-k",
                    "PatientName",
                    "-k",
                    "PatientID=FUZZ*",
                    HOST,
                    p,
                ],
            ),
            (
                to_serve,
                "dcmtk-findscu-series",
                [
                    "findscu",
                    "-S",
                    *a,
                    "-k",
                    "QueryRetrieveLevel=SERIES",
                    "-k",
                    "StudyInstanceUID=*",
                    "-k",
                    "Modality=CT",
                    "-k",
                    "SeriesInstanceUID",
                    HOST,
                    p,
                ],
            ),
            (
                to_serve,
                "dcmtk-findscu-worklist",
                ["findscu", "-W", *a, "-k", "PatientName=*", HOST, p],
            ),
            (
                to_serve,
                "dcmtk-movescu",
                [
                    "movescu",
                    "-S",
                    *a,
                    "-aet",
                    "MOVESCU",
                    "-aem",
                    "MOVESCU",
                    "--port",
                    str(movescu_port),
                    "-od",
                    str(received),
                    *study,
                    HOST,
                    p,
                ],
            ),
            (
                to_serve,
                "dcmtk-getscu",
                ["getscu", "-S", *a, "-aet", "GETSCU", "-od", str(received), *study, HOST, p],
            ),
            (to_serve, "dicomnet-echo", [*env_cli, "echo", "--aec", "DICOMNET", HOST, p]),
            (
                to_storescp,
                "dicomnet-to-dcmtk-echo",
                [*env_cli, "echo", "--aec", "STORESCP", HOST, str(to_storescp.port)],
            ),
            (
                to_storescp,
                "dicomnet-to-dcmtk-store",
                [
                    *env_cli,
                    "store",
                    "--aec",
                    "STORESCP",
                    "--no-progress",
                    HOST,
                    str(to_storescp.port),
                    *map(str, files),
                ],
            ),
            (
                to_pyscp,
                "dicomnet-to-pynetdicom-echo",
                [*env_cli, "echo", "--aec", "PYSCP", HOST, str(to_pyscp.port)],
            ),
            (
                to_pyscp,
                "dicomnet-to-pynetdicom-rejected",
                [*env_cli, "echo", "--aec", "WRONG", HOST, str(to_pyscp.port)],
            ),
        ]
        for proxy, label, argv in sessions:
            print(f"capturing {label}", file=sys.stderr)
            proxy.label = label
            run(argv)
        print("capturing pynetdicom-extended", file=sys.stderr)
        to_serve.label = "pynetdicom-extended"
        pynetdicom_scu(to_serve.port, "DICOMNET")
        time.sleep(1.0)  # the last bytes through the proxies
        for proxy in (to_serve, to_storescp, to_pyscp, move_proxy):
            proxy.close()
            connections += proxy.connections
    return connections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "corpus")
    parser.add_argument("--raw", type=Path, help="also keep each connection's two streams here")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        sys.exit("DCMTK is not on PATH")
    with tempfile.TemporaryDirectory(prefix="dicomnet-capture-") as tmp:
        connections = capture(Path(tmp))
    corpus = Corpus(args.out)
    for index, conn in enumerate(connections):
        if args.raw:
            args.raw.mkdir(parents=True, exist_ok=True)
            stem = args.raw / f"{index:02d}-{conn.label}"
            stem.with_suffix(".c2s").write_bytes(bytes(conn.to_server))
            stem.with_suffix(".s2c").write_bytes(bytes(conn.to_client))
        cut(conn, corpus)
    dataset_seeds(corpus)
    print(f"{len(connections)} connections: {corpus.written}", file=sys.stderr)


if __name__ == "__main__":
    main()
