"""The async shell against itself on loopback: echo, store, negotiation, errors, timeouts."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

import dicomnet
from dicomnet.proto.contexts import VERIFICATION, PresentationContext
from dicomnet.proto.dimse import CFindRQ, encode_message
from dicomnet.proto.pdu import (
    AAbort,
    AReleaseRQ,
    PDataTF,
    PresentationContextRQ,
    decode_pdu,
    decode_pdu_bytes,
)
from dicomnet.testing import build_associate_rq

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
CT_FILE = get_testdata_file("CT_small.dcm")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def dataset_bytes(path: str | Path) -> bytes:
    """The bytes of a Part-10 file after its file meta."""
    from dicomnet.storage import Part10File

    info = Part10File.open(path)
    return Path(path).read_bytes()[info.offset :]


def storing_ae(folder: Path, **kwargs: object) -> tuple[dicomnet.AE, list[dicomnet.StoreRequest]]:
    ae = dicomnet.AE("PACS", **kwargs)  # type: ignore[arg-type]
    seen: list[dicomnet.StoreRequest] = []

    @ae.on_store
    async def store(request: dicomnet.StoreRequest) -> int:
        seen.append(request)
        request.dataset  # noqa: B018 - decoded while the handler runs, cached after
        await request.save(folder / f"{request.sop_instance_uid}.dcm")
        return 0

    return ae, seen


async def test_echo_and_store_path_is_bit_preserving(tmp_path: Path) -> None:
    ae, seen = storing_ae(tmp_path)
    progress: list[tuple[int, int]] = []
    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port, aec="PACS") as assoc:
            assert await assoc.echo() == 0
            status = await assoc.store(CT_FILE, progress=lambda a, b: progress.append((a, b)))
            assert isinstance(status, dicomnet.Status) and status.is_success
    stored = tmp_path / f"{dcmread(CT_FILE).SOPInstanceUID}.dcm"
    assert dataset_bytes(stored) == dataset_bytes(CT_FILE)
    assert progress and progress[-1][0] == progress[-1][1] == len(dataset_bytes(CT_FILE))
    assert seen[0].calling_ae_title == "DICOMNET"
    assert str(seen[0].dataset.PatientName) == str(dcmread(CT_FILE).PatientName)
    meta = dcmread(stored).file_meta
    assert meta.MediaStorageSOPInstanceUID == seen[0].sop_instance_uid
    assert meta.SourceApplicationEntityTitle == "DICOMNET"


@pytest.mark.parametrize("cached", [True, False], ids=["from-page-cache", "worker-thread"])
async def test_a_large_file_is_streamed_bit_preserving_either_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: bool
) -> None:
    """Blocks of a large file are read on the event loop when the page cache holds them,
    else in a worker thread (forced here): the same bytes arrive either way."""
    from dicomnet.storage import DatasetReader

    big = dcmread(CT_FILE)
    big.Rows = big.Columns = 400
    big.PixelData = bytes(range(256)) * (400 * 400 * 2 // 256)
    source = tmp_path / "big.dcm"
    big.save_as(source)
    if not cached:
        monkeypatch.setattr(DatasetReader, "fill_cached", lambda self, slots: slots)
    received = tmp_path / "received"
    ae, _seen = storing_ae(received)
    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port, aec="PACS") as assoc:
            assert await assoc.store(source) == 0
    assert dataset_bytes(received / f"{big.SOPInstanceUID}.dcm") == dataset_bytes(source)


async def test_store_dataset_in_accepted_transfer_syntax(tmp_path: Path) -> None:
    ae, seen = storing_ae(tmp_path)
    ds = dcmread(CT_FILE)
    async with ae.serve("127.0.0.1", 0) as server:
        contexts = [PresentationContext(CT_STORAGE, (ImplicitVRLittleEndian,))]
        async with dicomnet.connect("127.0.0.1", server.port, contexts=contexts) as assoc:
            assert await assoc.store(ds) == 0
    assert seen[0].transfer_syntax == ImplicitVRLittleEndian
    stored = dcmread(tmp_path / f"{ds.SOPInstanceUID}.dcm")
    assert stored.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert stored.PixelData == ds.PixelData


async def test_store_not_negotiated_names_the_syntax(tmp_path: Path) -> None:
    ae, _ = storing_ae(tmp_path)
    jpeg = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    async with ae.serve("127.0.0.1", 0) as server:
        contexts = [PresentationContext(VERIFICATION)]
        async with dicomnet.connect("127.0.0.1", server.port, contexts=contexts) as assoc:
            with pytest.raises(dicomnet.NotNegotiatedError, match="Secondary Capture"):
                await assoc.store(jpeg)
        # Pixel data no decoder exists for: the reason names the syntax.
        mpeg2 = dcmread(get_testdata_file("CT_small.dcm"))
        mpeg2.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
        contexts = [PresentationContext(CT_STORAGE, (ExplicitVRLittleEndian,))]
        async with dicomnet.connect("127.0.0.1", server.port, contexts=contexts) as assoc:
            with pytest.raises(dicomnet.ConversionError, match="MPEG2 Main Profile / Main Level"):
                await assoc.store(mpeg2)


async def test_store_converts_to_an_accepted_syntax(tmp_path: Path) -> None:
    ae, _ = storing_ae(tmp_path)
    jpeg = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    sc = "1.2.840.10008.5.1.4.1.1.7"
    async with ae.serve("127.0.0.1", 0) as server:
        contexts = [PresentationContext(sc, (ExplicitVRLittleEndian,))]
        async with dicomnet.connect("127.0.0.1", server.port, contexts=contexts) as assoc:
            assert await assoc.store(jpeg) == 0
    original = dcmread(jpeg)
    stored = dcmread(tmp_path / f"{original.SOPInstanceUID}.dcm")
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert stored.SOPInstanceUID == original.SOPInstanceUID
    assert stored.PhotometricInterpretation == "RGB"  # decoded from YBR_FULL_422
    assert stored.pixel_array.shape == original.pixel_array.shape


async def test_handler_error_gives_failure_status_and_server_goes_on(tmp_path: Path) -> None:
    ae = dicomnet.AE("PACS")
    calls = 0

    @ae.on_store
    async def store(request: dicomnet.StoreRequest) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("disk on fire")
        return 0xB000

    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port) as assoc:
            with pytest.raises(dicomnet.DimseError) as info:
                await assoc.store(CT_FILE)
            assert info.value.status.is_failure and 0xC000 <= info.value.status <= 0xCFFF
            assert "disk on fire" in (info.value.error_comment or "")
            warning = await assoc.store(CT_FILE)
            assert warning.is_warning and warning == 0xB000
            assert await assoc.echo() == 0
    assert calls == 2


async def test_invalid_sop_instance_uid_is_refused_without_a_file(tmp_path: Path) -> None:
    ae, seen = storing_ae(tmp_path)
    ds = dcmread(CT_FILE)
    ds.SOPInstanceUID = "../../evil"
    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port) as assoc:
            with pytest.raises(dicomnet.DimseError) as info:
                await assoc.store(ds)
            assert info.value.status.is_failure
    assert seen == []
    assert list(tmp_path.rglob("*")) == []


async def test_on_association_reject_and_allowlist() -> None:
    ae = dicomnet.AE("PACS", allowed_calling_ae_titles=["GOOD"])

    @ae.on_association
    async def admit(request: dicomnet.AssociationRequest) -> None:
        assert request.peer_host == "127.0.0.1"
        if request.called_ae_title != "PACS":
            raise dicomnet.Reject(1, 1, 7)

    async with ae.serve("127.0.0.1", 0) as server:
        with pytest.raises(dicomnet.AssociationRejected) as info:
            async with dicomnet.connect("127.0.0.1", server.port, aet="BAD", aec="PACS"):
                pass
        assert (info.value.result, info.value.source, info.value.reason) == (1, 1, 3)
        assert "calling-AE-title-not-recognized" in str(info.value)
        with pytest.raises(dicomnet.AssociationRejected) as info:
            async with dicomnet.connect("127.0.0.1", server.port, aet="GOOD", aec="OTHER"):
                pass
        assert (info.value.result, info.value.source, info.value.reason) == (1, 1, 7)
        async with dicomnet.connect("127.0.0.1", server.port, aet="GOOD", aec="PACS") as assoc:
            assert await assoc.echo() == 0


async def test_max_associations_refuses_transiently_while_first_goes_on() -> None:
    ae = dicomnet.AE("PACS", max_associations=1)
    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port) as first:
            with pytest.raises(dicomnet.AssociationRejected) as info:
                async with dicomnet.connect("127.0.0.1", server.port):
                    pass
            assert (info.value.result, info.value.source, info.value.reason) == (2, 3, 2)
            assert await first.echo() == 0
        async with dicomnet.connect("127.0.0.1", server.port) as again:
            assert await again.echo() == 0


async def test_exception_in_block_aborts_and_server_sees_abort() -> None:
    ae = dicomnet.AE("PACS")
    async with ae.serve("127.0.0.1", 0) as server:
        with pytest.raises(KeyError):
            async with dicomnet.connect("127.0.0.1", server.port) as assoc:
                await assoc.echo()
                raise KeyError("boom")
        assert assoc.is_closed
        with anyio.fail_after(5):
            while server.associations:
                await anyio.sleep(0.01)
        async with dicomnet.connect("127.0.0.1", server.port) as assoc2:
            assert await assoc2.echo() == 0


async def test_server_abort_is_seen_by_client() -> None:
    ae = dicomnet.AE("PACS")
    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port) as assoc:
            assert await assoc.echo() == 0
            for association in list(server.associations):
                await association.abort()
            await assoc.wait_closed()
            with pytest.raises(dicomnet.AssociationAborted):
                await assoc.echo()


async def test_connect_refused_and_connect_timeout() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(dicomnet.ConnectionFailed):
        async with dicomnet.connect("127.0.0.1", port):
            pass


async def _silent_listener(task_status: anyio.abc.TaskStatus[int]) -> None:
    """Accepts connections and never says anything."""
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))

        async def hold(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                await anyio.sleep(30)

        await listener.serve(hold)


async def test_artim_timeout_when_peer_never_answers_the_request() -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(_silent_listener)
        with anyio.fail_after(5):
            with pytest.raises(dicomnet.ARTIMTimeout):
                async with dicomnet.connect("127.0.0.1", port, artim_timeout=0.3):
                    pass
        tg.cancel_scope.cancel()


async def test_dimse_timeout_aborts_when_no_response() -> None:
    ae = dicomnet.AE("PACS")
    release = anyio.Event()

    @ae.on_echo
    async def slow(request: dicomnet.EchoRequest) -> int:
        await release.wait()
        return 0

    async with ae.serve("127.0.0.1", 0) as server:
        with anyio.fail_after(5):
            async with dicomnet.connect("127.0.0.1", server.port, dimse_timeout=0.3) as assoc:
                with pytest.raises(dicomnet.DimseTimeout):
                    await assoc.echo()
                await assoc.wait_closed()
        release.set()


async def test_server_idle_timeout_closes_silent_association() -> None:
    ae = dicomnet.AE("PACS", idle_timeout=0.3)
    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port) as assoc:
            assert await assoc.echo() == 0
            with anyio.fail_after(5):
                await assoc.wait_closed()
        assert not server.associations


async def test_server_artim_closes_connection_that_never_asks() -> None:
    ae = dicomnet.AE("PACS", artim_timeout=0.3)
    async with ae.serve("127.0.0.1", 0) as server:
        stream = await anyio.connect_tcp("127.0.0.1", server.port)
        async with stream:
            with anyio.fail_after(5):
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await stream.receive()


async def test_garbage_gets_abort_and_server_keeps_serving() -> None:
    ae = dicomnet.AE("PACS")
    async with ae.serve("127.0.0.1", 0) as server:
        stream = await anyio.connect_tcp("127.0.0.1", server.port)
        async with stream:
            await stream.send(b"\x09\x00" + struct.pack(">I", 4) + b"junk")
            data = b""
            with anyio.fail_after(5):
                try:
                    while len(data) < 10:
                        data += await stream.receive()
                except anyio.EndOfStream:
                    pass
            pdu = decode_pdu_bytes(data[:10])
            assert isinstance(pdu, AAbort)
        async with dicomnet.connect("127.0.0.1", server.port) as assoc:
            assert await assoc.echo() == 0


async def test_release_by_server_side_request_is_answered() -> None:
    """A release request reaching an association is answered once handlers are done."""
    ae = dicomnet.AE("PACS")
    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port) as assoc:
            assert await assoc.echo() == 0
        assert assoc.is_closed
        # The server saw a clean release: no association is left.
        with anyio.fail_after(5):
            while server.associations:
                await anyio.sleep(0.01)
    assert AReleaseRQ().encode() == b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"


async def test_a_release_request_is_answered_after_the_response_in_flight() -> None:
    """A-RELEASE-RQ right behind a C-FIND-RQ (one write): the A-RELEASE-RP waits until
    the C-FIND's handler is done and its responses are sent (PS3.8 §7.2: no data after
    the release response)."""
    study_find = "1.2.840.10008.5.1.4.1.2.2.1"
    ae = dicomnet.AE("PACS")

    @ae.on_find
    async def find(request: dicomnet.FindRequest) -> AsyncIterator[Dataset]:
        await anyio.sleep(0.3)  # still at work when the release request arrives
        match = Dataset()
        match.QueryRetrieveLevel = "STUDY"
        match.StudyInstanceUID = "1.2.3"
        yield match

    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, identifier)
    rq = build_associate_rq(
        contexts=[PresentationContextRQ(1, study_find, (str(ImplicitVRLittleEndian),))]
    )
    async with ae.serve("127.0.0.1", 0) as server:
        stream = await anyio.connect_tcp("127.0.0.1", server.port)
        async with stream:
            await stream.send(rq.encode())
            received = b""
            pdus: list[object] = []
            with anyio.fail_after(10):
                while True:
                    while len(received) >= 6:
                        length = struct.unpack(">I", received[2:6])[0]
                        if len(received) < 6 + length:
                            break
                        pdus.append(decode_pdu(received[0], received[6 : 6 + length]))
                        received = received[6 + length :]
                        if len(pdus) == 1:  # accepted: ask, then at once ask to release
                            find_rq = encode_message(
                                1, CFindRQ(1, study_find), buffer.getvalue(), 0
                            )
                            await stream.send(find_rq + AReleaseRQ().encode())
                    if pdus and type(pdus[-1]).__name__ == "AReleaseRP":
                        break
                    received += await stream.receive()
    kinds = [type(pdu).__name__ for pdu in pdus]
    assert kinds[0] == "AAssociateAC"
    assert kinds[-1] == "AReleaseRP"
    data = [pdu for pdu in pdus if isinstance(pdu, PDataTF)]
    assert len(data) >= 2  # the pending response with its match, then the final one
    assert kinds.index("AReleaseRP") > max(i for i, k in enumerate(kinds) if k == "PDataTF")
