"""The worklist folder of `dicomnet serve --worklist DIR` (`dicomnet.pacs.worklist`) and
the SCP answering the Modality Worklist model from it: files added, changed and removed
between queries are seen, broken files are left out, C-CANCEL stops a search."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
import worklist_data
from pydicom.dataset import Dataset

import dicomnet
import dicomnet.pacs.worklist as worklist_module
from dicomnet.errors import NotNegotiatedError
from dicomnet.pacs.scp import StorageSCP
from dicomnet.pacs.worklist import WorklistFolder
from dicomnet.pacs.worklist_matching import WorklistQuery

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:Invalid value for VR"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def accessions(folder: WorklistFolder) -> set[str]:
    return {str(item.AccessionNumber) for item in folder.refresh()}


def age(folder: Path) -> None:
    """Make every file in `folder` ten seconds old (out of the re-read window)."""
    old = time.time_ns() - 10_000_000_000
    for path in folder.iterdir():
        os.utime(path, ns=(old, old))


def mr_query() -> Dataset:
    query = Dataset()
    query.AccessionNumber = ""
    step = Dataset()
    step.Modality = "MR"
    query.ScheduledProcedureStepSequence = [step]
    return query


async def test_items_added_changed_and_removed_are_seen(tmp_path: Path) -> None:
    paths = worklist_data.write_worklist(tmp_path)
    folder = WorklistFolder(tmp_path)
    assert accessions(folder) == {f"ACC{i}" for i in range(1, 8)}
    # Added, as DICOM JSON.
    extra = worklist_data.item_dataset(worklist_data.ITEMS[0])
    extra.AccessionNumber = "JSON1"
    (tmp_path / "json1.json").write_text(extra.to_json())
    assert "JSON1" in accessions(folder)
    # Changed at once (same size, within the time stamp granularity): ACC2 becomes MR.
    changed = worklist_data.item_dataset(worklist_data.ITEMS[1])
    changed.ScheduledProcedureStepSequence[0].Modality = "MR"
    worklist_data.write_part10(changed, paths[1])
    found = [r.AccessionNumber async for r in folder.find(mr_query())]
    assert set(found) == {"ACC1", "ACC2", "ACC3", "ACC6", "ACC7", "JSON1"}
    # Removed.
    paths[0].unlink()
    (tmp_path / "json1.json").unlink()
    assert accessions(folder) == {f"ACC{i}" for i in range(2, 8)}


async def test_unchanged_files_are_not_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worklist_data.write_worklist(tmp_path)
    age(tmp_path)
    folder = WorklistFolder(tmp_path)
    assert len(folder.refresh()) == 7
    reads: list[str] = []
    real = worklist_module.read_item
    monkeypatch.setattr(worklist_module, "read_item", lambda path: reads.append(path) or real(path))
    assert len(folder.refresh()) == 7 and reads == []


async def test_a_broken_file_is_left_out_with_a_warning_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    worklist_data.write_worklist(tmp_path)
    (tmp_path / "garbage.wl").write_bytes(b"\x00" * 300)
    whole = (tmp_path / "ACC1.wl").read_bytes()
    (tmp_path / "head.wl").write_bytes(whole[:200])  # the file meta, no data set
    (tmp_path / "cut.wl").write_bytes(whole[:480])  # cut in the sequence
    (tmp_path / "bad.json").write_text('{"00100010": {"vr": "PN", "Value": [')
    (tmp_path / "two.json").write_text("[{}, {}]")
    (tmp_path / ".ACC1.wl.tmp").write_bytes(b"half a file")  # hidden: not an item
    (tmp_path / "sub").mkdir()  # a folder: not an item
    folder = WorklistFolder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="dicomnet"):
        assert accessions(folder) == {f"ACC{i}" for i in range(1, 8)}
    left_out = {r.getMessage().split()[1] for r in caplog.records if "left out" in r.message}
    names = {Path(p).name for p in left_out}
    assert names == {"garbage.wl", "head.wl", "cut.wl", "bad.json", "two.json"}
    # Said once: not again while the files stay as they are (older than the racy window).
    age(tmp_path)
    folder.refresh()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dicomnet"):
        assert len(folder.refresh()) == 7
    assert not caplog.records
    # Mended: it becomes an item.
    extra = worklist_data.item_dataset(worklist_data.ITEMS[3])
    extra.AccessionNumber = "MENDED"
    (tmp_path / "bad.json").write_text(extra.to_json())
    assert "MENDED" in accessions(folder)


async def test_a_missing_folder_is_an_empty_worklist_until_it_exists(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = WorklistFolder(tmp_path / "later")
    with caplog.at_level(logging.WARNING, logger="dicomnet"):
        assert folder.refresh() == [] and folder.refresh() == []
    assert len([r for r in caplog.records if "cannot list" in r.message]) == 1
    worklist_data.write_worklist(tmp_path / "later")
    assert len(folder.refresh()) == 7


# -- the SCP ----------------------------------------------------------------------------


@asynccontextmanager
async def serving(tmp_path: Path, worklist: Path | None) -> AsyncIterator[int]:
    scp = StorageSCP(tmp_path / "storage", fsync=False, worklist=worklist)
    try:
        async with scp.serve("127.0.0.1", 0) as server:
            yield server.port
    finally:
        scp.close()


async def test_the_scp_answers_the_worklist_model_from_the_folder(tmp_path: Path) -> None:
    worklist_data.write_worklist(tmp_path / "worklist")
    async with serving(tmp_path, tmp_path / "worklist") as port:
        async with dicomnet.connect("127.0.0.1", port) as assoc:
            with anyio.fail_after(20):
                responses = assoc.find(mr_query(), model="mwl")
                found = {str(r.AccessionNumber) for r in await responses.collect()}
                assert found == {"ACC1", "ACC3", "ACC6", "ACC7"}
                assert responses.status == 0x0000
                bad = mr_query()
                bad.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate = "x-y"
                with pytest.raises(dicomnet.DimseError) as caught:
                    await assoc.find(bad, model="mwl").collect()
                assert caught.value.status == 0xC000
                assert await assoc.echo() == 0


async def test_without_a_worklist_the_model_is_not_accepted(tmp_path: Path) -> None:
    async with serving(tmp_path, None) as port:
        async with dicomnet.connect("127.0.0.1", port) as assoc:
            with anyio.fail_after(20), pytest.raises(NotNegotiatedError):
                await assoc.find(mr_query(), model="mwl").collect()


async def test_c_cancel_stops_the_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many items, the first and the last matching, each slow to match: after the first
    response the SCU cancels; the search stops long before the last item."""
    folder = tmp_path / "worklist"
    folder.mkdir()
    item = worklist_data.item_dataset(worklist_data.ITEMS[0])
    for n in range(2000):
        item.AccessionNumber = f"N{n:04d}" if 0 < n < 1999 else "WANTED"
        worklist_data.write_part10(item, folder / f"{n:04d}.wl")
    matched: list[int] = []
    real_match = WorklistQuery.match

    def slow_match(self: WorklistQuery, candidate: Dataset) -> Dataset | None:
        matched.append(1)
        time.sleep(0.001)
        return real_match(self, candidate)

    monkeypatch.setattr(WorklistQuery, "match", slow_match)
    query = Dataset()
    query.AccessionNumber = "WANTED"
    async with serving(tmp_path, folder) as port:
        async with dicomnet.connect("127.0.0.1", port) as assoc:
            with anyio.fail_after(30):
                async with assoc.find(query, model="mwl") as responses:
                    async for _ in responses:
                        break
                assert responses.status is not None and responses.status.is_cancel
                assert await assoc.echo() == 0
    assert len(matched) < 1000
