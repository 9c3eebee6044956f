"""Limits that hold under abuse: data sets nested too deep or inflating too far, decoded
by the SCP from a peer's request, are refused with a failure status; the association
and the server go on."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import anyio
import pytest
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
from dicomnet.storage import MAX_INFLATED, decode_dataset

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
