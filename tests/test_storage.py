"""Writing received data sets: gathering writes, spooling without copies, shared fsyncs."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from dicomnet import storage
from dicomnet.storage import Spool, write_atomic


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
