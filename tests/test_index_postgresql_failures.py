"""The index on PostgreSQL when things go wrong: the server restarts, a value the
database cannot hold, two nodes writing at once, a password in the URL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import postgres
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import dicomnet
from dicomnet.database import redacted
from dicomnet.pacs import index_db, indexer_process
from dicomnet.pacs.index import SCHEMA_VERSION, Index
from dicomnet.pacs.index_db import SchemaTooNew
from dicomnet.pacs.mpps import MPPSRecords
from dicomnet.pacs.scp import StorageSCP


def _write(folder: Path, **attrs: object) -> Path:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path)
    return path


def _patients(index: Index, name: str = "*") -> list[str]:
    query = Dataset()
    query.PatientID = ""
    query.PatientName = name
    return [str(m.PatientName) for m in index.query("patient", "PATIENT", query)]


@pytest.fixture(scope="module")
def own_server() -> Iterator[postgres.Server]:
    """A server of this module's own: one test restarts it."""
    why = postgres.missing()
    if why is not None:
        pytest.skip(why)
    server = postgres.Server()
    server.start()
    yield server
    server.stop()


@pytest.mark.timeout(120)
def test_the_index_and_mpps_go_on_after_the_server_restarts(
    tmp_path: Path, own_server: postgres.Server
) -> None:
    url = postgres.fresh_schema(own_server)
    with Index(url, root=tmp_path) as index:
        mpps = MPPSRecords(url)
        index.add(_write(tmp_path, PatientName="Before^Restart"))
        assert _patients(index) == ["Before^Restart"]  # a reader is kept for later
        own_server.restart()
        index.add(_write(tmp_path, PatientName="After^Restart", PatientID="P2"))
        assert sorted(_patients(index)) == ["After^Restart", "Before^Restart"]
        assert mpps.get("1.2.3") is None
        mpps.close()


def test_a_nul_in_a_value_is_dropped_and_the_batch_goes_in(
    tmp_path: Path, postgresql_server: Any
) -> None:
    url = postgres.fresh_schema(postgresql_server)
    paths = [_write(tmp_path, PatientID=f"P{i}", PatientName=f"Good^{i}") for i in range(3)]
    paths.append(_write(tmp_path, PatientID="P9", PatientName="Nul\x00^Name"))
    with Index(url, root=tmp_path) as index:
        assert index.add_many(paths) == 4
        assert _patients(index, "nul*") == ["Nul^Name"]


@pytest.mark.timeout(60)
def test_two_nodes_add_side_by_side(tmp_path: Path, postgresql_server: Any) -> None:
    """Adding transactions of two nodes run at once (a shared advisory lock)."""
    url = postgres.fresh_schema(postgresql_server)
    path = _write(tmp_path)
    with Index(url, root=tmp_path) as node_a, Index(url, root=tmp_path) as node_b:
        with node_a._write(adding=True):
            writer = threading.Thread(target=node_b.add, args=(path,))
            writer.start()
            writer.join(10)
            assert not writer.is_alive(), "node B waited for node A's adding transaction"
        assert node_a.counts().instances == 1


@pytest.mark.timeout(60)
def test_a_prune_waits_for_the_other_node_s_additions(
    tmp_path: Path, postgresql_server: Any
) -> None:
    """Node A is adding an instance to a study (its transaction open); node B removes
    that study's only instance, which would leave it empty: B's prune waits for A's
    commit, then finds the study not empty, and keeps it with A's instance."""
    url = postgres.fresh_schema(postgresql_server)
    first = _write(tmp_path)
    ds = dcmread(first)
    second = _write(tmp_path, StudyInstanceUID=ds.StudyInstanceUID, PatientID=ds.PatientID)
    with Index(url, root=tmp_path) as node_a, Index(url, root=tmp_path) as node_b:
        node_a.add(first)
        removed = threading.Event()
        with node_a._write(adding=True) as conn:
            node_a._writer.store_all(conn, list(node_a._readable([second])))
            remover = threading.Thread(
                target=lambda: (node_b.remove(ds.SOPInstanceUID), removed.set())
            )
            remover.start()
            time.sleep(0.5)
            assert not removed.is_set(), "node B pruned while node A was adding"
        remover.join(10)
        assert removed.is_set()
        counts = node_a.counts()
        assert (counts.studies, counts.instances) == (1, 1)  # the study kept, A's in it


@pytest.mark.timeout(60)
def test_a_series_moved_by_one_node_while_another_adds_it(
    tmp_path: Path, postgresql_server: Any
) -> None:
    """Node A is adding series S under study T1 of patient P1 (not committed yet); node
    B adds S under study T2 of patient P2 at the same moment. B waits for A, sees S
    under T1 once A committed, and moves it: T1 and P1, left empty, are pruned."""
    url = postgres.fresh_schema(postgresql_server)
    series = generate_uid()
    first = _write(tmp_path, SeriesInstanceUID=series, PatientID="P1")
    second = _write(tmp_path, SeriesInstanceUID=series, PatientID="P2")
    with Index(url, root=tmp_path) as node_a, Index(url, root=tmp_path) as node_b:
        with node_a._write(adding=True) as conn:
            node_a._writer.store_all(conn, list(node_a._readable([first])))
            adder = threading.Thread(target=node_b.add, args=(second,))
            adder.start()
            time.sleep(0.5)  # B is waiting on A's new row
        adder.join(10)
        assert not adder.is_alive()
        counts = node_a.counts()
    assert (counts.patients, counts.studies, counts.series, counts.instances) == (1, 1, 1, 2)


@pytest.mark.timeout(60)
def test_writers_of_two_nodes_take_turns(tmp_path: Path, postgresql_server: Any) -> None:
    """A node's write waits for another node's open write transaction that may delete
    (an exclusive advisory lock): pruning an emptied patient cannot delete what the
    other is adding to it."""
    url = postgres.fresh_schema(postgresql_server)
    path = _write(tmp_path)
    with Index(url, root=tmp_path) as node_a, Index(url, root=tmp_path) as node_b:
        done = threading.Event()
        with node_a._write():
            writer = threading.Thread(target=lambda: (node_b.add(path), done.set()))
            writer.start()
            time.sleep(0.5)
            assert not done.is_set(), "node B wrote while node A's transaction was open"
        writer.join(10)
        assert done.is_set() and node_b.counts().instances == 1


@pytest.mark.timeout(60)
def test_a_write_waits_for_its_turn_a_while_only(
    tmp_path: Path, postgresql_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node's write that waits too long for another's (a rebuild, say) fails, so that
    the stores it was for are refused and sent again rather than left hanging."""
    import psycopg

    monkeypatch.setattr(index_db, "WRITE_WAIT", 0.5)
    url = postgres.fresh_schema(postgresql_server)
    path = _write(tmp_path)
    with Index(url, root=tmp_path) as node_a, Index(url, root=tmp_path) as node_b:
        with node_a._write():
            started = time.monotonic()
            with pytest.raises(psycopg.errors.LockNotAvailable):
                node_b.add(path)
            assert time.monotonic() - started < 5
        node_b.add(path)  # its turn now
        assert node_a.counts().instances == 1


@pytest.mark.timeout(60)
def test_a_node_starts_after_a_long_write_of_another(
    tmp_path: Path, postgresql_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening the index waits for a write longer than `WRITE_WAIT` (another node's
    rebuild): only the writes after it give up."""
    monkeypatch.setattr(index_db, "WRITE_WAIT", 0.3)
    url = postgres.fresh_schema(postgresql_server)
    with Index(url, root=tmp_path) as node_a:
        holding = threading.Event()

        def long_write() -> None:
            with node_a._write():
                holding.set()
                time.sleep(1.0)

        writer = threading.Thread(target=long_write)
        writer.start()
        holding.wait(5)
        with Index(url, root=tmp_path) as node_b:  # waited, then opened
            assert not node_b.created
        writer.join(5)


@pytest.mark.timeout(60)
def test_a_newer_schema_without_these_tables_is_refused(
    tmp_path: Path, postgresql_server: Any
) -> None:
    url = postgres.fresh_schema(postgresql_server)
    Index(url, root=tmp_path).close()
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"UPDATE dicomnet_schema SET version = {SCHEMA_VERSION + 1}")
        conn.execute("DROP TABLE instance, series, study, patient")  # renamed, say
    with pytest.raises(SchemaTooNew):
        Index(url, root=tmp_path)


@pytest.mark.timeout(60)
def test_a_batch_ended_by_a_deadlock_is_stored_again(
    tmp_path: Path, postgresql_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = postgres.fresh_schema(postgresql_server)
    with Index(url, root=tmp_path) as index:
        store_all = index._writer.store_all
        calls: list[int] = []

        def deadlocked_once(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise index._db.contended("deadlock detected")  # type: ignore[operator]
            return store_all(*args, **kwargs)

        monkeypatch.setattr(index._writer, "store_all", deadlocked_once)
        assert index.add_many([_write(tmp_path)]) == 1
        assert len(calls) == 2 and index.counts().instances == 1


@pytest.mark.timeout(60)
def test_a_prune_that_fails_leaves_the_batch_indexed(
    tmp_path: Path, postgresql_server: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """An instance moved to another study: its old study is to be pruned after; if that
    fails, the move is indexed all the same (the store is not refused), and the old
    study waits for a reconcile."""
    url = postgres.fresh_schema(postgresql_server)
    path = _write(tmp_path)
    with Index(url, root=tmp_path) as index:
        index.add(path)
        moved = _write(tmp_path, SOPInstanceUID=dcmread(path).SOPInstanceUID)

        def failing(*args: Any) -> int:
            raise index._db.errors("connection lost")

        monkeypatch.setattr(index._writer, "prune", failing)
        assert index.add_many([moved]) == 1
        assert "stay until a reconcile" in caplog.text
        monkeypatch.undo()
        assert index.counts().instances == 1 and index.counts().studies == 2
        index.reconcile()
        assert index.counts().studies == 1


def test_no_password_in_logs_or_on_a_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "postgresql://pacs:s3cret@db.example:5432/archive?options=-csearch_path%3Dx"
    assert (
        redacted(url) == "postgresql://pacs:***@db.example:5432/archive?options=-csearch_path%3Dx"
    )
    assert redacted("postgresql://pacs@db/archive") == "postgresql://pacs@db/archive"
    started: list[Any] = []

    class Popen:
        def __init__(self, argv: list[str], **kwargs: Any) -> None:
            started.append((argv, kwargs["env"]))

    monkeypatch.setattr(indexer_process.subprocess, "Popen", Popen)
    indexer_process.spawn_indexer(url, "/storage")
    ((argv, env),) = started
    assert all("s3cret" not in arg for arg in argv)
    assert url in env.values()


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_a_store_whose_indexing_failed_is_not_answered_success(
    tmp_path: Path, postgresql_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a database other nodes query, success means findable on every node: a store
    whose indexing fails is refused (0xA700, the file kept), and the sender's retry,
    answered "kept", indexes it."""
    url = postgres.fresh_schema(postgresql_server)
    scp = StorageSCP(tmp_path / "storage", fsync=False, index=url, node="n1")
    scp.indexer.use_process = False  # indexing in this process, where it can fail
    add_many = scp.index.add_many
    failures = [RuntimeError("connection lost mid-batch")]

    def failing_once(items: Any) -> int:
        if failures:
            raise failures.pop()
        return add_many(items)

    monkeypatch.setattr(scp.index, "add_many", failing_once)
    source = dcmread(get_testdata_file("CT_small.dcm"))
    source.SOPInstanceUID = generate_uid()
    query = Dataset()
    query.StudyInstanceUID = source.StudyInstanceUID
    query.SeriesInstanceUID = source.SeriesInstanceUID
    query.SOPInstanceUID = source.SOPInstanceUID
    try:
        async with scp.serve("127.0.0.1", 0) as server:
            async with dicomnet.connect("127.0.0.1", server.port, aec="DICOMNET") as assoc:
                with pytest.raises(dicomnet.DimseError) as refused:
                    await assoc.store(source)
                assert refused.value.status == 0xA700
                assert (tmp_path / "storage" / f"{source.SOPInstanceUID}.dcm").exists()
                assert await assoc.store(source) == 0x0000  # kept, and indexed now
                found = [m async for m in assoc.find(query, model="study", level="IMAGE")]
                assert len(found) == 1
    finally:
        scp.close()


def test_a_value_the_database_refuses_costs_only_its_record(
    tmp_path: Path, postgresql_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch holding a value PostgreSQL cannot take (here text that is not valid
    Unicode) is stored again record by record: the others go in."""
    url = postgres.fresh_schema(postgresql_server)
    good = [_write(tmp_path, PatientID=f"P{i}", PatientName=f"Good^{i}") for i in range(3)]
    bad = _write(tmp_path, PatientID="P9")
    dataset = dcmread(bad, stop_before_pixels=True)
    dataset.PatientName = "Bad\udcff^Name"  # a lone surrogate: no UTF-8 for it
    with Index(url, root=tmp_path) as index:
        assert index.add_many([*good, (bad, dataset)]) == 3
        assert sorted(_patients(index)) == ["Good^0", "Good^1", "Good^2"]
    assert "not indexed" in caplog.text
