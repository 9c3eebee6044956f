"""`dicomnet get --via move`: retrieve to self through a listener of ours."""

from __future__ import annotations

from pathlib import Path

import pytest
from peers import HOST, ServerFactory, dataset_bytes, describe_cli, free_port, run_dicomnet
from pydicom import dcmread
from pydicom.data import get_testdata_file

FILES = [Path(get_testdata_file(n)) for n in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")]


@pytest.mark.timeout(120)
def test_get_via_move_to_own_listener(tmp_path: Path, dicomnet_server: ServerFactory) -> None:
    listen_port = free_port()
    server = dicomnet_server(aet="PACS", extra_args=["--peer", f"ME=127.0.0.1:{listen_port}"])
    stored = run_dicomnet(["store", HOST, server.port, *FILES, "--aec", "PACS"])
    assert stored.returncode == 0, describe_cli(stored)
    out = tmp_path / "out"
    patient = str(dcmread(FILES[0]).PatientID)
    listener = ["--via", "move", "--listen-port", listen_port]
    query = ["--model", "patient", "-k", f"PatientID={patient}"]
    result = run_dicomnet(
        ["get", HOST, server.port, "--aec", "PACS", "--aet", "ME", "--out", out, *listener, *query]
    )
    assert result.returncode == 0, describe_cli(result)
    source = FILES[0]
    received = out / f"{dcmread(source).SOPInstanceUID}.dcm"
    assert sorted(p.name for p in out.iterdir()) == [received.name]
    assert dataset_bytes(received) == dataset_bytes(source)
    assert "completed 1, failed 0" in result.stderr


@pytest.mark.timeout(60)
def test_serve_refuses_worklist_it_does_not_hold(dicomnet_server: ServerFactory) -> None:
    server = dicomnet_server(aet="PACS")
    result = run_dicomnet(
        ["find", HOST, server.port, "--aec", "PACS", "--model", "mwl", "-k", "PatientID"]
    )
    assert result.returncode != 0
    assert "not accepted" in result.stderr, describe_cli(result)
