"""The durable queue of `route` (dicomnet.route.queue): files, links, restarts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicomnet.route.queue import Queue, QueueFull


def written(queue: Queue, content: bytes) -> Path:
    path = queue.temp_path()
    path.write_bytes(content)
    return path


def test_one_file_serves_several_destinations_until_each_confirms(tmp_path: Path) -> None:
    queue = Queue(tmp_path, ["archive", "ai"])
    source = written(queue, b"instance")
    entries = queue.put({"archive": source, "ai": source})
    assert not source.exists()  # only the destinations' links are left
    assert [e.path.read_bytes() for e in entries] == [b"instance", b"instance"]
    assert os.stat(entries[0].path).st_ino == os.stat(entries[1].path).st_ino
    queue.done(entries[0])
    assert queue.pending("archive") == []
    assert [e.path.read_bytes() for e in queue.pending("ai")] == [b"instance"]


def test_pending_copies_come_oldest_first_and_survive_a_restart(tmp_path: Path) -> None:
    queue = Queue(tmp_path, ["archive"])
    for n in range(5):
        queue.put({"archive": written(queue, bytes([n]))})
    abandoned = written(queue, b"never acknowledged")
    restarted = Queue(tmp_path, ["archive"])
    assert [e.path.read_bytes() for e in restarted.pending("archive")] == [
        bytes([n]) for n in range(5)
    ]
    assert not abandoned.exists()  # what was being written when it stopped is gone
    assert restarted.status()["archive"].queued == 5


def test_attempts_are_counted_in_the_name_and_dead_letters_come_back(tmp_path: Path) -> None:
    queue = Queue(tmp_path, ["archive"])
    (entry,) = queue.put({"archive": written(queue, b"x")})
    entry = queue.failed(queue.failed(entry))
    assert entry.attempts == 2
    assert Queue(tmp_path, ["archive"]).pending("archive")[0].attempts == 2
    dead = queue.give_up(entry, "C-STORE 0xA700 Out of resources")
    assert dead.path.parent.name == "dead"
    assert dead.path.with_suffix(".reason").read_text() == "C-STORE 0xA700 Out of resources\n"
    status = queue.status()["archive"]
    assert (status.queued, status.dead) == (0, 1)
    assert queue.retry_dead("archive") == 1
    (back,) = queue.pending("archive")
    assert back.attempts == 0 and back.sequence == entry.sequence
    assert queue.status()["archive"].dead == 0


def test_a_full_destination_refuses_and_others_are_unaffected(tmp_path: Path) -> None:
    queue = Queue(tmp_path, ["archive", "ai"], max_queued=2)
    for _ in range(2):
        queue.put({"archive": written(queue, b"a")})
    assert not queue.has_room(["archive"]) and queue.has_room(["ai"])
    source = written(queue, b"b")
    with pytest.raises(QueueFull, match="archive"):
        queue.put({"archive": source, "ai": source})
    assert queue.pending("ai") == []  # nothing half queued
    queue.done(queue.pending("archive")[0])
    queue.put({"archive": source, "ai": source})
    assert queue.status()["archive"].queued == 2


def test_status_says_how_old_the_oldest_copy_is(tmp_path: Path) -> None:
    queue = Queue(tmp_path, ["archive"])
    (entry,) = queue.put({"archive": written(queue, b"12345")})
    queued_at = int(entry.sequence[:20]) / 1e9
    status = queue.status(now=queued_at + 90)["archive"]
    assert status.oldest_age == pytest.approx(90)
    assert status.queued_bytes == 5
    assert Queue(tmp_path / "empty", ["archive"]).status()["archive"].oldest_age is None


def test_removals_are_made_durable_together(tmp_path: Path) -> None:
    queue = Queue(tmp_path, ["archive", "ai"], fsync=True)
    entries = []
    for content in (b"one", b"two", b"three"):
        path = queue.temp_path()
        path.write_bytes(content)
        entries += queue.put({"archive": path, "ai": path})
    for entry in entries:
        queue.done(entry)
    assert queue.pending("archive") == [] and queue.pending("ai") == []
    assert queue.sync_removals() == 2  # one fsync per folder, for three removals each
    assert queue.sync_removals() == 0
