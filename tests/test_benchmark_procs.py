"""The benchmark's process accounting: a server's CPU is read once it is quiet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.procs import ServerProcess

pytestmark = pytest.mark.timeout(60)

# Busy for 0.3 s of CPU, then leaves a marker and sleeps: like a server that goes on
# working (indexing) after its last answer.
BUSY_THEN_IDLE = """
import sys, time
start = time.process_time()
while time.process_time() - start < 0.3:
    pass
open(sys.argv[1], "w").write("done")
time.sleep(60)
"""


def started(argv: list[str], tmp_path: Path) -> ServerProcess:
    server = ServerProcess("child", argv, 0, tmp_path / "child.log")
    # A process group of its own, as `start()` gives the servers it runs.
    server.proc = subprocess.Popen(argv, start_new_session=True)
    return server


def test_wait_quiet_waits_for_work_after_the_answer(tmp_path: Path) -> None:
    marker = tmp_path / "done"
    server = started([sys.executable, "-c", BUSY_THEN_IDLE, str(marker)], tmp_path)
    try:
        assert server.wait_quiet(limit=30)
        assert marker.exists()  # returned only once the burst was over
        cpu, _ = server.measure()
        assert cpu >= 0.3
    finally:
        server.stop()


def test_wait_quiet_is_bounded_for_a_busy_process(tmp_path: Path) -> None:
    busy = "while True: pass"
    server = started([sys.executable, "-c", busy], tmp_path)
    try:
        assert not server.wait_quiet(limit=1.0, interval=0.2)
    finally:
        server.stop()


def test_wait_quiet_returns_for_an_idle_process(tmp_path: Path) -> None:
    server = started([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path)
    try:
        assert server.wait_quiet(limit=30, interval=0.2)
        assert server.alive()
    finally:
        server.stop()
    assert not server.alive()
