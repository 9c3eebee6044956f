"""`dicomnet commit` against `dicomnet serve`, both as processes on loopback: the
report on the same association, on our listener after a restart of `serve` (pending
reports are kept on disk), and instances that were not stored reported failed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from peers import DicomnetServer, describe_cli, free_port, run_dicomnet, wait_until
from pydicom.data import get_testdata_file

CT_FILE = Path(get_testdata_file("CT_small.dcm"))
MR_FILE = Path(get_testdata_file("MR_small.dcm"))

pytestmark = pytest.mark.timeout(120)


def test_commit_reports_stored_and_missing_instances(
    dicomnet_server: Callable[..., DicomnetServer], tmp_path: Path
) -> None:
    server = dicomnet_server(aet="PACS")
    stored = run_dicomnet(["store", "127.0.0.1", server.port, "--aec", "PACS", CT_FILE])
    assert stored.returncode == 0, describe_cli(stored)
    committed = run_dicomnet(
        ["commit", "127.0.0.1", server.port, "--aec", "PACS", "--timeout", "30", CT_FILE]
    )
    assert committed.returncode == 0, describe_cli(committed)
    assert "1 committed, 0 failed" in committed.stderr, describe_cli(committed)
    both = run_dicomnet(
        ["commit", "127.0.0.1", server.port, "--aec", "PACS", "--timeout", "30", CT_FILE, MR_FILE]
    )
    assert both.returncode == 1, describe_cli(both)
    assert "1 committed, 1 failed" in both.stderr, describe_cli(both)
    assert "failure reason 0x0112" in both.stdout, describe_cli(both)


def test_a_report_waiting_for_its_requestor_survives_a_restart(
    dicomnet_server: Callable[..., DicomnetServer], tmp_path: Path
) -> None:
    """`serve` cannot reach the requestor: the report stays on disk; a new `serve` on
    the same storage sends it when the requestor (a listener) is there."""
    listen_port = free_port()
    peer = f"MODALITY=127.0.0.1:{listen_port}"
    first = dicomnet_server(aet="PACS", extra_args=["--peer", peer])
    stored = run_dicomnet(["store", "127.0.0.1", first.port, "--aec", "PACS", CT_FILE])
    assert stored.returncode == 0, describe_cli(stored)
    # Ask, then go away at once: the report must go to MODALITY, which is not listening.
    script = (
        "import anyio, dicomnet\n"
        "async def main():\n"
        f"    async with dicomnet.connect('127.0.0.1', {first.port}, aet='MODALITY',"
        " aec='PACS') as a:\n"
        f"        p = await a.send_commitment_request([{str(CT_FILE)!r}])\n"
        "        p.close()\n"
        "        print(p.transaction_uid)\n"
        "anyio.run(main)\n"
    )
    asked = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert asked.returncode == 0, asked.stderr
    transaction = asked.stdout.strip()
    pending = first.storage / ".commitments" / f"{transaction}.json"
    assert wait_until(pending.exists, 10), list((first.storage / ".commitments").iterdir())
    first.stop()
    assert pending.exists()
    # A listener for MODALITY, then `serve` again on the same storage.
    listener_script = (
        "import anyio, dicomnet\n"
        "async def main():\n"
        f"    async with dicomnet.commitment_listener('MODALITY', '127.0.0.1', {listen_port})"
        " as ear:\n"
        f"        arrived = ear.waiters.expect({transaction!r})\n"
        "        print('listening', flush=True)\n"
        "        with anyio.fail_after(60):\n"
        "            await arrived.wait()\n"
        f"        r = ear.waiters.results[{transaction!r}]\n"
        "        print(len(r.committed), len(r.failed), flush=True)\n"
        "anyio.run(main)\n"
    )
    listener = subprocess.Popen(
        [sys.executable, "-c", listener_script], stdout=subprocess.PIPE, text=True
    )
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "listening"
        # The last --storage wins: the first server's folder, not the fixture's new one.
        dicomnet_server(aet="PACS", extra_args=["--peer", peer, "--storage", first.storage])
        out, _ = listener.communicate(timeout=90)
        assert out.strip() == "1 0", out
        assert wait_until(lambda: not pending.exists(), 10)
    finally:
        listener.kill()


def test_commit_needs_instances(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_dicomnet(["commit", "127.0.0.1", "1", empty])
    assert result.returncode == 2, describe_cli(result)
    assert "no DICOM instances" in result.stderr
