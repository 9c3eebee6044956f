"""`kill -9` of `dicomnet serve` in the middle of a storm of stores: after a restart,
every acknowledged instance is on disk and found by C-FIND, nothing partial is left,
and the index passes SQLite's integrity check."""

from __future__ import annotations

import copy
import os
import signal
import sqlite3
import time
from pathlib import Path

import anyio
import pytest
from peers import start_dicomnet_server
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import dicomnet
from dicomnet.pacs.index import INDEX_FILE_NAME, Index
from dicomnet.pacs.scp import SERVING_MARKER, SPOOL_FOLDER, StorageSCP

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(150)]

CLIENTS = 10
ACKNOWLEDGED_BEFORE_KILL = 250


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def storm(port: int, acknowledged: set[str], kill: anyio.Event) -> None:
    """CLIENTS associations storing new instances until the server dies."""
    source = dcmread(get_testdata_file("CT_small.dcm"))

    async def client() -> None:
        try:
            async with dicomnet.connect("127.0.0.1", port) as assoc:
                while True:
                    uid = generate_uid()
                    dataset = copy.deepcopy(source)  # a shallow copy shares its elements
                    dataset.SOPInstanceUID = uid
                    if await assoc.store(dataset) == 0:
                        acknowledged.add(uid)
                        if len(acknowledged) >= ACKNOWLEDGED_BEFORE_KILL:
                            kill.set()
        except Exception:  # the server was killed under it
            return

    async with anyio.create_task_group() as tg:
        for _ in range(CLIENTS):
            tg.start_soon(client)


async def found_by_find(port: int, study: str, series: str) -> set[str]:
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study
    query.SeriesInstanceUID = series
    query.SOPInstanceUID = ""
    async with dicomnet.connect("127.0.0.1", port) as assoc:
        return {str(r.SOPInstanceUID) for r in await assoc.find(query, model="study").collect()}


@pytest.mark.parametrize("workers", [1, 2])
async def test_every_acknowledged_instance_survives_kill_9(tmp_path: Path, workers: int) -> None:
    source = dcmread(get_testdata_file("CT_small.dcm"))
    extra = ["--workers", str(workers)] if workers > 1 else []
    server = start_dicomnet_server(tmp_path / "run", verbose=False, extra_args=extra)
    acknowledged: set[str] = set()
    try:
        kill = anyio.Event()
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(storm, server.port, acknowledged, kill)
                await kill.wait()
                os.kill(server.process.pid, signal.SIGKILL)  # mid-storm
                server.process.proc.wait(10)  # type: ignore[union-attr]
        assert len(acknowledged) >= ACKNOWLEDGED_BEFORE_KILL
    finally:
        server.stop()
    if workers > 1:
        time.sleep(2.5)  # the orphaned worker notices its parent is gone and stops
    storage = server.storage
    assert list((storage / SPOOL_FOLDER).glob(SERVING_MARKER + "*")), "a crash leaves a marker"

    restarted = start_dicomnet_server(tmp_path / "run", verbose=False)
    try:
        with anyio.fail_after(60):
            found = await found_by_find(
                restarted.port, source.StudyInstanceUID, source.SeriesInstanceUID
            )
    finally:
        assert restarted.stop() == 0
    missing = acknowledged - found
    on_disk = {p.name[: -len(".dcm")] for p in storage.glob("*.dcm")}
    assert not missing, (
        f"{len(missing)} of {len(acknowledged)} acknowledged not found; "
        f"{len(missing - on_disk)} of them not on disk\n{restarted.log_text()}"
    )
    assert acknowledged <= on_disk
    assert found == on_disk  # every stored file is indexed, nothing else
    assert [p for p in storage.rglob("*.part")] == []  # nothing partial is left
    for uid in on_disk:  # and every file there is whole
        assert len(dcmread(storage / f"{uid}.dcm").PixelData) == len(source.PixelData)
    with sqlite3.connect(storage / INDEX_FILE_NAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    # A clean stop leaves no marker: the next start does not scan.
    assert list((storage / SPOOL_FOLDER).glob(SERVING_MARKER + "*")) == []


def test_a_start_after_an_unclean_stop_indexes_what_the_index_lacks(tmp_path: Path) -> None:
    """In process: files stored but never indexed (the indexer's batch lost), and one
    replaced since it was indexed, are indexed by the next start; a clean stop leaves
    nothing for the start after it to do."""
    storage = tmp_path / "storage"
    scp = StorageSCP(storage, fsync=False)
    scp.close()  # clean: no marker
    assert list((storage / SPOOL_FOLDER).iterdir()) == []
    source = dcmread(get_testdata_file("CT_small.dcm"))
    uids = []
    for _ in range(5):
        source.SOPInstanceUID = generate_uid()
        source.save_as(storage / f"{source.SOPInstanceUID}.dcm")
        uids.append(source.SOPInstanceUID)
    with Index(storage / INDEX_FILE_NAME, root=storage) as index:
        index.add(storage / f"{uids[0]}.dcm")
    scp = StorageSCP(storage, fsync=False)  # the last stop was clean: no scan
    assert len(scp.index) == 1
    scp.index.close()  # as if killed: the marker stays
    source.SOPInstanceUID = uids[0]
    source.InstanceNumber = 99
    source.ImageComments = "replaced since it was indexed"  # another size
    source.save_as(storage / f"{uids[0]}.dcm")
    scp = StorageSCP(storage, fsync=False)
    try:
        assert len(scp.index) == 5
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = source.StudyInstanceUID
        query.SeriesInstanceUID = source.SeriesInstanceUID
        query.SOPInstanceUID = uids[0]
        query.InstanceNumber = ""
        (found,) = scp.index.query("study", "IMAGE", query)
        assert found.InstanceNumber == 99
    finally:
        scp.close()
    assert list((storage / SPOOL_FOLDER).glob(SERVING_MARKER + "*")) == []


async def test_a_batch_whose_indexing_failed_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index cannot be written for a while (a full disk): the batch is indexed once it
    can be, without a new store to wake the indexer."""
    from dicomnet.pacs import scp as pacs

    monkeypatch.setattr(pacs, "RETRY_FIRST", 0.05)
    source = dcmread(get_testdata_file("CT_small.dcm"))
    path = tmp_path / "one.dcm"
    source.save_as(path)
    with Index(tmp_path / INDEX_FILE_NAME, root=tmp_path) as index:
        add_many = index.add_many
        failures = [sqlite3.OperationalError("database or disk is full")] * 3

        def failing(batch: list[str]) -> int:
            if failures:
                raise failures.pop()
            return add_many(batch)

        monkeypatch.setattr(index, "add_many", failing)
        indexer = pacs.Indexer(index, use_process=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(indexer.run)
            await anyio.sleep(0)
            indexer.add(path)
            with anyio.fail_after(5):
                await indexer.drain()  # a query does not wait for the retries
            assert len(index) == 0 and not indexer.all_indexed
            with anyio.fail_after(10):
                while len(index) == 0:
                    await anyio.sleep(0.05)
            assert failures == [] and indexer.all_indexed
            tg.cancel_scope.cancel()
