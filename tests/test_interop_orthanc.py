"""Storage commitment with Orthanc (a real PACS, Debian's `orthanc`), both ways:
Orthanc asks `dicomnet serve` through its REST API, and `dicomnet commit` asks Orthanc.
Orthanc sends and expects each report on an association of its own (PS3.4 §J.3.3)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from orthanc_peer import OrthancPeer, start_orthanc
from peers import DicomnetServer, describe_cli, free_port, run_dicomnet
from pydicom import dcmread
from pydicom.data import get_testdata_file

pytestmark = [pytest.mark.orthanc, pytest.mark.timeout(120)]

CT_FILE = Path(get_testdata_file("CT_small.dcm"))
MR_FILE = Path(get_testdata_file("MR_small.dcm"))
CT = (str(dcmread(CT_FILE).SOPClassUID), str(dcmread(CT_FILE).SOPInstanceUID))
MR = (str(dcmread(MR_FILE).SOPClassUID), str(dcmread(MR_FILE).SOPInstanceUID))
NEVER_STORED = (CT[0], "1.2.826.0.1.3680043.8.498.4242")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Callable[..., OrthancPeer]]:
    started: list[OrthancPeer] = []

    def start(**kwargs: object) -> OrthancPeer:
        peer = start_orthanc(tmp_path / f"orthanc-{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.stop(kill=True)


def test_orthanc_asks_serve_for_storage_commitment(
    dicomnet_server: Callable[..., DicomnetServer], orthanc: Callable[..., OrthancPeer]
) -> None:
    orthanc_port = free_port()
    server = dicomnet_server(aet="PACS", extra_args=["--peer", f"ORTHANC=127.0.0.1:{orthanc_port}"])
    stored = run_dicomnet(["store", "127.0.0.1", server.port, "--aec", "PACS", CT_FILE])
    assert stored.returncode == 0, describe_cli(stored)
    peer = orthanc(
        modalities={"dicomnet": ("PACS", "127.0.0.1", server.port)},
        extra_config={"DicomPort": orthanc_port},
    )
    report = peer.request_commitment("dicomnet", [CT, NEVER_STORED], timeout=30)
    assert report["Status"] == "Failure", report
    assert [(s["SOPClassUID"], s["SOPInstanceUID"]) for s in report["Success"]] == [CT]
    failures = [(f["SOPInstanceUID"], f["FailureReason"]) for f in report["Failures"]]
    assert failures == [(NEVER_STORED[1], 0x0112)], report
    everything = peer.request_commitment("dicomnet", [CT], timeout=30)
    assert everything["Status"] == "Success" and not everything.get("Failures"), everything


def test_dicomnet_commit_asks_orthanc(orthanc: Callable[..., OrthancPeer]) -> None:
    listen_port = free_port()
    peer = orthanc(modalities={"dicomnet": ("DICOMNET", "127.0.0.1", listen_port)})
    peer.upload(CT_FILE.read_bytes())

    def commit(*paths: Path) -> subprocess.CompletedProcess[str]:
        return run_dicomnet(
            [
                "commit",
                "127.0.0.1",
                peer.dicom_port,
                "--aec",
                "ORTHANC",
                "--listen-port",
                listen_port,
                "--listen-host",
                "127.0.0.1",
                "--timeout",
                "30",
                *paths,
            ]
        )

    partly = commit(CT_FILE, MR_FILE)
    assert partly.returncode == 1, describe_cli(partly)
    assert f"committed {CT[1]}" in partly.stdout
    assert f"failed {MR[1]} ({MR[0]}): failure reason 0x0112" in partly.stdout
    peer.upload(MR_FILE.read_bytes())
    whole = commit(CT_FILE, MR_FILE)
    assert whole.returncode == 0, describe_cli(whole)
    assert "2 committed, 0 failed" in whole.stderr
