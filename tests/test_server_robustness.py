"""``dicomnet serve`` against misbehaving peers (issue 2, "Must show").

Raw sockets send garbage, truncated PDUs and PDUs claiming absurd lengths: each
time the server ends that connection (an A-ABORT, or an A-ASSOCIATE-RJ where an
association request was malformed, and/or a close) within a bounded time, and the
next association is served normally. A sender that disappears in the middle of a
100 MB data set leaves no file and no temp file behind (under --storage, in the
server's private TMPDIR, or as a large new file directly in the system temp
dir). SOP Instance UIDs that are not UIDs (``../../evil``, ``1.2/3``, ...) are
refused with a failure status and never become paths.
"""

from __future__ import annotations

import random
import shutil
import socket
import struct
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from corpus import Corpus
from peers import (
    DICOMNET_AET,
    EXPLICIT_LE,
    HOST,
    IMPLICIT_LE,
    PDU_ABORT,
    PDU_ASSOCIATE_RJ,
    REPO_ROOT,
    VERIFICATION,
    ConnectionEnd,
    DicomnetServer,
    RawAssociation,
    ServerFactory,
    all_files,
    build_associate_rq,
    c_store_command,
    dataset_bytes,
    describe_difference,
    pdu,
    process_rss_bytes,
    pynetdicom_ae,
    pynetdicom_chunked_send,
    pynetdicom_echo,
    read_part10,
    stray_files,
    wait_connection_end,
    wait_until,
)

from dicomnet.proto.ul import MAX_ASSOCIATION_PDU_LENGTH

SERVER_AET = DICOMNET_AET
END_TIMEOUT = 10.0  # seconds the server gets to end a connection after bad input


def assert_still_serving(server: DicomnetServer) -> None:
    assert server.alive(), f"dicomnet serve died (exit {server.process.returncode})"
    outcome = pynetdicom_echo(server.port, aec=SERVER_AET)
    assert outcome.established and outcome.status == 0x0000, outcome
    with RawAssociation(server.port) as raw:
        raw.associate(called=SERVER_AET)
        assert raw.echo() == 0x0000
        raw.release()


def assert_ended(end: ConnectionEnd, allowed_pdus: set[int], what: str) -> None:
    assert end.ended, (
        f"{what}: in {END_TIMEOUT} s the server neither closed the connection nor sent "
        f"A-ABORT (received {end.data[:64].hex(' ')!r})"
    )
    unexpected = [t for t in end.pdu_types() if t not in allowed_pdus]
    assert not unexpected, f"{what}: server answered with PDU types {end.pdu_types()}"


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# --------------------------------------------------------------------------
# garbage, truncation, oversize lengths

_rng = random.Random(20240501)
GARBAGE = {
    "unknown-pdu-type": (b"\xde\xad\xbe\xef" * 256, {PDU_ABORT}),
    "http-request": (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", {PDU_ABORT}),
    "random-bytes": (b"\xff" + _rng.randbytes(4095), {PDU_ABORT}),
    "malformed-associate-rq": (
        pdu(0x01, _rng.randbytes(300)),
        {PDU_ABORT, PDU_ASSOCIATE_RJ},
    ),
    "p-data-before-association": (
        pdu(0x04, struct.pack(">IBB", 6, 1, 3) + b"\x00" * 4),
        {PDU_ABORT},
    ),
    "release-rq-before-association": (pdu(0x05, b"\x00" * 4), {PDU_ABORT}),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_bytes(dicomnet_server: ServerFactory, case: str) -> None:
    data, allowed = GARBAGE[case]
    server = dicomnet_server()
    with _connect(server.port) as sock:
        sock.sendall(data)
        end = wait_connection_end(sock, END_TIMEOUT)
    assert_ended(end, allowed, case)
    assert_still_serving(server)


def _truncated_associate_rq(sock: socket.socket, port: int) -> None:
    rq = build_associate_rq(called=SERVER_AET)
    sock.sendall(rq[: len(rq) // 2])


def _truncated_header(sock: socket.socket, port: int) -> None:
    sock.sendall(b"\x01\x00\x00")


@pytest.mark.parametrize(
    "send_part", [_truncated_associate_rq, _truncated_header], ids=["associate-rq", "pdu-header"]
)
def test_truncated_pdu_then_close(
    dicomnet_server: ServerFactory, send_part: Callable[[socket.socket, int], None]
) -> None:
    server = dicomnet_server()
    with _connect(server.port) as sock:
        send_part(sock, server.port)
        sock.shutdown(socket.SHUT_WR)  # the peer is gone mid-PDU
        end = wait_connection_end(sock, END_TIMEOUT)
    assert_ended(end, {PDU_ABORT}, "truncated PDU then close")
    assert_still_serving(server)


def test_truncated_p_data_in_association_then_close(dicomnet_server: ServerFactory) -> None:
    server = dicomnet_server()
    raw = RawAssociation(server.port)
    try:
        raw.associate(called=SERVER_AET)
        message = raw.p_data(1, b"\x00" * 200, command=True, last=True)
        raw.send(message[:50])
        raw.sock.shutdown(socket.SHUT_WR)
        end = wait_connection_end(raw.sock, END_TIMEOUT)
    finally:
        raw.close()
    assert_ended(end, {PDU_ABORT}, "truncated P-DATA-TF then close")
    assert_still_serving(server)


def test_oversize_associate_rq_length(dicomnet_server: ServerFactory) -> None:
    """An A-ASSOCIATE-RQ header claiming 0xFFFFFFF0 bytes: refused at once, without
    waiting for (or allocating) the 4 GB; our side stays open to prove the server
    is the one ending it."""
    server = dicomnet_server()
    rss_before = process_rss_bytes(server.process.pid)
    rq = build_associate_rq(called=SERVER_AET)
    with _connect(server.port) as sock:
        sock.sendall(b"\x01\x00" + struct.pack(">I", 0xFFFFFFF0) + rq[6:])
        end = wait_connection_end(sock, END_TIMEOUT)
    assert_ended(end, {PDU_ABORT, PDU_ASSOCIATE_RJ}, "A-ASSOCIATE-RQ of length 0xFFFFFFF0")
    rss_after = process_rss_bytes(server.process.pid)
    if rss_before is not None and rss_after is not None:
        growth = rss_after - rss_before
        assert growth < 256 * 1024 * 1024, f"server RSS grew by {growth:,} bytes"
    assert_still_serving(server)


def test_many_association_headers_hold_little_memory(dicomnet_server: ServerFactory) -> None:
    """1,000 connections each send only an A-ASSOCIATE-RQ header announcing the largest
    association PDU the server takes, and wait: the server holds what they sent (a few
    bytes each), not what they announced (it used to allocate it: 1 GiB here)."""
    server = dicomnet_server()
    rss_before = process_rss_bytes(server.process.pid)
    header = b"\x01\x00" + struct.pack(">I", MAX_ASSOCIATION_PDU_LENGTH)
    socks: list[socket.socket] = []
    try:
        for _ in range(1000):
            sock = _connect(server.port)
            sock.sendall(header + b"\x00\x01")
            socks.append(sock)
        time.sleep(1.0)  # let the server read them all
        rss_held = process_rss_bytes(server.process.pid)
        assert_still_serving(server)
    finally:
        for sock in socks:
            sock.close()
    assert rss_before is not None and rss_held is not None
    growth = rss_held - rss_before
    print(f"RSS {rss_before / 2**20:.1f} MiB -> {rss_held / 2**20:.1f} MiB with 1,000 headers")
    assert growth < 64 << 20, f"server RSS grew by {growth:,} bytes for 1,000 headers"


@pytest.mark.parametrize("length", [0xFFFFFFF0, 0x7FFFFFFF], ids=["0xFFFFFFF0", "0x7FFFFFFF"])
def test_oversize_p_data_length_in_association(dicomnet_server: ServerFactory, length: int) -> None:
    """Inside an established association, a P-DATA-TF claiming a length far over
    the maximum PDU length the server announced: A-ABORT and/or close."""
    server = dicomnet_server()
    raw = RawAssociation(server.port)
    try:
        raw.associate(called=SERVER_AET)
        assert raw.peer_max_pdu == 0 or raw.peer_max_pdu < length
        raw.send(struct.pack(">BBI", 0x04, 0, length) + struct.pack(">IBB", length - 4, 1, 3))
        end = wait_connection_end(raw.sock, END_TIMEOUT)
    finally:
        raw.close()
    assert_ended(end, {PDU_ABORT}, f"P-DATA-TF of length {length:#x}")
    assert_still_serving(server)


# --------------------------------------------------------------------------
# a sender that disappears mid-data set


def _big_new_temp_entries(since: float) -> list[Path]:
    """Large (>= 1 MB) files created after ``since`` directly in the system temp dir."""
    out = []
    for entry in Path(tempfile.gettempdir()).iterdir():
        try:
            st = entry.stat()
        except OSError:
            continue
        if entry.is_file() and st.st_mtime >= since and st.st_size >= 1 << 20:
            out.append(entry)
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["close", "reset"])
def test_sender_disconnects_mid_dataset(
    corpus: Corpus, dicomnet_server: ServerFactory, how: str
) -> None:
    large = corpus.large
    assert large is not None
    data = dataset_bytes(large.path)
    server = dicomnet_server()
    started = time.time() - 1
    before_storage = server.files()
    before_tmp = all_files(server.tmpdir)

    raw = RawAssociation(server.port, timeout=30)
    try:
        raw.associate([(1, large.sop_class_uid, [EXPLICIT_LE])], called=SERVER_AET, max_pdu=65536)
        assert raw.accepted.get(1) == EXPLICIT_LE, (raw.accepted, raw.rejected)
        raw.send_message(1, c_store_command(large.sop_class_uid, large.sop_instance_uid))
        cut = int(len(data) * 0.6)  # 60 MB of 100: past any in-memory spool threshold
        size = max(raw.peer_max_pdu or 16384, 4096) - 6
        batch: list[bytes] = []
        for start in range(0, cut, size):
            batch.append(raw.p_data(1, data[start : min(start + size, cut)], command=False,
                                    last=False))  # fmt: skip
            if len(batch) == 64:
                raw.send(b"".join(batch))
                batch.clear()
        if batch:
            raw.send(b"".join(batch))
        time.sleep(0.5)  # let the server spool what it was sent
        spooled = stray_files(server.storage, keep=before_storage) + sorted(
            all_files(server.tmpdir) - before_tmp
        )
        print(f"while receiving, the server had these temp files: {spooled}")
    finally:
        if how == "reset":
            raw.reset()
        else:
            raw.close()

    def clean() -> bool:
        return not stray_files(server.storage, keep=before_storage) and not (
            all_files(server.tmpdir) - before_tmp
        )

    assert wait_until(clean, timeout=15), (
        f"left behind after the sender vanished: storage "
        f"{stray_files(server.storage, keep=before_storage)}, server TMPDIR "
        f"{sorted(all_files(server.tmpdir) - before_tmp)}"
    )
    assert not list(server.storage.rglob("*.dcm"))
    assert not _big_new_temp_entries(started), _big_new_temp_entries(started)
    assert_still_serving(server)

    # A subsequent store of the very same instance works and is complete.
    ae = pynetdicom_ae("AFTERABORT")
    ae.add_requested_context(large.sop_class_uid, [EXPLICIT_LE])
    with pynetdicom_chunked_send():
        assoc = ae.associate(HOST, server.port, ae_title=SERVER_AET)
        assert assoc.is_established
        try:
            rsp = assoc.send_c_store(large.path)
            assert "Status" in rsp and rsp.Status == 0x0000, rsp
            assoc.release()
        finally:
            if assoc.is_established:
                assoc.abort()
    stored = server.wait_stored([large.sop_instance_uid])
    assert large.sop_instance_uid in stored, sorted(server.files())
    meta, got = read_part10(stored[large.sop_instance_uid])
    assert meta.TransferSyntaxUID == EXPLICIT_LE
    assert describe_difference(data, got) is None, describe_difference(data, got)
    assert not stray_files(server.storage, keep=stored.values())
    assert not (all_files(server.tmpdir) - before_tmp)


# --------------------------------------------------------------------------
# SOP Instance UIDs that are not UIDs

BAD_UIDS = ["../../evil-{tag}", "1.2/3", "..", "{tmp}/evil-{tag}", "1.2.840.ABC.{tag}"]


def _is_failure(status: int) -> bool:
    from pynetdicom.status import code_to_category

    return code_to_category(status) == "Failure"


@pytest.mark.parametrize("template", BAD_UIDS)
def test_invalid_sop_instance_uid_refused(
    corpus: Corpus, dicomnet_server: ServerFactory, tmp_path: Path, template: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    bad = template.format(tag=tag, tmp=tempfile.gettempdir())
    assert len(bad) <= 64
    server = dicomnet_server()
    source = corpus.by_source("CT_small.dcm")
    ds = pydicom.dcmread(source.path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UI value
        ds.SOPInstanceUID = pydicom.uid.UID(bad)
        ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(bad)
    good = pydicom.dcmread(source.path)
    good.SOPInstanceUID = pydicom.uid.generate_uid()
    good.file_meta.MediaStorageSOPInstanceUID = good.SOPInstanceUID

    ae = pynetdicom_ae("EVILSCU")
    ae.add_requested_context(ds.SOPClassUID, [EXPLICIT_LE, IMPLICIT_LE])
    ae.add_requested_context(VERIFICATION)

    def escaped_files() -> list[Path]:
        found = []
        for base in (server.storage, server.storage.parent, tmp_path, REPO_ROOT, Path("/")):
            for candidate in (base / bad, base / f"{bad}.dcm"):
                if candidate.is_file():
                    found.append(candidate.resolve())
        found += [p for p in all_files(tmp_path) if tag in p.name or p.name == "3.dcm"]
        return sorted(set(found))

    status: int | None = None
    good_status: int | None = None
    assoc = ae.associate(HOST, server.port, ae_title=SERVER_AET)
    try:
        assert assoc.is_established
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the invalid UI value
            rsp = assoc.send_c_store(ds)
        status = int(rsp.Status) if "Status" in rsp else None
        if assoc.is_established:
            # The association goes on: a valid instance is stored after the refusal.
            good_status = int(assoc.send_c_store(good).get("Status", -1))
            assoc.release()
    finally:
        if assoc.is_established:
            assoc.abort()
        leaked = escaped_files()
        for p in leaked:  # never leave an escaped file behind, even on failure
            p.unlink(missing_ok=True)

    assert not leaked, f"{bad!r} became a path: {leaked}"
    assert status is not None, f"no C-STORE response for {bad!r} (association aborted?)"
    assert _is_failure(status), f"status {status:#06x} for {bad!r}"
    assert good_status == 0x0000, f"the next, valid store on the association: {good_status}"
    stored = server.wait_stored([str(good.SOPInstanceUID)])
    assert set(stored) == {str(good.SOPInstanceUID)}, sorted(server.files())
    assert not stray_files(server.storage, keep=stored.values())
    assert_still_serving(server)


# --------------------------------------------------------------------------
# out of file descriptors


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_out_of_file_descriptors(
    dicomnet_server: ServerFactory, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """With 64 descriptors, 120 connections held open: the server closes those past what
    its limit allows, says so in a line or two (asyncio's accept loop used to log a
    traceback per attempt: hundreds of thousands), and serves again once they end."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) is not installed")
    monkeypatch.setenv(
        "DICOMNET_TEST_CLI", f"{prlimit} --nofile=64:64 {sys.executable} -m dicomnet"
    )
    monkeypatch.setenv("DICOMNET_LOOP", loop)
    server = dicomnet_server(verbose=False)
    socks: list[socket.socket] = []
    try:
        for _ in range(120):
            socks.append(_connect(server.port))
        wait_until(lambda: "connections open" in server.log_text(), 10)
        assert server.alive()
    finally:
        for sock in socks:
            sock.close()
    assert wait_until(lambda: "accepting new ones again" in server.log_text(), 10)
    assert_still_serving(server)
    log = server.log_text()
    assert "Traceback" not in log
    assert 1 <= len(log.splitlines()) <= 6, log
