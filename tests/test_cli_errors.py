"""Command-line errors are one line on stderr, never a traceback: exit status 2 when
the command line cannot be carried out as written, 1 when what it asked for failed."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from peers import HOST, DicomnetServer, describe_cli, free_port, run_dicomnet


def one_line(result: object, status: int, *words: str) -> None:
    assert result.returncode == status, describe_cli(result)  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1, describe_cli(result)
    assert "Traceback" not in lines[0]
    for word in words:
        assert word in lines[0], describe_cli(result)


@pytest.mark.parametrize("flag", ["--aet", "--aec"])
def test_an_ae_title_longer_than_16_characters(flag: str) -> None:
    result = run_dicomnet(["echo", HOST, free_port(), flag, "A-TITLE-OF-20-CHARS!"])
    one_line(result, 2, flag, "not an AE title", "--help")


def test_a_wildcard_on_a_number() -> None:
    result = run_dicomnet(["find", HOST, free_port(), "-k", "InstanceNumber=1?"])
    one_line(result, 2, "-k InstanceNumber=1?", "text values only")


def test_an_unknown_keyword() -> None:
    result = run_dicomnet(["find", HOST, free_port(), "-k", "PatientNam=X"])
    one_line(result, 2, "'PatientNam' is not a DICOM keyword")


def test_a_peer_that_is_not_there() -> None:
    with socket.socket() as closed:
        closed.bind((HOST, 0))
        port = closed.getsockname()[1]
    result = run_dicomnet(["echo", HOST, port])
    one_line(result, 1, "could not connect")


def test_serve_on_a_port_in_use(
    dicomnet_server: Callable[..., DicomnetServer], tmp_path: Path
) -> None:
    server = dicomnet_server()
    result = run_dicomnet(["serve", "--port", server.port, "--storage", tmp_path / "other"])
    one_line(result, 1, f"cannot listen on 127.0.0.1:{server.port}", "--port")
    assert server.alive()


@pytest.mark.parametrize("what", ["a file", "under a file"])
def test_serve_storage_that_cannot_be_a_folder(tmp_path: Path, what: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    storage = blocker if what == "a file" else blocker / "storage"
    result = run_dicomnet(["serve", "--port", "0", "--storage", storage])
    one_line(result, 2, "--storage", "not a folder" if what == "a file" else "cannot be created")


def test_store_with_more_associations_than_the_peer_allows(
    dicomnet_server: Callable[..., DicomnetServer], tmp_path: Path
) -> None:
    """`store --concurrency 3` against a server that takes one association at a time:
    the refused associations back off and try again or leave the queue to the one that
    works, and every file is stored (it used to be `sent 1, failed 29`)."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    source = dcmread(get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "files"
    folder.mkdir()
    uids = []
    for index in range(30):
        source.SOPInstanceUID = generate_uid()
        uids.append(source.SOPInstanceUID)
        source.save_as(folder / f"{index:02}.dcm")
    server = dicomnet_server(max_associations=1)
    result = run_dicomnet(["store", HOST, server.port, folder, "--concurrency", "3"])
    assert result.returncode == 0, describe_cli(result)
    assert "sent 30, warning 0, failed 0" in result.stdout, describe_cli(result)
    assert set(server.wait_stored(uids)) >= set(uids)


@pytest.mark.parametrize("command", ["find", "move", "get"])
def test_the_patient_level_of_the_study_model(command: str, tmp_path: Path) -> None:
    extra = {"move": ["--dest", "ME"], "get": ["--out", str(tmp_path)]}.get(command, [])
    result = run_dicomnet([command, HOST, free_port(), "--level", "PATIENT", *extra])
    one_line(result, 2, "use --model patient")


def test_move_prints_its_final_counts_and_pending_ones_only_when_asked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A series moved is hundreds of pending responses: one line for the final status
    (and one per failed instance); each pending one with -v, or on a terminal one line
    rewritten in place (not under capture here)."""
    from types import SimpleNamespace

    from dicomnet.cli.move import _print_progress

    def progress(final: bool, **counts: object) -> object:
        return SimpleNamespace(
            is_final=final, remaining=counts.get("remaining"), completed=counts["completed"],
            failed=0, warning=0, status=0xFF00 if not final else 0,
            failed_sop_instance_uids=counts.get("failed_uids", ()),
        )  # fmt: skip

    for done in range(1, 100):
        _print_progress(progress(False, remaining=100 - done, completed=done))
    _print_progress(progress(True, completed=100, failed_uids=("1.2.3",)))
    assert capsys.readouterr().out.splitlines() == [
        "final: remaining None, completed 100, failed 0, warning 0 (0)",
        "failed: 1.2.3",
    ]
    _print_progress(progress(False, remaining=1, completed=99), every=True)
    assert capsys.readouterr().out.startswith("pending: remaining 1, completed 99")
