"""`python -m benchmarks.index_scale` end to end on a small index: both databases are
built with every instance, and every query kind reports its latencies and finds what
the generated data holds. Nothing about speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_index_scale_runs_on_both_databases(tmp_path: Path, postgresql_server: Any) -> None:
    out = tmp_path / "scale.json"
    # Its own private server (as the tests'): a second, empty database for two nodes.
    argv = [sys.executable, "-m", "benchmarks.index_scale", "--instances", "600"]
    argv += ["--json", str(out)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
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
