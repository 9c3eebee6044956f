"""`dicomnet serve --index postgresql://...`: two nodes sharing one storage folder and
one PostgreSQL index answer as one archive. What one node acknowledged, the other finds
and retrieves (read-your-writes: a store is answered once it is indexed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import postgres
import pytest
from peers import HOST, ServerFactory, describe_cli, run_dicomnet, storescu
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
)
from qr_peers import findscu, getscu, movescu

import dicomnet
from dicomnet.pacs.index import Index
from dicomnet.pacs.scp import SERVING_MARKER, SPOOL_FOLDER, StorageSCP


def _instances(folder: Path, studies: int, per_study: int) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (Study, Series Instance UID) of new CT instances in `folder`."""
    source = dcmread(get_testdata_file("CT_small.dcm"))
    written: dict[str, tuple[str, str]] = {}
    folder.mkdir()
    for s in range(studies):
        source.StudyInstanceUID = generate_uid()
        source.SeriesInstanceUID = generate_uid()
        for i in range(per_study):
            source.SOPInstanceUID = generate_uid()
            source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
            source.save_as(folder / f"{s}-{i}.dcm")
            study, series = str(source.StudyInstanceUID), str(source.SeriesInstanceUID)
            written[str(source.SOPInstanceUID)] = (study, series)
    return written


def _two_nodes(
    tmp_path: Path, dicomnet_server: ServerFactory, server: Any, *b_args: str
) -> tuple[Any, Any]:
    """Two `serve` nodes (AE title PACS) on one storage folder and one fresh schema of
    `server`'s database; node B also gets `b_args`."""
    url = postgres.fresh_schema(server)
    shared = tmp_path / "shared"
    shared.mkdir()
    common = ["--storage", str(shared), "--index", url, "--no-fsync"]
    node_a = dicomnet_server(aet="PACS", extra_args=[*common, "--node", "node-a"])
    node_b = dicomnet_server(aet="PACS", extra_args=[*common, "--node", "node-b", *b_args])
    nodes = shared / ".tmp" / "nodes"
    assert sorted(p.name for p in nodes.iterdir()) == ["node-a", "node-b"]
    return node_a, node_b


@pytest.mark.dcmtk
@pytest.mark.timeout(180)
def test_two_nodes_answer_as_one_archive(
    tmp_path: Path, dicomnet_server: ServerFactory, storescp: Any, postgresql_server: Any
) -> None:
    dest = storescp(aet="DEST")
    node_a, node_b = _two_nodes(
        tmp_path, dicomnet_server, postgresql_server, "--peer", f"DEST={HOST}:{dest.port}"
    )
    written = _instances(tmp_path / "in", studies=2, per_study=6)

    stored = storescu(node_a.port, [tmp_path / "in"], aec="PACS")
    assert stored.returncode == 0, stored

    # On node B, at once: every instance node A acknowledged.
    uids: set[str] = set()
    for number, (study, series) in enumerate(sorted(set(written.values()))):
        found = findscu(
            node_b.port,
            {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": ""},
            level="IMAGE",
            model="study",
            out_dir=tmp_path / f"found-{number}",
            aec="PACS",
        )
        uids |= {str(ds.SOPInstanceUID) for ds in found.identifiers}
    assert uids == set(written)

    study = next(iter(written.values()))[0]
    moved = movescu(
        node_b.port,
        {"StudyInstanceUID": study},
        level="STUDY",
        model="study",
        dest="DEST",
        aec="PACS",
    )
    assert moved.final is not None and moved.final.status == 0x0000, moved.result
    expected = {uid for uid, (of, _) in written.items() if of == study}
    assert set(dest.received()) == expected

    # And the other study by C-GET on node B (getscu), exactly its instances.
    other = next(of for of, _ in written.values() if of != study)
    got = getscu(
        node_b.port,
        {"StudyInstanceUID": other},
        level="STUDY",
        model="study",
        out_dir=tmp_path / "got",
        aec="PACS",
    )
    assert got.final is not None and got.final.status == 0x0000, got.result
    received = {str(dcmread(p).SOPInstanceUID) for p in (tmp_path / "got").iterdir()}
    assert received == {uid for uid, (of, _) in written.items() if of == other}


@pytest.mark.timeout(120)
def test_a_query_on_one_node_sees_what_the_other_just_acknowledged(
    tmp_path: Path, dicomnet_server: ServerFactory, postgresql_server: Any
) -> None:
    """Store on node A, then at once C-FIND on node B (an association open to each),
    again and again, pynetdicom as the SCU: every query finds the instance acknowledged
    just before, though node A indexes in batches that gather for a while."""
    node_a, node_b = _two_nodes(tmp_path, dicomnet_server, postgresql_server)
    source = dcmread(get_testdata_file("CT_small.dcm"))
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    store = ae.associate(HOST, node_a.port, ae_title="PACS")
    find = ae.associate(HOST, node_b.port, ae_title="PACS")
    assert store.is_established and find.is_established
    missed = []
    try:
        for i in range(20):
            source.SOPInstanceUID = generate_uid()
            assert store.send_c_store(source).Status == 0x0000
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = source.StudyInstanceUID
            query.SeriesInstanceUID = source.SeriesInstanceUID
            query.SOPInstanceUID = source.SOPInstanceUID
            model = StudyRootQueryRetrieveInformationModelFind
            answers = [
                ds
                for status, ds in find.send_c_find(query, model)
                if status is not None and status.Status in (0xFF00, 0xFF01)
            ]
            if len(answers) != 1:
                missed.append(i)
    finally:
        store.release()
        find.release()
    assert missed == []


@pytest.mark.timeout(120)
def test_dicomnet_index_builds_the_index_in_postgresql(
    tmp_path: Path, postgresql_server: Any
) -> None:
    url = postgres.fresh_schema(postgresql_server)
    written = _instances(tmp_path / "storage", studies=2, per_study=3)
    done = run_dicomnet(["index", "--index", url, tmp_path / "storage"])
    assert done.returncode == 0, describe_cli(done)
    assert "indexed 6 instance(s)" in done.stdout
    with Index(url, root=tmp_path / "storage") as index:
        assert index.counts() == (1, 2, 2, 6)
        query = _image(written)
        found = {uid for _, _, uid, _ in index.files("study", "IMAGE", query)}
    assert found == set(query.SOPInstanceUID) and len(found) == 3


def _image(written: dict[str, tuple[str, str]]) -> Dataset:
    """A relational-free IMAGE-level retrieve of the first series written."""
    study, series = next(iter(written.values()))
    query = Dataset()
    query.StudyInstanceUID = study
    query.SeriesInstanceUID = series
    query.SOPInstanceUID = [uid for uid, at in written.items() if at == (study, series)]
    return query


def test_each_node_spools_in_a_folder_of_its_own(
    tmp_path: Path, postgresql_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A node that starts clears its own spool folder only: another node's partial file
    and serving marker stay, and it does not take that marker for a crash of its own.
    A node killed leaves its marker, which its own next start finds."""
    url = postgres.fresh_schema(postgresql_server)
    storage = tmp_path / "storage"
    node_a = StorageSCP(storage, fsync=False, index=url, node="a:11112")
    spool_a = node_a.ae.settings.spool_dir
    assert spool_a is not None
    partial = spool_a / "incoming.part"
    partial.write_bytes(b"a data set arriving")
    node_b = StorageSCP(storage, fsync=False, index=url, node="b:11112")
    try:
        assert spool_a != node_b.ae.settings.spool_dir
        assert partial.exists()
        assert "did not stop cleanly" not in caplog.text
    finally:
        node_b.close()
    node_a.index.close()  # as if killed: its marker stays
    caplog.clear()
    again = StorageSCP(storage, fsync=False, index=url, node="a:11112")
    again.close()
    assert "did not stop cleanly" in caplog.text
    assert not partial.exists()  # its own leftovers, cleared
    assert list((storage / SPOOL_FOLDER).rglob(SERVING_MARKER + "*")) == []


@pytest.mark.timeout(120)
def test_read_your_writes_across_nodes_without_delay(
    tmp_path: Path, dicomnet_server: ServerFactory, postgresql_server: Any
) -> None:
    """The same with dicomnet's SCU, whose C-FIND follows the C-STORE's answer within a
    millisecond or so, well inside the indexer's batching time: only a store answered
    once indexed makes every query find its instance."""
    node_a, node_b = _two_nodes(tmp_path, dicomnet_server, postgresql_server)
    source = dcmread(get_testdata_file("CT_small.dcm"))

    async def store_then_find(rounds: int) -> list[int]:
        missed = []
        async with (
            dicomnet.connect(HOST, node_a.port, aec="PACS") as store,
            dicomnet.connect(HOST, node_b.port, aec="PACS") as find,
        ):
            for i in range(rounds):
                source.SOPInstanceUID = generate_uid()
                assert await store.store(source) == 0x0000
                query = Dataset()
                query.StudyInstanceUID = source.StudyInstanceUID
                query.SeriesInstanceUID = source.SeriesInstanceUID
                query.SOPInstanceUID = source.SOPInstanceUID
                found = [m async for m in find.find(query, model="study", level="IMAGE")]
                if len(found) != 1:
                    missed.append(i)
        return missed

    assert anyio.run(store_then_find, 30) == []


@pytest.mark.timeout(120)
def test_a_store_kept_as_stored_before_is_indexed(
    tmp_path: Path, dicomnet_server: ServerFactory, postgresql_server: Any
) -> None:
    """A file already in the folder but not in the index (its node died between saving
    and indexing it): the sender's retry, answered "kept", indexes it."""
    node, _ = _two_nodes(tmp_path, dicomnet_server, postgresql_server)
    source = dcmread(get_testdata_file("CT_small.dcm"))
    source.SOPInstanceUID = generate_uid()
    source.save_as(tmp_path / "shared" / f"{source.SOPInstanceUID}.dcm")  # not indexed

    async def store_then_find() -> int:
        async with dicomnet.connect(HOST, node.port, aec="PACS") as assoc:
            assert await assoc.store(source) == 0x0000
            query = Dataset()
            query.StudyInstanceUID = source.StudyInstanceUID
            query.SeriesInstanceUID = source.SeriesInstanceUID
            query.SOPInstanceUID = source.SOPInstanceUID
            return len([m async for m in assoc.find(query, model="study", level="IMAGE")])

    assert anyio.run(store_then_find) == 1


def test_dicomnet_delete_with_the_index_in_postgresql(
    tmp_path: Path, postgresql_server: Any
) -> None:
    url = postgres.fresh_schema(postgresql_server)
    storage = tmp_path / "storage"
    written = _instances(storage, studies=2, per_study=3)
    with Index(url, root=storage) as index:
        index.rebuild(storage)
    study = next(iter(written.values()))[0]
    done = run_dicomnet(["delete", "--storage", storage, "--index", url, "--study-uid", study])
    assert done.returncode == 0, describe_cli(done)
    assert "1 study" in done.stdout and "3 instances" in done.stdout
    with Index(url, root=storage) as index:
        assert index.counts().instances == 3
    left = {str(dcmread(p).SOPInstanceUID) for p in storage.glob("*.dcm")}
    assert left == {uid for uid, (of, _) in written.items() if of != study}
    refused = run_dicomnet(["delete", "--storage", storage, "--index", url + "x", "--bench"])
    assert refused.returncode == 2 and "holds no index" in refused.stderr  # not made empty
    assert len(list(storage.glob("*.dcm"))) == 3
