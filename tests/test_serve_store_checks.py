"""What `serve` refuses to store: data sets that do not parse (C000), data sets whose SOP
Class / Instance UIDs are not the request's (A900), duplicates under `--on-duplicate`,
and a full disk (A700, recovered from by itself)."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import threading
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

import dicomnet
from dicomnet import storage as storage_module
from dicomnet.pacs import scp as scp_module
from dicomnet.pacs.index import INDEX_FILE_NAME, Index
from dicomnet.pacs.scp import StorageSCP
from dicomnet.proto import walk as walk_module
from dicomnet.proto.contexts import PresentationContext
from dicomnet.proto.dimse import CStoreRQ
from dicomnet.proto.walk import MAX_DEPTH, MalformedDataset, walk_bytes
from dicomnet.status import Status
from dicomnet.storage import Spool, encode_dataset

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def ct(**values: object) -> Dataset:
    dataset = dcmread(get_testdata_file("CT_small.dcm"))
    dataset.SOPInstanceUID = generate_uid()
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
    return dataset


# -- the walk, without sockets ------------------------------------------------------------


def nested(depth: int) -> Dataset:
    dataset = Dataset()
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = "1.2.3"
    item = dataset
    for _ in range(depth):
        inner = Dataset()
        inner.CodeValue = "X"
        item.ReferencedImageSequence = DicomSequence([inner])
        item = inner
    return dataset


@pytest.mark.parametrize(
    "syntax", [*SYNTAXES, ExplicitVRBigEndian, "1.2.840.10008.1.2.1.99"], ids=str
)
def test_well_formed_data_sets_walk_and_give_their_uids(syntax: str) -> None:
    dataset = ct()
    dataset.ReferencedImageSequence = DicomSequence([Dataset(), nested(3)])
    data = encode_dataset(dataset, syntax)
    spool = Spool(b"", 1 << 30)
    spool.write(data)
    walked = spool.walk(syntax)
    assert (walked.sop_class_uid, walked.sop_instance_uid) == (
        CTImageStorage,
        dataset.SOPInstanceUID,
    )
    assert walked.elements > len(dataset)


def undefined_length_sequence_with_encapsulated_pixels() -> bytes:
    """Explicit VR LE by hand: an SQ of undefined length holding an item of undefined
    length, then encapsulated pixel data (offset table + two fragments)."""
    uid = b"1.2.3.4\x00"
    parts = [
        b"\x08\x00\x16\x00UI" + len(CTImageStorage.encode()).to_bytes(2, "little"),
        CTImageStorage.encode(),
        b"\x08\x00\x18\x00UI\x08\x00" + uid,
        b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff",  # (0008,1140), undefined length
        b"\xfe\xff\x00\xe0\xff\xff\xff\xff",  # item, undefined length
        b"\x08\x00\x50\x11UI\x04\x001.2\x00",
        b"\xfe\xff\x0d\xe0\x00\x00\x00\x00",  # item delimiter
        b"\xfe\xff\xdd\xe0\x00\x00\x00\x00",  # sequence delimiter
        b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff",  # pixel data, encapsulated
        b"\xfe\xff\x00\xe0\x00\x00\x00\x00",  # empty basic offset table
        b"\xfe\xff\x00\xe0\x04\x00\x00\x00abcd",
        b"\xfe\xff\x00\xe0\x02\x00\x00\x00ef",
        b"\xfe\xff\xdd\xe0\x00\x00\x00\x00",
    ]
    return b"".join(parts)


def test_undefined_lengths_and_encapsulated_pixel_data_walk() -> None:
    data = undefined_length_sequence_with_encapsulated_pixels()
    walked = walk_bytes(data, implicit=False)
    assert walked.sop_instance_uid == "1.2.3.4" and walked.length == len(data)
    # The same over a spool file, read in pieces and seeking past values.
    spool = Spool(b"\x00" * 132, 16)
    for start in range(0, len(data), 7):
        spool.write(data[start : start + 7])
    spool.finish()
    assert spool.on_disk and spool.walk(ExplicitVRLittleEndian) == walked
    spool.discard()


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (os.urandom(4096), None),
        (b"\x08\x00\x18\x00ZZ\x04\x001.2\x00", "is not a VR"),
        (b"\x08\x00\x18\x00UI\x40\x001.2\x00", "ends inside an element"),
        (b"\x08\x00\x20\x00DA\x40\x0020260101", "runs past the end"),
        (b"\x08\x00\x18", "ends inside an element header"),
        (undefined_length_sequence_with_encapsulated_pixels()[:-8], "not closed"),
        (b"\xfe\xff\x0d\xe0\x00\x00\x00\x00", "misplaced delimiter"),
        (b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff\x08\x00\x18\x00UI\x00\x00", "where an item"),
        (b"\x08\x00\x60\x00CS\xff\xff", "runs past the end"),
        (b"\x08\x00\x60\x00OB\x00\x00\xff\xff\xff\xff", "undefined length for VR OB"),
    ],
    ids=[
        "random",
        "bad VR",
        "UID past end",
        "value past end",
        "cut header",
        "open sequence",
        "stray delimiter",
        "not an item",
        "short length",
        "undefined OB",
    ],
)
def test_malformed_data_sets_are_refused(data: bytes, why: str | None) -> None:
    with pytest.raises(MalformedDataset, match=why):
        walk_bytes(data, implicit=False)
    if why is None:  # random bytes: in implicit VR too
        with pytest.raises(MalformedDataset):
            walk_bytes(data, implicit=True)


def test_items_may_not_run_past_their_sequence_and_nesting_is_bounded() -> None:
    data = encode_dataset(nested(2), ExplicitVRLittleEndian)
    walk_bytes(data, implicit=False)
    # Shrink the outer sequence's defined length by 2: its item now runs past it.
    at = data.index(b"\x08\x00\x40\x11SQ\x00\x00") + 8
    length = int.from_bytes(data[at : at + 4], "little")
    shorter = data[:at] + (length - 2).to_bytes(4, "little") + data[at + 4 :]
    with pytest.raises(MalformedDataset, match="past its sequence"):
        walk_bytes(shorter, implicit=False)
    walk_bytes(encode_dataset(nested(MAX_DEPTH), ImplicitVRLittleEndian), implicit=True)
    with pytest.raises(MalformedDataset, match="nested"):
        walk_bytes(encode_dataset(nested(MAX_DEPTH + 1), ImplicitVRLittleEndian), implicit=True)


def test_a_deflated_data_set_that_does_not_inflate_is_refused() -> None:
    spool = Spool(b"", 1 << 20)
    spool.write(b"\xff" * 64)
    with pytest.raises(MalformedDataset, match="inflate"):
        spool.walk("1.2.840.10008.1.2.1.99")
    good = zlib.compress(encode_dataset(ct(), ExplicitVRLittleEndian))[2:-4]
    spool = Spool(b"", 1 << 20)
    spool.write(good[: len(good) // 2])
    with pytest.raises(MalformedDataset):
        spool.walk("1.2.840.10008.1.2.1.99")


# -- the SCP ------------------------------------------------------------------------------


@asynccontextmanager
async def serving(
    storage: Path, *, spool_threshold: int | None = None, **options: object
) -> AsyncIterator[tuple[StorageSCP, int]]:
    scp = StorageSCP(storage, fsync=False, **options)  # type: ignore[arg-type]
    if spool_threshold is not None:
        scp.ae.settings = dataclasses.replace(scp.ae.settings, spool_threshold=spool_threshold)
    try:
        async with scp.serve("127.0.0.1", 0) as server:
            yield scp, server.port
    finally:
        scp.close()


CONTEXTS = [
    PresentationContext(uid, [syntax])
    for uid in (CTImageStorage, MRImageStorage)
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
] + [PresentationContext("1.2.840.10008.1.1")]


async def raw_store(
    assoc: dicomnet.Association, sop_class: str, sop_instance: str, data: bytes
) -> tuple[Status, str | None]:
    """A C-STORE whose command says `sop_class` / `sop_instance`, with `data` as the data
    set, whatever it holds (Explicit VR Little Endian context)."""
    context = assoc.context_for(sop_class, ExplicitVRLittleEndian)
    assert context is not None

    async def send(message: object) -> None:
        await assoc.send_message(context.context_id, message, data)  # type: ignore[arg-type]

    response, _ = await assoc.send_request(
        context, lambda mid: CStoreRQ(mid, sop_class, sop_instance, 0, None, None), send
    )
    return Status(response.status), response.error_comment  # type: ignore[attr-defined]


def stored_files(storage: Path) -> set[str]:
    return {p.name for p in storage.rglob("*") if p.is_file() and p.suffix in (".dcm", ".part")}


async def test_a_data_set_claiming_another_instance_is_refused(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    victim = ct(PatientName="Victim^Vera")
    intruder = ct(PatientName="Intruder^Ian", SOPInstanceUID=victim.SOPInstanceUID)
    other_uid = generate_uid()
    async with serving(storage) as (scp, port):
        async with dicomnet.connect("127.0.0.1", port, contexts=CONTEXTS) as assoc:
            with anyio.fail_after(20):
                assert await assoc.store(victim) == 0
                data = encode_dataset(intruder, ExplicitVRLittleEndian)
                status, text = await raw_store(assoc, CTImageStorage, other_uid, data)
                assert status == 0xA900 and text and "Instance UID" in text
                # The right instance UID under another SOP class is refused as well.
                mr = encode_dataset(ct(SOPInstanceUID=other_uid), ExplicitVRLittleEndian)
                status, text = await raw_store(assoc, MRImageStorage, other_uid, mr)
                assert status == 0xA900 and text and "Class UID" in text
                await scp.indexer.drain()
    assert stored_files(storage) == {f"{victim.SOPInstanceUID}.dcm"}
    with Index(storage / INDEX_FILE_NAME, root=storage) as index:
        rows = list(index.files("study", "IMAGE", _image_query(victim)))
    assert [path.name for path, *_ in rows] == [f"{victim.SOPInstanceUID}.dcm"]
    kept = dcmread(storage / f"{victim.SOPInstanceUID}.dcm")
    assert kept.PatientName == "Victim^Vera"


def _image_query(dataset: Dataset) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = dataset.StudyInstanceUID
    query.SeriesInstanceUID = dataset.SeriesInstanceUID
    query.SOPInstanceUID = dataset.SOPInstanceUID
    return query


@pytest.mark.parametrize("spool_threshold", [1 << 20, 1024], ids=["memory", "spooled"])
async def test_garbage_is_refused_and_nothing_is_left(tmp_path: Path, spool_threshold: int) -> None:
    storage = tmp_path / "storage"
    good = encode_dataset(ct(), ExplicitVRLittleEndian)
    async with serving(storage, spool_threshold=spool_threshold) as (scp, port):
        async with dicomnet.connect("127.0.0.1", port, contexts=CONTEXTS) as assoc:
            with anyio.fail_after(20):
                for data in (os.urandom(20_000), good[: len(good) // 2], b""):
                    uid = generate_uid()
                    status, text = await raw_store(assoc, CTImageStorage, uid, data)
                    assert status == 0xC000, (status, text)
                    assert text
                assert await assoc.echo() == 0  # the association goes on
                assert await assoc.store(ct()) == 0
                await scp.indexer.drain()
                assert len(scp.index) == 1
    assert len(stored_files(storage)) == 1


@pytest.mark.parametrize(
    ("policy", "status", "kept"),
    [("keep", 0x0000, "First"), ("replace", 0x0000, "Second"), ("reject", 0x0111, "First")],
)
async def test_duplicates_follow_the_policy(
    tmp_path: Path, policy: str, status: int, kept: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="dicomnet")
    storage = tmp_path / "storage"
    first = ct(PatientName="First")
    second = ct(PatientName="Second", SOPInstanceUID=first.SOPInstanceUID)
    async with serving(storage, on_duplicate=policy) as (scp, port):
        async with dicomnet.connect("127.0.0.1", port) as assoc:
            with anyio.fail_after(20):
                assert await assoc.store(first) == 0
                if status:
                    with pytest.raises(dicomnet.DimseError) as caught:
                        await assoc.store(second)
                    assert caught.value.status == status
                else:
                    assert await assoc.store(second) == 0
                await scp.indexer.drain()
                query = _image_query(first)
                query.PatientName = ""
                found = await assoc.find(query, model="study").collect()
    assert [str(f.PatientName) for f in found] == [kept]
    assert dcmread(storage / f"{first.SOPInstanceUID}.dcm").PatientName == kept
    assert stored_files(storage) == {f"{first.SOPInstanceUID}.dcm"}
    said = {"keep": "kept the stored", "replace": "replaced", "reject": "stored already"}
    assert said[policy] in caplog.text


# -- a full disk --------------------------------------------------------------------------


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("spool_threshold", [1 << 20, 1024], ids=["memory", "spooled"])
async def test_no_space_is_out_of_resources_and_the_server_recovers(
    tmp_path: Path, spool_threshold: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC injected where each path writes: A700, nothing partial, then success."""
    storage = tmp_path / "storage"
    async with serving(storage, spool_threshold=spool_threshold) as (scp, port):
        async with dicomnet.connect("127.0.0.1", port, contexts=CONTEXTS) as assoc:
            with anyio.fail_after(20):
                with monkeypatch.context() as patch:
                    if spool_threshold < 4096:  # creating the spool file fails
                        patch.setattr(Spool, "_spill", _no_space)
                    else:  # writing the Part-10 file fails
                        patch.setattr("dicomnet.storage._write_all", _no_space)
                    with pytest.raises(dicomnet.DimseError) as caught:
                        await assoc.store(ct())
                    assert caught.value.status == 0xA700
                    assert "out of resources" in (caught.value.error_comment or "")
                assert stored_files(storage) == set()
                assert await assoc.store(ct()) == 0  # space is back
                await scp.indexer.drain()
    assert len(stored_files(storage)) == 1


async def test_a_data_set_spooled_to_disk_is_written_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the spool threshold a data set is written to disk in a worker thread, a
    batch at a time: a disk that takes 0.1 s per write does not stop the event loop."""
    real = storage_module._write_all
    loop_thread = threading.get_ident()
    on_loop: list[bool] = []

    def slow(fd: int, chunks: list[bytes | memoryview]) -> None:
        on_loop.append(threading.get_ident() == loop_thread)
        time.sleep(0.1)
        real(fd, chunks)

    monkeypatch.setattr(storage_module, "_write_all", slow)
    monkeypatch.setattr(Spool, "WRITE_BATCH", 64 * 1024)
    storage = tmp_path / "storage"
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    dataset = ct(PixelData=b"\x01\x02" * 150_000)  # 300 KB
    async with serving(storage, spool_threshold=1024) as (scp, port):
        async with dicomnet.connect("127.0.0.1", port, contexts=CONTEXTS) as assoc:
            async with anyio.create_task_group() as tg:
                tg.start_soon(tick)
                with anyio.fail_after(20):
                    assert await assoc.store(dataset) == 0
                tg.cancel_scope.cancel()
            await scp.indexer.drain()
    assert on_loop and not any(on_loop)  # every spool write ran in a worker thread
    assert ticks >= 5 * len(on_loop)  # the loop went on meanwhile (0.1 s each: ~10 ticks)
    saved = [p for p in storage.rglob("*.dcm")]
    assert len(saved) == 1
    assert dcmread(saved[0]).PixelData == dataset.PixelData


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
    )
    return result.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("spool_threshold", [1 << 20, 4096], ids=["memory", "spooled"])
async def test_a_really_full_disk(
    tmp_path: Path, spool_threshold: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2 MiB tmpfs holds the storage folder (and its index) and a ballast file: stores
    of 200 KB until it is full get A700, nothing partial is left; once the ballast is
    removed, storing works again, and every acknowledged instance is found by C-FIND
    (the index batches that failed meanwhile are retried)."""
    monkeypatch.setattr(scp_module, "RETRY_FIRST", 0.2)
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "2m"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        storage = disk / "storage"
        source = ct()
        source.PixelData = os.urandom(200_000)
        source.Rows, source.Columns = 100, 1000
        statuses: list[int] = []
        acknowledged: set[str] = set()

        async def store() -> int:
            source.SOPInstanceUID = generate_uid()
            try:
                status = await assoc.store(source)
            except dicomnet.DimseError as exc:
                return exc.status
            acknowledged.add(source.SOPInstanceUID)
            return status

        async with serving(storage, spool_threshold=spool_threshold) as (scp, port):
            (disk / "ballast").write_bytes(bytes(1_000_000))
            async with dicomnet.connect("127.0.0.1", port) as assoc:
                with anyio.fail_after(40):
                    for _ in range(8):
                        statuses.append(await store())
                    assert 0xA700 in statuses and statuses[0] == 0, statuses
                    assert set(statuses) <= {0, 0xA700}, statuses
                    assert [p for p in storage.rglob("*.part")] == []
                    (disk / "ballast").unlink()  # space is back
                    assert await store() == 0
                    assert await store() == 0
                    assert await assoc.echo() == 0
                    query = Dataset()
                    query.QueryRetrieveLevel = "IMAGE"
                    query.StudyInstanceUID = source.StudyInstanceUID
                    query.SeriesInstanceUID = source.SeriesInstanceUID
                    query.SOPInstanceUID = ""
                    found: set[str] = set()
                    while found != acknowledged:  # failed index batches are retried
                        await anyio.sleep(0.2)
                        responses = await assoc.find(query, model="study").collect()
                        found = {str(r.SOPInstanceUID) for r in responses}
            assert scp.indexer.all_indexed
        stored = {p.name[: -len(".dcm")] for p in storage.glob("*.dcm")}
        assert stored == acknowledged
        for path in storage.glob("*.dcm"):  # every file there is complete
            assert len(dcmread(path).PixelData) == 200_000
    finally:
        with suppress(OSError):
            subprocess.run(["umount", str(disk)], check=False, capture_output=True)


# -- calling AE titles --------------------------------------------------------------------


@pytest.mark.parametrize("title", ["EVIL\\AE", "LINE\nBREAK", "CTRL\x01", "TAB\tAE", "\x7fDEL"])
async def test_a_calling_ae_title_with_forbidden_characters_is_rejected(
    tmp_path: Path, title: str
) -> None:
    async with serving(tmp_path / "storage") as (_scp, port):
        with anyio.fail_after(20):
            with pytest.raises(dicomnet.AssociationRejected) as caught:
                async with dicomnet.connect("127.0.0.1", port, aet=title):
                    pass
            refusal = caught.value
            assert (refusal.result, refusal.source, refusal.reason) == (1, 1, 3)
            async with dicomnet.connect("127.0.0.1", port, aet="GOOD AE") as assoc:
                assert await assoc.store(ct()) == 0
    (stored,) = (tmp_path / "storage").glob("*.dcm")
    assert dcmread(stored).file_meta.SourceApplicationEntityTitle == "GOOD AE"


@pytest.mark.parametrize(
    ("title", "written"),
    [("EVIL\\AE", "EVIL_AE"), ("A\nB\r\x00", "A_B__"), ("  PACS  ", "PACS"), ("Ünï", "_n_")],
)
def test_the_file_meta_never_carries_a_forbidden_ae_title(title: str, written: str) -> None:
    from io import BytesIO

    from pydicom.filereader import _read_file_meta_info, read_preamble

    from dicomnet.storage import is_valid_ae_title, part10_header

    header = part10_header(CTImageStorage, "1.2.3", ExplicitVRLittleEndian, title)
    stream = BytesIO(header)
    read_preamble(stream, False)
    meta = _read_file_meta_info(stream)
    assert meta.SourceApplicationEntityTitle == written
    assert is_valid_ae_title(written)


async def test_serve_on_duplicate_reject_from_the_command_line(tmp_path: Path) -> None:
    from peers import start_dicomnet_server

    server = start_dicomnet_server(tmp_path, extra_args=["--on-duplicate", "reject"])
    try:
        first = ct(PatientName="First")
        again = ct(PatientName="Again", SOPInstanceUID=first.SOPInstanceUID)
        with anyio.fail_after(30):
            async with dicomnet.connect("127.0.0.1", server.port) as assoc:
                assert await assoc.store(first) == 0
                with pytest.raises(dicomnet.DimseError) as caught:
                    await assoc.store(again)
                assert caught.value.status == 0x0111
    finally:
        assert server.stop() == 0
    assert dcmread(server.storage / f"{first.SOPInstanceUID}.dcm").PatientName == "First"
    assert "stored already (--on-duplicate reject)" in server.log_text()


def _outcome(data: bytes, implicit: bool) -> object:
    try:
        return walk_bytes(data, implicit=implicit)
    except MalformedDataset as exc:
        return str(exc)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
    st.lists(st.tuples(st.integers(0, 50_000), st.integers(0, 255)), max_size=4),
    st.integers(0, 50_000),
)
def test_the_fast_path_walks_as_the_general_one(
    syntax: str, flips: list[tuple[int, int]], cut: int
) -> None:
    """Damaged data sets (bytes changed, cut short): the walk with its tight loop for
    plain elements gives the same result, or the same error, as without it."""
    dataset = _CORRUPTIBLE[syntax]
    data = bytearray(dataset)
    for at, value in flips:
        data[at % len(data)] = value
    damaged = bytes(data[: max(cut, len(data) // 2)])
    implicit = syntax == ImplicitVRLittleEndian
    fast = _outcome(damaged, implicit)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(walk_module._Walk, "skim", lambda self, frame: False)
        assert _outcome(damaged, implicit) == fast


def _corruptible(syntax: str) -> bytes:
    dataset = ct()
    dataset.ReferencedImageSequence = DicomSequence([Dataset(), nested(2)])
    return encode_dataset(dataset, syntax)


_CORRUPTIBLE = {syntax: _corruptible(syntax) for syntax in SYNTAXES}
