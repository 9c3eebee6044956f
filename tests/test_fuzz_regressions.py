"""Replay what the fuzzers found (fuzz/regressions/<target>/) and the seed corpus
(fuzz/corpus/<target>/) through the fuzz targets, which assert the contract: malformed
input raises `ProtocolError` (identifiers: a failure status), nothing else escapes.

The seeds are PDUs and streams captured from real associations (DCMTK, pynetdicom,
dicomnet; fuzz/capture.py): every captured PDU must also decode without error.
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicomnet.pacs.matching import glob_matches
from dicomnet.proto.pdu import PDataTF, decode_pdu_bytes
from fuzz.targets import TARGETS

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"


def _inputs(kind: str) -> list[tuple[str, Path]]:
    return sorted(
        (target, path)
        for target in TARGETS
        for path in (FUZZ / kind / target).glob("*")
        if path.is_file()
    )


REGRESSIONS = _inputs("regressions")
SEEDS = _inputs("corpus")


def _replay(target: str, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about odd elements
        TARGETS[target](path.read_bytes())


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("target", "path"), REGRESSIONS, ids=lambda v: getattr(v, "name", v))
def test_regression_input_keeps_the_contract(target: str, path: Path) -> None:
    _replay(target, path)


def test_there_are_regression_inputs() -> None:
    assert {target for target, _ in REGRESSIONS} >= {"pdu", "identifier", "dataset"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seed_corpus_keeps_the_contract(target: str) -> None:
    seeds = [path for name, path in SEEDS if name == target]
    assert len(seeds) >= 5, f"fuzz/corpus/{target} is (nearly) empty: rerun fuzz/capture.py"
    for path in seeds:
        _replay(target, path)


def test_every_captured_pdu_decodes() -> None:
    """The PDUs DCMTK, pynetdicom and dicomnet sent in real associations are all valid."""
    seen: set[int] = set()
    for target, path in SEEDS:
        if target != "pdu":
            continue
        pdu = decode_pdu_bytes(path.read_bytes())
        seen.add(int(pdu.pdu_type))
        if isinstance(pdu, PDataTF):
            assert all(pdv.context_id % 2 == 1 for pdv in pdu.values)
    assert seen == {1, 2, 3, 4, 5, 6, 7}, f"PDU types captured: {sorted(seen)}"


# The dataset target's timeout (fuzz/regressions/dataset/worklist-wildcards-backtrack): the
# wildcard matcher was a regular expression of ".*"s, exponential on "*a*a*a*...b".


def _regex_glob(pattern: str, text: str) -> bool:
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern]
    return re.fullmatch("".join(parts), text, re.DOTALL) is not None


@settings(max_examples=500, deadline=None)
@given(st.text("ab*?", max_size=8), st.text("ab", max_size=8))
def test_wildcard_matching_agrees_with_the_regular_expression(pattern: str, text: str) -> None:
    assert glob_matches(pattern, text) == _regex_glob(pattern, text)


@pytest.mark.timeout(10)
def test_wildcard_matching_does_not_backtrack() -> None:
    value = "a" * 63 + "c"
    started = time.perf_counter()
    assert not glob_matches("*a" * 200 + "*b", value)
    assert not glob_matches("*a*a*a*a*a*a*a*a*a*b*", value)
    assert glob_matches("*a*a*a*a*a*a*a*a*a*c", value)
    assert time.perf_counter() - started < 1.0
