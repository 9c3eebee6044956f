"""Writing received data sets: gathering writes, spooling without copies, shared fsyncs;
reading a file's data set into the PDUs being sent."""

from __future__ import annotations

import errno
import os
import re
import shutil
import threading
import time
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset

from dicomnet import storage
from dicomnet.storage import DatasetReader, Part10File, Spool, write_atomic


def test_write_atomic_writes_every_chunk_in_order(tmp_path: Path) -> None:
    chunks: list[bytes | memoryview] = [b"head", b"", memoryview(b"middle"), b"x" * 100_000]
    target = tmp_path / "a" / "file.dcm"
    write_atomic(target, chunks, fsync=True)
    assert target.read_bytes() == b"headmiddle" + b"x" * 100_000
    assert [p.name for p in target.parent.iterdir()] == ["file.dcm"]  # no temp file left


def test_write_atomic_survives_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_writev = os.writev
    calls = 0

    def short_writev(fd: int, buffers: list[memoryview]) -> int:
        nonlocal calls
        calls += 1
        # At most 3 bytes per call, cutting buffers anywhere.
        taken: list[bytes] = []
        room = 3
        for buffer in buffers:
            piece = bytes(buffer[:room])
            taken.append(piece)
            room -= len(piece)
            if not room:
                break
        return real_writev(fd, taken)

    monkeypatch.setattr(os, "writev", short_writev)
    data = [b"abcde", b"f", b"ghijklmnopq", b"rs"]
    target = tmp_path / "short.dcm"
    write_atomic(target, list(data), fsync=False)
    assert target.read_bytes() == b"".join(data)
    assert calls == -(-len(b"".join(data)) // 3)


@given(
    st.lists(st.integers(min_value=0, max_value=300_000), max_size=12),
)
@settings(max_examples=40, deadline=None)
def test_writes_are_cut_to_at_most_write_bytes_and_keep_every_byte(sizes: list[int]) -> None:
    """Large chunks are cut and small ones gathered, so that no system call writes more
    than `_WRITE_BYTES` (large writes cost several times the system time on Linux)."""
    chunks: list[bytes | memoryview] = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    written: list[int] = []
    read_fd, write_fd = os.pipe()
    received = bytearray()
    real_writev = os.writev

    def recording_writev(fd: int, buffers: list[memoryview]) -> int:
        written.append(sum(len(b) for b in buffers))
        return real_writev(fd, buffers)

    def drain() -> None:
        while block := os.read(read_fd, 1 << 20):
            received.extend(block)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "writev", recording_writev)
            storage._write_all(write_fd, chunks)
    finally:
        os.close(write_fd)
        reader.join(timeout=10)
        os.close(read_fd)
    assert bytes(received) == b"".join(chunks)
    assert all(0 < n <= storage._WRITE_BYTES for n in written)
    # Cut only where needed: one call per full _WRITE_BYTES, and one for the rest.
    assert len(written) == -(-sum(sizes) // storage._WRITE_BYTES)


def test_spooled_fragments_are_written_in_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[int] = []
    real_writev = os.writev

    def recording_writev(fd: int, buffers: list[memoryview]) -> int:
        written.append(sum(len(b) for b in buffers))
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", recording_writev)
    spool = Spool(b"H", threshold=10, directory=tmp_path)
    spool.write(b"a" * 5)
    spool.write(memoryview(b"b" * (3 * storage._WRITE_BYTES + 7)).toreadonly())
    spool.finish()
    assert spool.on_disk
    with spool.open_part10() as f:
        assert f.read() == b"H" + b"a" * 5 + b"b" * (3 * storage._WRITE_BYTES + 7)
    # Header, memory and the rest gathered and cut: no write over _WRITE_BYTES.
    assert written == [*[storage._WRITE_BYTES] * 3, 1 + 5 + 7]
    spool.discard()


@pytest.mark.parametrize("unnamed", [True, False])
def test_write_atomic_replaces_a_file_and_leaves_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    """Both ways: an unnamed file linked under its name (Linux), or a temp file renamed."""
    monkeypatch.setattr(storage, "_unnamed_files", unnamed and storage._unnamed_files)
    target = tmp_path / "file.dcm"
    write_atomic(target, [b"first"], fsync=False)
    write_atomic(target, [b"second"], fsync=True)
    assert target.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["file.dcm"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.skipif(not storage._unnamed_files, reason="no O_TMPFILE here")
def test_write_atomic_names_an_unnamed_file_with_one_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder gets the finished file in one step: no temp name, no rename."""
    renamed: list[object] = []
    monkeypatch.setattr(os, "replace", lambda *args: renamed.append(args))
    write_atomic(tmp_path / "new.dcm", [b"data"], fsync=False)
    assert (tmp_path / "new.dcm").read_bytes() == b"data"
    assert renamed == []
    assert storage._unnamed_files


@pytest.mark.skipif(not storage._unnamed_files, reason="no O_TMPFILE here")
@pytest.mark.parametrize("refusal", ["open", "link"])
def test_write_atomic_falls_back_where_unnamed_files_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:
    """A file system without O_TMPFILE, or no /proc to link from: a temp file and a
    rename, from then on; nothing is left behind."""
    real_open, real_link = os.open, os.link

    def refusing_open(path: str, flags: int, *args: int) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "not supported")
        return real_open(path, flags, *args)

    def refusing_link(source: str, *args: object, **kwargs: object) -> None:
        if source.startswith("/proc/self/fd/"):
            raise FileNotFoundError(errno.ENOENT, "no /proc")
        real_link(source, *args, **kwargs)  # type: ignore[arg-type]

    if refusal == "open":
        monkeypatch.setattr(os, "open", refusing_open)
    else:
        monkeypatch.setattr(os, "link", refusing_link)
    monkeypatch.setattr(storage, "_unnamed_files", True)
    for content in (b"one", b"two"):
        write_atomic(tmp_path / "file.dcm", [content], fsync=False)
        assert (tmp_path / "file.dcm").read_bytes() == content
        assert not storage._unnamed_files
    assert [p.name for p in tmp_path.iterdir()] == ["file.dcm"]


@settings(max_examples=500)
@given(st.text(alphabet=st.sampled_from([*"0123456789.", "a", " ", "\n", "\u00b2", "\u0663"])))
def test_a_valid_uid_is_digits_joined_by_single_dots(uid: str) -> None:
    """PS3.5 §9.1, as the regular expression says it (the check itself does without)."""
    expected = 0 < len(uid) <= 64 and re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid) is not None
    assert storage.is_valid_uid(uid) == expected


def test_spool_keeps_read_only_fragments_and_copies_others(tmp_path: Path) -> None:
    spool = Spool(b"HEADER", threshold=1 << 20, directory=tmp_path)
    frozen = memoryview(bytearray(b"frozen")).toreadonly()
    changing = bytearray(b"change")
    spool.write(frozen)
    spool.write(memoryview(changing))
    spool.write(b"bytes")
    changing[:] = b"XXXXXX"  # its owner reuses the buffer after handing it over
    assert spool.dataset_bytes() == b"frozenchangebytes"
    saved = tmp_path / "saved.dcm"
    spool._save_sync(saved, fsync=False)
    assert saved.read_bytes() == b"HEADERfrozenchangebytes"


@pytest.mark.anyio
@pytest.mark.parametrize("threshold", [1 << 20, 4], ids=["in memory", "spilled to disk"])
async def test_spool_save_to_gives_back_the_path_as_given(tmp_path: Path, threshold: int) -> None:
    """`save_to()` is `save()` for a path given as a string, and returns that string."""
    spool = Spool(b"HEADER", threshold=threshold, directory=tmp_path / "spool")
    spool.write(b"data set")
    spool.finish()
    target = str(tmp_path / "out" / "saved.dcm")
    saved = await spool.save_to(target, fsync=False)
    assert saved == target and isinstance(saved, str)
    assert Path(target).read_bytes() == b"HEADERdata set"
    again = tmp_path / "again.dcm"
    assert await spool.save(again, fsync=False) == again  # save() still gives a Path
    assert again.read_bytes() == b"HEADERdata set"
    spool.close()


def test_spool_spills_to_disk_past_its_threshold(tmp_path: Path) -> None:
    spool = Spool(b"H", threshold=10, directory=tmp_path)
    spool.write(b"12345")
    assert not spool.on_disk
    spool.write(b"678901")
    assert spool.on_disk
    spool.write(b"tail")
    spool.finish()
    assert spool.dataset_bytes() == b"12345678901tail"
    assert spool.size == 15
    spool.close()
    assert list(tmp_path.iterdir()) == []  # the unsaved temp file is gone


def test_concurrent_directory_fsyncs_are_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: every caller returns only after an fsync that started after it asked,
    and concurrent callers share fsyncs instead of queueing one each."""
    syncs: list[tuple[float, float]] = []
    lock = threading.Lock()

    def slow_fsync(directory: Path) -> None:
        start = time.monotonic()
        time.sleep(0.05)
        with lock:
            syncs.append((start, time.monotonic()))

    monkeypatch.setattr(storage, "_fsync_directory_now", slow_fsync)
    asked: dict[int, tuple[float, float]] = {}

    def caller(i: int) -> None:
        time.sleep(0.002 * (i % 5))
        start = time.monotonic()
        storage._fsync_directory(tmp_path)
        asked[i] = (start, time.monotonic())

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(asked) == 30
    assert len(syncs) <= 10  # 30 callers, a handful of fsyncs
    for start, end in asked.values():
        assert any(start <= s and e <= end for s, e in syncs)
    assert storage._directory_syncs._state == {}  # nothing left behind


def _part10(tmp_path: Path, data: bytes, offset: int = 10) -> Part10File:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"H" * offset + data)
    return Part10File(path, "1.2.840.10008.1.2.1", "1.2", "1.2.3", offset, offset + len(data))


def _slots(length: int, chunk: int) -> tuple[bytearray, list[memoryview]]:
    out = bytearray(length)
    view = memoryview(out)
    return out, [view[start : start + chunk] for start in range(0, length, chunk)]


def test_dataset_reader_reads_the_data_set_range_and_leaves_the_rest(tmp_path: Path) -> None:
    data = os.urandom(100_001)
    out, slots = _slots(len(data) + 1, 4096)  # one byte more: a pad byte
    with DatasetReader(_part10(tmp_path, data)) as reader:
        reader.fill(slots)
    assert out == data + b"\x00"


def _written_instance(path: Path, pixels: int) -> Path:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.BitsAllocated = 8
    ds.PixelData = b"\x01" * pixels
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_small_file_is_read_once_and_sent_from_memory(tmp_path: Path) -> None:
    """`Part10File.open` reads a small file whole with its head: its data set is then
    sent from memory, without opening the file again (here: after it was deleted)."""
    path = _written_instance(tmp_path / "small.dcm", 2000)
    whole = path.read_bytes()
    assert Part10File.open(path).contents is None  # opened ahead of sending: not kept
    part10 = Part10File.open(path, keep_contents=True)
    assert part10.contents == whole
    path.unlink()
    out, slots = _slots(part10.dataset_length, 700)
    with DatasetReader(part10) as reader:
        assert reader.fill_cached(slots[:1]) == []
        reader.fill(slots[1:])
    assert out == whole[part10.offset :]


def test_a_file_larger_than_its_head_is_read_from_disk(tmp_path: Path) -> None:
    path = _written_instance(tmp_path / "large.dcm", 20_000)
    part10 = Part10File.open(path, keep_contents=True)
    assert part10.contents is None
    out, slots = _slots(part10.dataset_length, 4096)
    with DatasetReader(part10) as reader:
        reader.fill(slots)
    assert out == path.read_bytes()[part10.offset :]


@pytest.mark.skipif(storage._READ_NOWAIT is None, reason="no preadv2(RWF_NOWAIT) here")
def test_dataset_reader_reads_a_cached_file_without_waiting(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    out, slots = _slots(len(data), 65536)
    with DatasetReader(_part10(tmp_path, data)) as reader:  # just written: in the cache
        left = reader.fill_cached(slots)
        if not reader._cached_reads:  # tmpfs, for one, refuses no-wait reads
            pytest.skip("this file system does not read without waiting (RWF_NOWAIT)")
        assert left == []
    assert out == data


def _flaky_preadv(fail_after: int, error: int) -> tuple[list[int], object]:
    """os.preadv whose no-wait reads serve `fail_after` calls (the first one only half of
    what is asked), then fail with `error`."""
    real = os.preadv
    calls: list[int] = []

    def preadv(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        calls.append(flags)
        if not flags:
            return real(fd, buffers, offset)
        served = len([f for f in calls if f])
        if served > fail_after:
            raise OSError(error, os.strerror(error))
        if served == 1:
            return real(fd, [buffers[0][: max(1, len(buffers[0]) // 2)]], offset)
        return real(fd, buffers, offset)

    return calls, preadv


@pytest.mark.skipif(storage._READ_NOWAIT is None, reason="no preadv2(RWF_NOWAIT) here")
def test_what_the_cache_does_not_hold_is_left_for_a_blocking_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(200_000)
    calls, preadv = _flaky_preadv(3, errno.EAGAIN)  # part of the block is not cached
    monkeypatch.setattr(os, "preadv", preadv)
    out, slots = _slots(len(data), 65536)
    with DatasetReader(_part10(tmp_path, data)) as reader:
        rest = reader.fill_cached(slots)
        assert rest and sum(len(v) for v in rest) < len(data)  # some came from the cache
        reader.fill(rest)  # what a worker thread does
        assert out == data
        # The next block asks the cache again: it may hold it by then.
        before = len(calls)
        reader.position = 10
        reader.fill_cached(_slots(8, 8)[1])
        assert any(calls[before:])


@pytest.mark.skipif(storage._READ_NOWAIT is None, reason="no preadv2(RWF_NOWAIT) here")
@pytest.mark.parametrize("error", [errno.EOPNOTSUPP, errno.EINVAL])
def test_dataset_reader_stops_asking_a_file_system_that_refuses_no_wait_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    data = os.urandom(1000)
    calls, preadv = _flaky_preadv(0, error)
    monkeypatch.setattr(os, "preadv", preadv)
    out, slots = _slots(len(data), 100)
    with DatasetReader(_part10(tmp_path, data)) as reader:
        assert reader.fill_cached(slots) == slots
        asked = len(calls)
        assert reader.fill_cached(slots) == slots
        assert len(calls) == asked  # not asked again
        reader.fill(slots)
    assert out == data


@pytest.mark.skipif(storage._READ_NOWAIT is None, reason="no preadv2(RWF_NOWAIT) here")
def test_dataset_reader_raises_real_read_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _calls, preadv = _flaky_preadv(0, errno.EIO)
    monkeypatch.setattr(os, "preadv", preadv)
    with DatasetReader(_part10(tmp_path, b"x" * 100)) as reader:
        with pytest.raises(OSError) as caught:
            reader.fill_cached(_slots(100, 10)[1])
        assert caught.value.errno == errno.EIO


def test_dataset_reader_notices_a_file_cut_short(tmp_path: Path) -> None:
    part10 = _part10(tmp_path, b"y" * 1000)
    with open(part10.path, "r+b") as f:
        f.truncate(500)
    with DatasetReader(part10) as reader:
        with pytest.raises(OSError, match="changed while it was being sent"):
            reader.fill(_slots(1000, 100)[1])


def test_a_folder_deleted_while_serving_is_made_again(tmp_path: Path) -> None:
    """Nothing about folders is remembered between writes: one removed meanwhile is
    created again, for a spooled data set too."""
    folder = tmp_path / "a" / "b"
    storage.write_atomic(folder / "1.dcm", [b"one"], fsync=True)
    shutil.rmtree(tmp_path / "a")
    storage.write_atomic(folder / "2.dcm", [b"two"], fsync=False)
    assert (folder / "2.dcm").read_bytes() == b"two"
    spool = storage.Spool(b"head", 4, tmp_path)  # past 4 bytes: a temp file
    spool.write(b"a data set")
    spool.finish()
    assert spool.on_disk
    shutil.rmtree(tmp_path / "a")
    saved = anyio.run(lambda: spool.save(folder / "3.dcm", fsync=True))
    assert saved.read_bytes() == b"heada data set"
    spool.close()


def test_a_spool_on_another_file_system_is_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename across file systems fails with EXDEV: the spooled file is copied."""
    real_replace = os.replace
    refused: list[str] = []
    spool_dir = tmp_path / "spool"

    def no_cross_device(src: str, dst: str) -> None:
        if str(src).startswith(str(spool_dir)):
            refused.append(str(src))
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)

    spool_dir.mkdir()
    spool = storage.Spool(b"head", 4, spool_dir)
    spool.write(b"a data set")
    spool.finish()
    monkeypatch.setattr(storage.os, "replace", no_cross_device)
    saved = anyio.run(lambda: spool.save(tmp_path / "out" / "1.dcm", fsync=False))
    assert saved.read_bytes() == b"heada data set" and len(refused) == 1
    spool.close()
