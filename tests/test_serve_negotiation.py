"""`dicomnet serve` answers SOP Class Extended Negotiation (PS3.4 §C.5.1.1.2): relational
queries and combined date-time matching when the SCU asks for them, and only then."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from peers import DicomnetServer, describe_cli, run_dicomnet
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

import dicomnet
from dicomnet.proto.contexts import STUDY_ROOT_FIND, PresentationContext
from dicomnet.proto.pdu import SOPClassExtendedNegotiation

pytestmark = pytest.mark.timeout(120)

FILES = [Path(get_testdata_file(name)) for name in ("CT_small.dcm", "MR_small.dcm")]


async def series_of(port: int, name: str, relational: bool) -> tuple[list[str], bytes | None]:
    query = Dataset()
    query.PatientName = name
    query.SeriesInstanceUID = ""
    asked = [SOPClassExtendedNegotiation(STUDY_ROOT_FIND, b"\x01")] if relational else []
    async with dicomnet.connect(
        "127.0.0.1",
        port,
        aec="PACS",
        contexts=[PresentationContext(STUDY_ROOT_FIND)],
        sop_class_extended=asked,
    ) as assoc:
        agreed = assoc.extended.sop_class_extended.accepted.get(STUDY_ROOT_FIND)
        found = [str(ds.SeriesInstanceUID) async for ds in assoc.find(query, level="SERIES")]
    return found, agreed


def test_a_relational_query_only_when_negotiated(
    dicomnet_server: Callable[..., DicomnetServer],
) -> None:
    server = dicomnet_server(aet="PACS")
    stored = run_dicomnet(["store", "127.0.0.1", server.port, "--aec", "PACS", *FILES])
    assert stored.returncode == 0, describe_cli(stored)
    ct = dcmread(FILES[0])
    found, agreed = anyio.run(series_of, server.port, str(ct.PatientName), True)
    assert agreed == b"\x01" and found == [ct.SeriesInstanceUID]
    with pytest.raises(dicomnet.DimseError) as refused:  # baseline: unique keys above
        anyio.run(series_of, server.port, str(ct.PatientName), False)
    assert refused.value.status == 0xA900


@pytest.mark.dcmtk
def test_max_pdu_is_what_the_peer_is_told_and_sends(
    dicomnet_server: Callable[..., DicomnetServer], tmp_path: Path
) -> None:
    """`serve --max-pdu 16384` (storescp's option, DCMTK's default size): the A-ASSOCIATE-AC
    says so, and storescu's P-DATA-TF PDUs are cut to it, the data set arriving intact."""
    from peers import dataset_bytes, storescu

    server = dicomnet_server(extra_args=["--max-pdu", "16384"])
    files = []
    for path in FILES:  # without the Data Set Trailing Padding storescu leaves out
        ds = dcmread(path)
        del ds[0xFFFCFFFC]
        files.append(tmp_path / path.name)
        ds.save_as(files[-1], enforce_file_format=True)

    async def told() -> int:
        async with dicomnet.connect("127.0.0.1", server.port, aec="PACS") as assoc:
            return assoc.peer_max_pdu_length

    assert anyio.run(told) == 16384
    result = storescu(server.port, files, extra_args=["-d"])
    assert result.returncode == 0, result
    assert "Max Send PDV: 16372" in result.output  # 16384 less the PDV item header
    stored = server.wait_stored([str(dcmread(p).SOPInstanceUID) for p in files], timeout=30)
    for path in files:
        assert dataset_bytes(stored[str(dcmread(path).SOPInstanceUID)]) == dataset_bytes(path)
