"""A C-FIND cannot freeze `serve`: wild card matching takes linear time, and no query
holds the event loop (an echo on another association is answered meanwhile)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
import worklist_data
from hypothesis import given
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import dicomnet
from dicomnet.pacs import index as index_module
from dicomnet.pacs.matching import glob_matches, matches
from dicomnet.pacs.scp import StorageSCP
from dicomnet.pacs.worklist_matching import WorklistQuery

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

EVIL = "*a" * 30 + "*b"  # 2^30-ish paths for a backtracking regular expression
VALUE = "a" * 64


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _regex_reference(pattern: str, text: str) -> bool:
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern]
    return re.fullmatch("".join(parts), text, re.DOTALL) is not None


@given(st.text("ab*?\\[", max_size=8), st.text("ab*?\\[", max_size=10))
def test_the_linear_matcher_agrees_with_the_regular_expression(pattern: str, text: str) -> None:
    assert glob_matches(pattern, text) == _regex_reference(pattern, text)


def test_a_pathological_pattern_is_matched_at_once() -> None:
    start = time.perf_counter()
    assert not glob_matches(EVIL, VALUE)
    assert not matches(EVIL, "LO", VALUE)
    assert matches(EVIL[:-1] + "a", "LO", VALUE)  # 30 `a`s, then any: it matches
    assert not matches("*a" * 200 + "*b", "PN", "a" * 10_000)
    assert time.perf_counter() - start < 1.0


@asynccontextmanager
async def serving(tmp_path: Path, worklist: Path | None = None) -> AsyncIterator[int]:
    scp = StorageSCP(tmp_path / "storage", fsync=False, worklist=worklist)
    try:
        async with scp.serve("127.0.0.1", 0) as server:
            yield server.port
    finally:
        scp.close()


def _instance(**values: str) -> Dataset:
    dataset = dcmread(get_testdata_file("CT_small.dcm"))
    dataset.SOPInstanceUID = generate_uid()
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
    return dataset


async def test_a_pathological_wild_card_c_find_completes(tmp_path: Path) -> None:
    """Against an indexed key (SQL GLOB) and a key read from the files (Python)."""
    stored = _instance(PatientName=VALUE, InstitutionName=VALUE, StudyDescription=VALUE)
    async with serving(tmp_path) as port, dicomnet.connect("127.0.0.1", port) as assoc:
        with anyio.fail_after(20):  # a hang detector: before, this never came back
            await assoc.store(stored)
            for keyword in ("PatientName", "StudyDescription", "InstitutionName"):
                query = Dataset()
                query.QueryRetrieveLevel = "IMAGE"
                query.StudyInstanceUID = stored.StudyInstanceUID
                query.SeriesInstanceUID = stored.SeriesInstanceUID
                query.SOPInstanceUID = ""
                setattr(query, keyword, EVIL)
                assert await assoc.find(query, model="study").collect() == []
                setattr(query, keyword, "*a" * 30 + "*")
                assert len(await assoc.find(query, model="study").collect()) == 1


async def test_an_echo_is_answered_while_a_slow_index_query_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A query whose every response reads a (slow) file: another association's echo is
    answered while it runs."""
    async with serving(tmp_path) as port:
        async with dicomnet.connect("127.0.0.1", port) as assoc, anyio.create_task_group() as tg:
            for _ in range(8):
                stored = _instance(InstitutionName=VALUE)  # one study and series
                await assoc.store(stored)
            read_file = index_module.Index._read_file

            def slow_read(self: index_module.Index, *args: object) -> object:
                time.sleep(0.25)
                return read_file(self, *args)  # type: ignore[arg-type]

            monkeypatch.setattr(index_module.Index, "_read_file", slow_read)
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = stored.StudyInstanceUID
            query.SeriesInstanceUID = stored.SeriesInstanceUID
            query.SOPInstanceUID = ""
            query.InstitutionName = "*a*a*a*"
            done = anyio.Event()

            async def big_query() -> None:
                with anyio.fail_after(30):
                    assert len(await assoc.find(query, model="study").collect()) == 8
                done.set()

            tg.start_soon(big_query)
            await anyio.sleep(0.3)
            with anyio.fail_after(1.0):
                async with dicomnet.connect("127.0.0.1", port) as other:
                    assert await other.echo() == 0
            assert not done.is_set()  # the query was still running


async def test_a_slow_worklist_query_never_holds_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One item takes 2 s to match: the loop keeps ticking, and another association's
    echo is answered meanwhile."""
    folder = tmp_path / "worklist"
    folder.mkdir()
    item = worklist_data.item_dataset(worklist_data.ITEMS[0])
    for n in range(20):
        item.AccessionNumber = f"N{n:04d}"
        item.PatientName = VALUE
        worklist_data.write_part10(item, folder / f"{n:04d}.wl")
    real_match = WorklistQuery.match
    slow_started = threading.Event()

    def slow_match(self: WorklistQuery, candidate: Dataset) -> Dataset | None:
        if candidate.AccessionNumber == "N0001":
            slow_started.set()
            time.sleep(2.0)  # holds whichever thread matches, as a big match would
        return real_match(self, candidate)

    monkeypatch.setattr(WorklistQuery, "match", slow_match)
    query = Dataset()
    query.AccessionNumber = "*N*0*"
    query.PatientName = EVIL
    gaps: list[float] = []
    async with serving(tmp_path, folder) as port, anyio.create_task_group() as tg:
        done = anyio.Event()

        async def big_query() -> None:
            async with dicomnet.connect("127.0.0.1", port) as assoc:
                with anyio.fail_after(30):
                    assert await assoc.find(query, model="mwl").collect() == []
            done.set()

        async def ticker() -> None:
            last = time.monotonic()
            while not done.is_set():
                await anyio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tg.start_soon(big_query)
        tg.start_soon(ticker)
        with anyio.fail_after(20):
            while not slow_started.is_set():
                await anyio.sleep(0.01)
        with anyio.fail_after(1.0):
            async with dicomnet.connect("127.0.0.1", port) as other:
                assert await other.echo() == 0
        assert not done.is_set()
    assert max(gaps) < 1.0  # the 2 s match, on the loop, would show as a 2 s gap
