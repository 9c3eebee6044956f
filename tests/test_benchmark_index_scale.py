"""`python -m benchmarks.index_scale` end to end on a small index: both databases are
built with every instance, and every query kind reports its latencies and finds what
the generated data holds. Nothing about speed is asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(module: str, tmp_path: Path, timeout: float) -> list[dict[str, Any]]:
    """`python -m benchmarks.MODULE --instances 600`: its JSON results."""
    out = tmp_path / "results.json"
    argv = [sys.executable, "-m", f"benchmarks.{module}", "--instances", "600"]
    argv += ["--json", str(out)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results: list[dict[str, Any]] = json.loads(out.read_text())
    return results


@pytest.mark.timeout(180)
def test_index_scale_runs_on_both_databases(tmp_path: Path, postgresql_server: Any) -> None:
    # Its own private server (as the tests'): a second, empty database for two nodes.
    results = _run("index_scale", tmp_path, 170)
    assert [r["backend"] for r in results] == ["sqlite", "postgresql"]
    for result in results:
        assert result["instances"] == 600 and result["ingest_per_s"] > 0
        assert result["ingest_per_s_2_nodes"] > 0  # and all 600 were there after
        find = result["find"]
        assert len(find) == 7
        assert find["IMAGE of a series"]["matches_median"] == 20
        assert find["SERIES of a study"]["matches_median"] == 3
        assert find["PATIENT by PatientID"]["matches_median"] == 1
        assert all(0 < kind["p50_ms"] <= kind["p99_ms"] for kind in find.values())


@pytest.mark.timeout(300)
def test_three_archives_find_the_same(tmp_path: Path, postgresql_server: Any) -> None:
    """serve on SQLite (one process, two workers), on PostgreSQL (one node, two) and
    Orthanc, over DICOM: every query kind finds as many matches on each (Orthanc: when
    installed; CI installs it)."""
    results = _run("index_archives", tmp_path, 280)
    names = [r["archive"] for r in results]
    assert names[:2] == ["serve (SQLite)", "serve (PostgreSQL)"]
    assert names[-2:] == ["serve --workers 2 (SQLite)", "serve, 2 nodes (PostgreSQL)"]
    assert "Orthanc (SQLite)" in names or shutil.which("Orthanc") is None
    for result in results:
        assert result["instances"] == 600 and result["ingest_per_s"] > 0
    matches = [{k: v["matches_median"] for k, v in r["find"].items()} for r in results]
    assert all(m == matches[0] for m in matches), matches
    assert matches[0]["IMAGE of a series"] == 20 and matches[0]["SERIES of a study"] == 3
