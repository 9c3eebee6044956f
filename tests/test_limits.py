"""Limits that hold under abuse: data sets nested too deep or inflating too far, decoded
by the SCP from a peer's request, are refused with a failure status; the association
and the server go on."""

from __future__ import annotations

import socket
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from peers import (
    CT_IMAGE_STORAGE,
    IMPLICIT_LE,
    RawAssociation,
    c_store_command,
    encode_command,
    recv_pdu,
)
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

import dicomnet
from dicomnet.pacs.scp import StorageSCP
from dicomnet.proto.walk import MAX_DEPTH, MalformedDataset
from dicomnet.services import qr
from dicomnet.storage import MAX_INFLATED, decode_dataset, encode_dataset

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def nested_identifier(depth: int, transfer_syntax: str = ImplicitVRLittleEndian) -> bytes:
    """A STUDY-level identifier (little endian) whose Referenced Study Sequence holds
    itself `depth` deep, in undefined-length sequences and items."""
    if transfer_syntax == ImplicitVRLittleEndian:
        level = struct.pack("<HHI", 0x0008, 0x0052, 6) + b"STUDY "
        opening = struct.pack("<HHI", 0x0008, 0x1110, 0xFFFFFFFF)
    else:
        level = struct.pack("<HH2sH", 0x0008, 0x0052, b"CS", 6) + b"STUDY "
        opening = struct.pack("<HH2sHI", 0x0008, 0x1110, b"SQ", 0, 0xFFFFFFFF)
    opening += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return level + opening * depth + closing * depth


def test_nesting_past_the_limit_is_a_malformed_data_set() -> None:
    for syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        dataset = decode_dataset(nested_identifier(MAX_DEPTH, syntax), syntax)
        assert dataset.QueryRetrieveLevel == "STUDY"
        for depth in (MAX_DEPTH + 1, 1_000, 100_000):
            with pytest.raises(MalformedDataset, match=f"nested more than {MAX_DEPTH} deep"):
                decode_dataset(nested_identifier(depth, syntax), syntax)


def test_a_deflated_data_set_inflates_only_so_far() -> None:
    element = struct.pack("<HH2sHI", 0x0009, 0x1000, b"UN", 0, MAX_INFLATED)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = compressor.compress(element + bytes(MAX_INFLATED)) + compressor.flush()
    assert len(bomb) < 1 << 20  # a few hundred KiB announcing 64 MiB and more
    with pytest.raises(MalformedDataset, match="deflated data set larger than"):
        decode_dataset(bomb, DeflatedExplicitVRLittleEndian)


async def test_a_deeply_nested_query_gets_a_failure_and_the_association_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C-FIND whose identifier nests 1,000 sequences deep (pydicom alone would end in a
    RecursionError) is answered 0xA900 with an Error Comment; the next query works."""
    encode = qr.encode_dataset

    def encode_or_nest(dataset: Dataset, transfer_syntax: str) -> bytes:
        if dataset.get("PatientID") == "NESTED":
            return nested_identifier(1_000, transfer_syntax)
        return encode(dataset, transfer_syntax)

    monkeypatch.setattr(qr, "encode_dataset", encode_or_nest)
    scp = StorageSCP(tmp_path / "storage", fsync=False)
    query = Dataset()
    query.PatientID = "NESTED"
    query.StudyInstanceUID = ""
    try:
        async with scp.serve("127.0.0.1", 0) as server:
            with anyio.fail_after(20):
                async with dicomnet.connect("127.0.0.1", server.port, aec="DICOMNET") as assoc:
                    responses: Any = assoc.find(query, model="study", level="STUDY")
                    with pytest.raises(dicomnet.DimseError) as caught:
                        async for _ in responses:
                            pass
                    assert caught.value.status == 0xA900
                    assert f"nested more than {MAX_DEPTH} deep" in (
                        caught.value.error_comment or ""
                    )
                    query.PatientID = "ANYONE"
                    assert [
                        match async for match in assoc.find(query, model="study", level="STUDY")
                    ] == []
                    assert await assoc.echo() == 0
    finally:
        scp.close()


# -- limits on an association's time and size ------------------------------------------

HOST = "127.0.0.1"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def big_match(index: int) -> Dataset:
    match = Dataset()
    match.QueryRetrieveLevel = "STUDY"
    match.StudyInstanceUID = f"1.2.3.{index}"
    match.add_new(0x00091010, "OB", bytes(64 << 10))
    return match


async def wait_for(predicate: Any, timeout: float) -> float:
    """Poll (bounded) until `predicate()`; how long it took."""
    start = time.monotonic()
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.05)
    return time.monotonic() - start


async def test_a_peer_that_stops_reading_is_aborted_at_the_write_timeout() -> None:
    """Answers pile up unread (a C-FIND of 500 matches of 64 KiB each): after
    `write_timeout` the association is aborted, its handler ends, and the server serves
    the next one (before, a send waited for ever and so did the idle abort)."""
    ae = dicomnet.AE("SCP", write_timeout=1.0)
    ended = anyio.Event()

    @ae.on_find
    async def find(request: Any) -> Any:
        try:
            for index in range(500):
                yield big_match(index)
        finally:
            ended.set()

    async with ae.serve(HOST, 0) as server:
        identifier = encode_dataset(Dataset(), ImplicitVRLittleEndian)
        command = encode_command({
            "AffectedSOPClassUID": STUDY_FIND, "CommandField": 0x0020, "MessageID": 1,
            "Priority": 0, "CommandDataSetType": 0x0000,
        })  # fmt: skip

        def associate_and_ask() -> RawAssociation:
            raw = RawAssociation(server.port)
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw.associate(((1, STUDY_FIND, (IMPLICIT_LE,)),), called="SCP")
            raw.send_message(1, command, identifier)
            return raw

        raw = await anyio.to_thread.run_sync(associate_and_ask)
        try:
            await wait_for(lambda: len(server.associations) == 1, 5)
            took = await wait_for(lambda: not server.associations, 15)
            assert ended.is_set()
            assert took >= 0.5
            async with dicomnet.connect(HOST, server.port, aec="SCP") as assoc:
                assert await assoc.echo() == 0
        finally:
            raw.close()


async def trickled_store(port: int, dataset: bytes, pause: float, chunk: int) -> float:
    """A C-STORE whose data set arrives `chunk` bytes every `pause` seconds, from a
    thread; the seconds until the server ended the connection (or the store ended)."""

    def send() -> float:
        start = time.monotonic()
        raw = RawAssociation(port)
        try:
            raw.associate(((1, CT_IMAGE_STORAGE, (IMPLICIT_LE,)),), called="SCP", max_pdu=0)
            command = c_store_command(CT_IMAGE_STORAGE, "1.2.3.4")
            raw.send(raw.p_data(1, command, command=True, last=True))
            for offset in range(0, len(dataset), chunk):
                part = dataset[offset : offset + chunk]
                raw.send(raw.p_data(1, part, command=False, last=offset + chunk >= len(dataset)))
                time.sleep(pause)
            recv_pdu(raw.sock, 10.0)
        except OSError:
            pass  # the server closed the connection
        finally:
            raw.close()
        return time.monotonic() - start

    return await anyio.to_thread.run_sync(send)


def storing_ae(**limits: Any) -> tuple[dicomnet.AE, list[object]]:
    """An AE "SCP" with these limits, and the C-STORE requests its handler answered."""
    ae = dicomnet.AE("SCP", **limits)
    stored: list[object] = []

    @ae.on_store
    async def store(request: Any) -> int:
        stored.append(request)
        return 0

    return ae, stored


async def test_a_trickled_data_set_is_cut_at_the_minimum_rate() -> None:
    """500 bytes a second against a minimum of 1,000 after a 0.5 s grace: aborted within
    about a second, not after the 40 s the data set would take; the server goes on."""
    ae, stored = storing_ae(message_timeout=0.5, min_receive_rate=1000)

    async with ae.serve(HOST, 0) as server:
        with anyio.fail_after(20):
            took = await trickled_store(server.port, bytes(20_000), 0.2, 100)
            assert took < 5
            assert stored == []
            async with dicomnet.connect(HOST, server.port, aec="SCP") as assoc:
                assert await assoc.echo() == 0


async def test_a_data_set_past_the_size_limit_ends_the_association() -> None:
    ae, stored = storing_ae(max_dataset_size=10_000)

    async with ae.serve(HOST, 0) as server:
        with anyio.fail_after(20):
            await trickled_store(server.port, bytes(30_000), 0.0, 4_000)
            await wait_for(lambda: not server.associations, 5)
            assert stored == []
            await trickled_store(server.port, bytes(8_000), 0.0, 4_000)
            assert len(stored) == 1


async def test_associations_per_calling_ae_title_are_limited() -> None:
    ae = dicomnet.AE("SCP", max_associations_per_ae=1)
    async with ae.serve(HOST, 0) as server:
        with anyio.fail_after(20):
            async with dicomnet.connect(HOST, server.port, aet="A", aec="SCP") as first:
                with pytest.raises(dicomnet.AssociationRejected) as caught:
                    async with dicomnet.connect(HOST, server.port, aet="A", aec="SCP"):
                        pass
                assert (caught.value.result, caught.value.source, caught.value.reason) == (2, 3, 2)
                async with dicomnet.connect(HOST, server.port, aet="B", aec="SCP") as other:
                    assert await other.echo() == 0
                assert await first.echo() == 0
            async with dicomnet.connect(HOST, server.port, aet="A", aec="SCP") as again:
                assert await again.echo() == 0
