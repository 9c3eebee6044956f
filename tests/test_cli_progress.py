"""What `move`, `get` and `store` print: the progress bar on a terminal, a summary line
otherwise, the failed instances and why; pydicom's remarks said once, paths named once."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from peers import HOST, DicomnetServer, describe_cli, run_dicomnet
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicomnet.cli import main
from dicomnet.cli.progress import ProgressBar, format_duration

pytestmark = pytest.mark.timeout(120)

FILES = [Path(get_testdata_file(n)) for n in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")]
UIDS = {str(dcmread(f).SOPInstanceUID) for f in FILES}
# Its data set is implicit VR although its file meta says explicit: pydicom warns.
WARNED = Path(get_testdata_file("SC_rgb_jpeg.dcm"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
    return port


def store_files(server: DicomnetServer) -> None:
    stored = run_dicomnet(["store", HOST, server.port, "--aec", server.aet or "ANY-SCP", *FILES])
    assert stored.returncode == 0, describe_cli(stored)


# --- the bar ----------------------------------------------------------------------------------


def test_the_bar_counts_bytes_and_eta(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bar = ProgressBar(total=40, unit="instances", show=True)
    bar.completed, bar.failed, bar.warning, bar.bytes_done = 9, 1, 0, 3_000_000
    bar.started -= 10.0  # 10 done in 10 s: 30 to go, 30 s
    line = bar.line()
    assert line.startswith(f"[{'#' * 7}{'.' * 23}] 10/40 instances, failed 1, warning 0, 3.0 MB, ")
    assert line.endswith(" MB/s, ETA 0:30")
    moving = ProgressBar(total=4, unit="instances", bytes_known=False, completed=4)
    assert moving.line() == f"[{'#' * 30}] 4/4 instances, failed 0, warning 0"  # done: no ETA
    assert [format_duration(s) for s in (7, 754, 3723)] == ["0:07", "12:34", "1:02:03"]

    bar.draw()
    bar.draw()  # within a tenth of a second: not drawn again
    bar.finish()
    err = capsys.readouterr().err
    assert err.count("\r") == 2 and err.endswith("\n") and "10/40 instances" in err
    ProgressBar(show=False).finish()
    assert capsys.readouterr().err == ""


# --- move -------------------------------------------------------------------------------------


def test_move_names_the_failed_instances_and_why(
    dicomnet_server: Callable[..., DicomnetServer],
) -> None:
    gone = closed_port()
    server = dicomnet_server(aet="PACS", extra_args=["--peer", f"GONE=127.0.0.1:{gone}"])
    store_files(server)
    result = run_dicomnet(
        ["move", HOST, server.port, "--aec", "PACS", "--dest", "GONE", "--model", "patient",
         "-k", f"PatientID={dcmread(FILES[0]).PatientID}"]
    )  # fmt: skip
    assert result.returncode == 1, describe_cli(result)
    assert "\r" not in result.stderr  # not a terminal: no bar
    status = "Status(0xA702 Out of resources: unable to perform sub-operations)"
    # serve's Error Comment says why: the destination could not be reached.
    why = f"1 failed: move destination: could not connect to 127.0.0.1:{gone}"
    assert result.stdout.splitlines() == [
        f"final: remaining None, completed 0, failed 1, warning 0 ({status})",
        f"failed: {dcmread(FILES[0]).SOPInstanceUID}: {status}: {why}",
    ], describe_cli(result)
    assert result.stderr.startswith("dicomnet move: "), describe_cli(result)


def test_move_bar_on_a_terminal_and_lines_with_v(
    dicomnet_server: Callable[..., DicomnetServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dest = dicomnet_server(aet="DEST")
    server = dicomnet_server(aet="PACS", extra_args=["--peer", f"DEST=127.0.0.1:{dest.port}"])
    store_files(server)
    query = ["--model", "study", "-k", f"StudyInstanceUID={dcmread(FILES[1]).StudyInstanceUID}"]
    argv = ["move", HOST, str(server.port), "--aec", "PACS", "--dest", "DEST", *query]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "\r[" + "#" * 30 + "] 1/1 instances, failed 0, warning 0" in captured.err
    assert "MB/s" not in captured.err  # the instances do not pass through here
    assert (
        captured.out
        == "final: remaining None, completed 1, failed 0, warning 0 (Status(0x0000 Success))\n"
    )
    assert set(dest.wait_stored([str(dcmread(FILES[1]).SOPInstanceUID)])) == {
        str(dcmread(FILES[1]).SOPInstanceUID)
    }

    # -v: a line per pending response instead of the bar (as before).
    assert main([*argv, "-v"]) == 0
    captured = capsys.readouterr()
    assert "\r[" not in captured.err
    assert captured.out.splitlines()[-1].startswith("final: remaining None, completed 1")


# --- get --------------------------------------------------------------------------------------


def test_get_bar_on_a_terminal_summary_otherwise(
    tmp_path: Path,
    dicomnet_server: Callable[..., DicomnetServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = dicomnet_server(aet="PACS")
    store_files(server)
    query = ["--model", "patient", "-k", f"PatientID={dcmread(FILES[0]).PatientID}"]
    argv = ["get", HOST, str(server.port), "--aec", "PACS", *query]

    result = run_dicomnet([*argv, "--out", tmp_path / "plain"])
    assert result.returncode == 0, describe_cli(result)
    assert "\r" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, describe_cli(result)
    assert lines[0].startswith(
        f"received 1 instance(s) into {tmp_path / 'plain'}; completed 1, failed 0, warning 0; "
        "final status Status(0x0000 Success); "
    )
    assert lines[0].endswith(" MB/s")

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main([*argv, "--out", str(tmp_path / "tty")]) == 0
    err = capsys.readouterr().err
    assert "\r[" + "#" * 30 + "] 1/1 instances, failed 0, warning 0, 0.0 MB, " in err
    assert err.splitlines()[-1].startswith("received 1 instance(s) into ")
    assert main([*argv, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert "\r" not in capsys.readouterr().err


def test_get_names_an_instance_it_could_not_save(
    tmp_path: Path, dicomnet_server: Callable[..., DicomnetServer]
) -> None:
    server = dicomnet_server(aet="PACS")
    store_files(server)
    out = tmp_path / "out"
    uid = str(dcmread(FILES[0]).SOPInstanceUID)
    (out / f"{uid}.dcm").mkdir(parents=True)  # in the way of the file
    result = run_dicomnet(
        ["get", HOST, server.port, "--aec", "PACS", "--out", out, "--model", "patient",
         "-k", f"PatientID={dcmread(FILES[0]).PatientID}"]
    )  # fmt: skip
    assert result.returncode == 1, describe_cli(result)
    # Answered Out of Resources: the peer counts it failed too (the only one: A702).
    status = "Status(0xA702 Out of resources: unable to perform sub-operations)"
    assert result.stderr.splitlines() == [
        f"dicomnet get: DIMSE operation failed with status {status}: "
        "1 failed: C-STORE 0xA700 Out of resources",
        f"received 0 instance(s) into {out}; completed 0, failed 1, warning 0; final status "
        f"{status}; 0.0 MB in " + result.stderr.split(" MB in ")[1].split("\n")[0],
        f"failed: {uid}: not saved: Is a directory",
    ], describe_cli(result)


# --- store: paths and pydicom's remarks -------------------------------------------------------


def test_store_names_a_skipped_path_once_and_pydicom_speaks_once(
    tmp_path: Path, dicomnet_server: Callable[..., DicomnetServer]
) -> None:
    server = dicomnet_server()
    folder = tmp_path / "in"
    folder.mkdir()
    notes = folder / "notes.txt"
    notes.write_text("not DICOM\n")
    (folder / WARNED.name).write_bytes(WARNED.read_bytes())
    (folder / FILES[0].name).write_bytes(FILES[0].read_bytes())

    verbose = run_dicomnet(["store", HOST, server.port, folder, "-v"])
    skipped = [line for line in verbose.stderr.splitlines() if "skipping" in line]
    assert len(skipped) == 1, describe_cli(verbose)
    assert skipped[0].endswith(f"skipping {notes}: not DICOM (no 'DICM' prefix, no data set)")
    assert skipped[0].count(str(notes)) == 1
    assert "Expected explicit VR" not in verbose.stderr  # pydicom's remarks: --debug only

    debug = run_dicomnet(["store", HOST, server.port, folder, "--debug"])
    assert debug.stderr.count("Expected explicit VR, but found implicit VR") == 1, describe_cli(
        debug
    )
    assert "UserWarning" not in debug.stderr
    assert debug.stderr.count(str(notes)) == 1

    explicit = run_dicomnet(["store", HOST, server.port, notes])
    assert explicit.returncode == 1
    assert f"error: {notes}: not DICOM (no 'DICM' prefix, no data set)" in explicit.stderr


def test_a_line_left_by_an_error_is_ended_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bar = ProgressBar(total=3, show=True, completed=1)
    bar.draw()
    bar.abandon()
    bar.abandon()  # ended already
    assert capsys.readouterr().err.count("\n") == 1
    bar.draw(force=True)
    bar.finish()
    bar.abandon()  # finish ended it
    assert capsys.readouterr().err.count("\n") == 1
