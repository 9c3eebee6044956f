"""`dicomnet serve --workers N`: several processes on one port share one index."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from peers import HOST, ServerFactory, describe_cli, run_dicomnet, wait_until
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


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
    stored = run_dicomnet(["store", HOST, server.port, folder, "--concurrency", "4"])
    assert stored.returncode == 0, describe_cli(stored)
    assert len(server.stored()) == 40
    keys = ["-k", f"PatientID={source.PatientID}", "-k", "NumberOfPatientRelatedInstances"]

    def all_indexed() -> bool:
        found = run_dicomnet(["find", HOST, server.port, "--model", "patient", *keys, "--json"])
        if found.returncode != 0 or not found.stdout.strip():
            return False
        match = json.loads(found.stdout.splitlines()[0])
        return bool(match["00201204"]["Value"] == [40])

    # Each process indexes what it received; the other's rows appear within moments.
    assert wait_until(all_indexed, timeout=20)
    children = worker_pids(server.process.pid)
    server.stop()
    assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), 20)
