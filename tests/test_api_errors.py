"""Errors of the Python API are `dicomnet.DicomNetError` subclasses: storing what is not
DICOM raises `InvalidDatasetError` (also a `ValueError`), and the association goes on."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import dicomnet
from dicomnet.testing import MemoryNetwork

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_storing_a_file_that_is_not_dicom(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a DICOM file\n")
    network = MemoryNetwork()
    ae = dicomnet.AE("SCP")
    stored: list[object] = []

    @ae.on_store
    async def store(request: object) -> int:
        stored.append(request)
        return 0

    with anyio.fail_after(10):
        async with ae.serve("127.0.0.1", 104, backend=network):
            async with dicomnet.connect("127.0.0.1", 104, backend=network) as assoc:
                with pytest.raises(dicomnet.InvalidDatasetError) as caught:
                    await assoc.store(text)
                assert isinstance(caught.value, dicomnet.DicomNetError)
                assert isinstance(caught.value, ValueError)
                assert "SOP Instance UID" in str(caught.value)
                assert await assoc.echo() == 0
    assert stored == []
