"""Every example in examples/ runs as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.timeout(90)
def test_echo_and_store(tmp_path: Path) -> None:
    out = run("echo_and_store.py", str(tmp_path))
    assert "C-ECHO: Success" in out
    assert out.count(": Success") == 4
    assert len(list(tmp_path.glob("*.dcm"))) == 3


@pytest.mark.timeout(90)
def test_forwarding_gateway() -> None:
    out = run("forwarding_gateway.py")
    assert out.count(": Success") == 4
    assert "archive received 4 instances" in out


@pytest.mark.timeout(90)
def test_find_then_move() -> None:
    out = run("find_then_move.py")
    assert "patient 1CT1: 3 studies" in out
    assert out.count(": 2 moved, 0 failed") == 3
    assert "archive received 6 instances; 6 reported moved" in out


@pytest.mark.timeout(90)
def test_storage_commitment() -> None:
    out = run("storage_commitment.py")
    assert out.count("  committed ") == 4
    assert "  failed 1.2.826.0.1.3680043.8.498.999 (failure reason 0x0112)" in out
    assert "all committed: the modality may delete its copies" in out


@pytest.mark.timeout(90)
def test_mpps() -> None:
    out = run("mpps.py")
    assert "N-CREATE: Success" in out and "N-SET COMPLETED: Success" in out
    assert "N-SET again: refused 0x0110" in out
    assert "RIS: P1 CT step PPS1 done" in out
