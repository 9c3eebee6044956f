"""`dicomnet commit` against `dicomnet serve`, both as processes on loopback: the
report on the same association, on our listener after a restart of `serve` (pending
reports are kept on disk), and instances that were not stored reported failed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import index_location
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


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_report_waiting_for_its_requestor_survives_a_restart(
    dicomnet_server: Callable[..., DicomnetServer],
    tmp_path: Path,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    """`serve` cannot reach the requestor: the report stays on disk (or in the index's
    PostgreSQL database); a new `serve` on the same storage (the same node) sends it when
    the requestor (a listener) is there."""
    listen_port = free_port()
    peer = f"MODALITY=127.0.0.1:{listen_port}"
    shared: list[str] = []
    if backend == "postgresql":
        url = index_location(request, backend, tmp_path / "unused")
        shared = ["--index", url, "--node", "node-1"]
    first = dicomnet_server(aet="PACS", extra_args=["--peer", peer, *shared])
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

    def pending() -> bool:
        if backend == "sqlite":
            return (first.storage / ".commitments" / f"{transaction}.json").exists()
        import psycopg

        with psycopg.connect(url) as conn:
            sql = "SELECT 1 FROM commitment_report WHERE transaction_uid = %s"
            return conn.execute(sql, (transaction,)).fetchone() is not None

    assert wait_until(pending, 10)
    first.stop()
    assert pending()
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
        again = ["--peer", peer, "--storage", first.storage, *shared]
        dicomnet_server(aet="PACS", extra_args=again)
        out, _ = listener.communicate(timeout=90)
        assert out.strip() == "1 0", out
        assert wait_until(lambda: not pending(), 10)
    finally:
        listener.kill()


def test_commit_needs_instances(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_dicomnet(["commit", "127.0.0.1", "1", empty])
    assert result.returncode == 2, describe_cli(result)
    assert "no DICOM instances" in result.stderr
