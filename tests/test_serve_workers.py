"""`dicomnet serve --workers N`: several processes on one port share one index."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import anyio
import pytest
from conftest import index_location
from peers import HOST, ServerFactory, describe_cli, run_dicomnet, wait_until
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import dicomnet
from dicomnet.pacs.scp import PROGRESS_FILE, SPOOL_FOLDER


def worker_pids(parent: int) -> list[int]:
    found = subprocess.run(
        ["pgrep", "-f", "--", f"--worker-of {parent}"], capture_output=True, text=True
    )
    return [int(pid) for pid in found.stdout.split()]


@pytest.mark.timeout(120)
def test_workers_serve_one_port_and_share_the_index(
    tmp_path: Path, dicomnet_server: ServerFactory
) -> None:
    source = dcmread(get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "files"
    folder.mkdir()
    for i in range(40):
        source.SOPInstanceUID = generate_uid()
        source.save_as(folder / f"{i}.dcm")
    server = dicomnet_server(aet="PACS", extra_args=["--workers", "2"])
    assert wait_until(lambda: len(worker_pids(server.process.pid)) == 1, timeout=20)
    stored = run_dicomnet(
        ["store", HOST, server.port, "--aec", "PACS", folder, "--concurrency", "4"]
    )
    assert stored.returncode == 0, describe_cli(stored)
    assert len(server.stored()) == 40
    keys = ["-k", f"PatientID={source.PatientID}", "-k", "NumberOfPatientRelatedInstances"]

    def all_indexed() -> bool:
        found = run_dicomnet(
            ["find", HOST, server.port, "--aec", "PACS", "--model", "patient", *keys, "--json"]
        )
        if found.returncode != 0 or not found.stdout.strip():
            return False
        match = json.loads(found.stdout.splitlines()[0])
        return bool(match["00201204"]["Value"] == [40])

    # Each process indexes what it received; a query waits for the other's batches.
    assert all_indexed()
    children = worker_pids(server.process.pid)
    server.stop()
    assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), 20)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_query_sees_what_another_worker_stored_just_before(
    dicomnet_server: ServerFactory, backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Store one instance, then at once query it on a new association, again and again:
    about half the pairs land on different processes (SO_REUSEPORT spreads them), and
    each query still finds the instance stored just before. SQLite: though the other
    process indexes it in a batch that is still gathering (the query waits for it).
    PostgreSQL: the store is answered once indexed; no file is shared but the database."""
    index = [] if backend == "sqlite" else ["--index", index_location(request, backend, tmp_path)]
    server = dicomnet_server(aet="PACS", extra_args=["--workers", "2", "--no-fsync", *index])
    assert wait_until(lambda: len(worker_pids(server.process.pid)) == 1, timeout=20)
    source = dcmread(get_testdata_file("CT_small.dcm"))

    async def store_then_find(rounds: int) -> list[int]:
        missed = []
        for i in range(rounds):
            source.SOPInstanceUID = generate_uid()
            async with dicomnet.connect(HOST, server.port, aec="PACS") as assoc:
                assert await assoc.store(source) == 0x0000
            query = Dataset()
            query.StudyInstanceUID = source.StudyInstanceUID
            query.SeriesInstanceUID = source.SeriesInstanceUID
            query.SOPInstanceUID = source.SOPInstanceUID
            async with dicomnet.connect(HOST, server.port, aec="PACS") as assoc:
                found = [m async for m in assoc.find(query, model="study", level="IMAGE")]
            if len(found) != 1:
                missed.append(i)
        return missed

    assert anyio.run(store_then_find, 24) == []
    assert len(server.stored()) == 24
    progress = list((server.storage / SPOOL_FOLDER).rglob(PROGRESS_FILE))
    assert len(progress) == (1 if backend == "sqlite" else 0)
