"""The fuzz targets (fuzz/targets.py) under a short bounded fuzzing pass.

- marked `fuzz`: each target under atheris (libFuzzer) for a bounded number of runs, in
  a subprocess; any crash, timeout or memory blow-up fails the test. Skipped where
  atheris is not installed (it has Linux wheels only), unless DICOMNET_REQUIRE_FUZZ=1.
- everywhere: hypothesis drives the same targets with random bytes and with mutations
  of the captured seeds.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import mutated

from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[1]
RUNS = 20_000
SECONDS = 8


def _atheris_or_skip() -> None:
    if importlib.util.find_spec("atheris") is not None:
        return
    message = "atheris is not installed (pip install atheris; Linux wheels only)"
    if os.environ.get("DICOMNET_REQUIRE_FUZZ"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.mark.fuzz
@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_bounded_fuzz_pass(target: str, tmp_path: Path) -> None:
    _atheris_or_skip()
    work = tmp_path / "corpus"
    work.mkdir()
    argv = [
        sys.executable,
        str(ROOT / "fuzz" / "run.py"),
        target,
        str(work),
        str(ROOT / "fuzz" / "corpus" / target),
        f"-runs={RUNS}",
        f"-max_total_time={SECONDS}",
        "-timeout=10",
        "-rss_limit_mb=1024",
        f"-artifact_prefix={tmp_path}/",
        "-print_final_stats=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=100, env=env)
    findings = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    tail = result.stderr[-3000:]
    assert result.returncode == 0 and not findings, f"{target}: {findings}\n{tail}"
    assert "Done" in result.stderr or "DONE" in result.stderr, tail
    executed = [
        line for line in result.stderr.splitlines() if "stat::number_of_executed_units" in line
    ]
    assert executed and int(executed[0].split(":")[-1]) > 100, tail


def _seeds(target: str) -> list[bytes]:
    folder = ROOT / "fuzz" / "corpus" / target
    return [path.read_bytes() for path in sorted(folder.glob("*"))]


def _inputs(target: str) -> st.SearchStrategy[bytes]:
    seeds = _seeds(target)
    return st.one_of(
        st.binary(max_size=512),
        st.sampled_from(seeds).flatmap(mutated),
    )


def _check(target: str, data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        TARGETS[target](data)


_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(_inputs("pdu"))
def test_pdu_target_property(data: bytes) -> None:
    _check("pdu", data)


@_SETTINGS
@given(_inputs("ul"))
def test_ul_target_property(data: bytes) -> None:
    _check("ul", data)


@_SETTINGS
@given(_inputs("dimse"))
def test_dimse_target_property(data: bytes) -> None:
    _check("dimse", data)


@_SETTINGS
@given(_inputs("identifier"))
def test_identifier_target_property(data: bytes) -> None:
    _check("identifier", data)


@_SETTINGS
@given(_inputs("dataset"))
def test_dataset_target_property(data: bytes) -> None:
    _check("dataset", data)
