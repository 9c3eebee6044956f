"""The queue of `route` in PostgreSQL (`SharedQueue`): nodes sharing one queue folder and
one database take each copy once; a node's copies go to another when its lease ends."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import postgres
import pytest

from dicomnet.database import NODES_TABLE, NodeInUse
from dicomnet.route.queue import Entry, QueueFull
from dicomnet.route.shared_queue import QueueUnavailable, SharedQueue


@pytest.fixture
def url(postgresql_server: Any) -> str:
    return postgres.fresh_schema(postgresql_server)


def node(tmp_path: Path, url: str, name: str, **kwargs: Any) -> SharedQueue:
    kwargs.setdefault("fsync", False)
    return SharedQueue(tmp_path / "queue", url, name, ["archive", "ai"], **kwargs)


def put(queue: SharedQueue, *destinations: str, data: bytes = b"DICM") -> list[Entry]:
    source = queue.temp_path()
    source.write_bytes(data)
    return queue.put(dict.fromkeys(destinations or ("archive",), source))


def test_a_copy_is_its_queuing_node_s_until_it_lets_go(tmp_path: Path, url: str) -> None:
    a, b = node(tmp_path, url, "a"), node(tmp_path, url, "b")
    entries = put(a, "archive", "ai")
    assert [e.destination for e in entries] == ["archive", "ai"]
    assert entries[0].path == entries[1].path.parent.parent / "archive" / entries[0].path.name
    assert all(e.path.read_bytes() == b"DICM" for e in entries)
    assert not list(a.tmp.iterdir())  # linked into the destinations' folders, then gone
    assert b.pending("archive") == []  # a's lease holds
    assert a.pending("archive", own=False) == []
    assert [e.row for e in a.pending("archive")] == [entries[0].row]  # a takes its own again
    a.close()  # lets go: b takes both at once
    assert [e.row for e in b.pending("archive")] == [entries[0].row]
    assert [e.row for e in b.pending("ai")] == [entries[1].row]


def test_nodes_taking_at_once_never_take_the_same_copy(tmp_path: Path, url: str) -> None:
    putter = node(tmp_path, url, "putter")
    rows = {e.row for _ in range(300) for e in put(putter)}
    putter.close()
    takers = [node(tmp_path, url, f"taker-{n}") for n in range(4)]
    taken: list[list[Entry]] = [[] for _ in takers]

    def take(n: int) -> None:
        for _ in range(1000):
            if not (batch := takers[n].pending("archive", 7, own=False)):
                return
            taken[n].extend(batch)

    threads = [threading.Thread(target=take, args=(n,)) for n in range(len(takers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [e.row for batch in taken for e in batch]
    assert len(every) == len(rows) == 300 and set(every) == rows  # each once, none left
    assert sum(1 for batch in taken if batch) >= 2  # they did take turns


def test_a_node_that_stops_renewing_loses_its_copies_to_another(tmp_path: Path, url: str) -> None:
    a = node(tmp_path, url, "a", lease=0.5)
    b = node(tmp_path, url, "b", lease=0.5)
    entries = put(a) + put(a)
    assert all(a.holds(e) for e in entries)
    assert b.pending("archive") == []
    time.sleep(0.6)  # a is killed, or cut off: its leases end
    assert not any(a.holds(e) for e in entries)  # a would send nothing now
    taken = b.pending("archive")
    assert [e.row for e in taken] == [e.row for e in entries]
    a.done(entries[0])  # too late: b has it now, its file stays for b
    assert entries[0].path.exists()
    b.done(taken[0])
    assert not taken[0].path.exists()
    a.renew()  # a is back: it holds nothing of b's, and would send none of its copies
    assert not any(a.holds(e) for e in entries)
    assert a.pending("archive") == []
    mine = put(a)
    assert a.holds(mine[0])  # what a takes from now on is its own


def test_renewed_leases_keep_a_node_s_copies(tmp_path: Path, url: str) -> None:
    a = node(tmp_path, url, "a", lease=0.6)
    b = node(tmp_path, url, "b", lease=0.6)
    [entry] = put(a)
    for _ in range(4):
        time.sleep(0.2)
        a.renew()
        assert b.pending("archive") == []
        assert a.holds(entry)


def test_a_restarted_node_takes_back_its_own_copies_at_once(tmp_path: Path, url: str) -> None:
    a = node(tmp_path, url, "a", lease=60)
    entries = put(a)
    again = node(tmp_path, url, "a", lease=60)  # same name, its lease not ended
    assert [e.row for e in again.pending("archive")] == [entries[0].row]


def test_attempts_dead_letters_and_retry(tmp_path: Path, url: str) -> None:
    a = node(tmp_path, url, "a")
    entry = a.failed(a.failed(put(a)[0]))
    assert entry.attempts == 2
    a.close()
    b = node(tmp_path, url, "b")
    [taken] = b.pending("archive")
    assert taken.attempts == 2
    b.give_up(taken, "after 3 attempt(s): refused")
    status = b.status()["archive"]
    assert (status.queued, status.dead) == (0, 1)
    assert b.last_reason("archive") == "after 3 attempt(s): refused"
    assert b.pending("archive") == []
    assert b.retry_dead("archive") == 1
    [back] = b.pending("archive")
    assert (back.row, back.attempts) == (taken.row, 0)
    assert back.path.read_bytes() == b"DICM"


def test_status_counts_copies_bytes_and_age(tmp_path: Path, url: str) -> None:
    a = node(tmp_path, url, "a")
    put(a, "archive", data=b"x" * 100)
    put(a, "archive", "ai", data=b"y" * 10)
    status = a.status(now=time.time() + 5)
    assert (status["archive"].queued, status["archive"].queued_bytes) == (2, 110)
    assert (status["ai"].queued, status["ai"].queued_bytes) == (1, 10)
    age = status["archive"].oldest_age
    assert age is not None and 5 <= age < 60


def test_max_queued_refuses_across_nodes(tmp_path: Path, url: str) -> None:
    a = node(tmp_path, url, "a", max_queued=2)
    b = node(tmp_path, url, "b", max_queued=2)
    put(a)
    put(b)
    assert not a.has_room(["archive"]) and a.has_room(["ai"])
    with pytest.raises(QueueFull):
        put(b)


def test_without_its_database_nothing_is_queued(tmp_path: Path, url: str) -> None:
    a = node(tmp_path, url, "a")
    a._db.url = "postgresql://nobody@127.0.0.1:1/none"  # the server is gone
    a._db.close()
    with pytest.raises(QueueUnavailable):
        put(a)
    assert not list((tmp_path / "queue" / "archive").glob("*.dcm"))  # no copy left behind
    with pytest.raises(QueueUnavailable):
        a.pending("archive")
    renewed = a._renewed
    a.renew()  # logged, not raised; the leases are not counted as renewed
    assert a._renewed == renewed


def test_without_a_database_at_start_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QueueUnavailable, match="the database at postgresql://u:\\*\\*\\*@"):
        SharedQueue(tmp_path, "postgresql://u:secret@127.0.0.1:1/db", "a", ["archive"])


def test_a_look_from_outside_lets_go_of_nothing(tmp_path: Path, url: str) -> None:
    """`route status` and `route retry` open the queue as its node's name, as the
    running router does: closing it must not let go of that router's copies."""
    a = node(tmp_path, url, "a")
    put(a)
    look = node(tmp_path, url, "a", recover=False)
    assert look.status()["archive"].queued == 1
    look.close()
    assert node(tmp_path, url, "b").pending("archive") == []  # still a's


def test_a_confirmation_the_database_missed_is_recorded_once_it_is_back(
    tmp_path: Path, url: str
) -> None:
    """The destination confirmed a copy while the database was away: the row goes (and
    the file) when the database is back, before the next renewal; the copy is not
    left queued, to be sent again or never."""
    a = node(tmp_path, url, "a")
    [entry] = put(a)
    real = a._db.url
    a._db.url = "postgresql://nobody@127.0.0.1:1/none"
    a._db.close()
    a.done(entry)  # logged, owed
    assert entry.path.exists()
    a._db.url = real
    a.renew()
    assert not entry.path.exists()
    assert a.status()["archive"].queued == 0


def test_a_row_whose_file_is_gone_leaves_the_queue(tmp_path: Path, url: str) -> None:
    """A copy's file removed by hand: its row goes too once the forwarder comes to it
    (it had stayed, owned and renewed, counted against max_queued)."""
    import anyio

    from dicomnet.route.config import Destination
    from dicomnet.route.forwarder import Forwarder

    a = node(tmp_path, url, "a")
    [entry] = put(a)
    entry.path.unlink()

    class Sender:
        async def store(self, path: Any) -> int:
            open(path, "rb").close()  # as a Pool does: the file is opened to be sent
            return 0

    async def main() -> None:
        destination = Destination("archive", "ARCHIVE", "127.0.0.1", 104)
        forwarder = Forwarder(a, destination, Sender())
        with anyio.move_on_after(1.0):
            await forwarder.run(rescan_every=0.1)

    a.renew()
    anyio.run(main)
    assert a.status()["archive"].queued == 0


def test_copies_let_go_while_the_database_was_away_are_sent_once_it_is_back(
    tmp_path: Path, url: str
) -> None:
    """The database goes away for longer than the leases: the forwarder sends nothing
    it may no longer hold, and once the database is back it takes its copies again and
    sends them (they had stayed owned, renewed and never sent)."""
    import anyio

    from dicomnet.route.config import Destination
    from dicomnet.route.forwarder import Forwarder

    a = node(tmp_path, url, "a", lease=0.6)
    [entry] = put(a)
    real = a._db.url
    sent: list[str] = []

    class Sender:
        async def store(self, path: Any) -> int:
            sent.append(str(path))
            return 0

    async def renewing() -> None:
        while True:
            await anyio.to_thread.run_sync(a.renew)
            await anyio.sleep(0.2)

    async def main() -> None:
        a._db.url = "postgresql://nobody@127.0.0.1:1/none"  # away
        a._db.close()
        await anyio.sleep(0.6)  # the leases are not surely a's any more
        forwarder = Forwarder(a, Destination("archive", "ARCHIVE", "127.0.0.1", 104), Sender())
        async with anyio.create_task_group() as tg:
            tg.start_soon(renewing)
            tg.start_soon(forwarder.run, 0.1)
            forwarder.add([entry])
            await anyio.sleep(0.5)
            assert sent == []  # nothing sent that it may not hold
            a._db.url = real  # back
            with anyio.move_on_after(5):
                while not sent:
                    await anyio.sleep(0.05)
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert sent == [str(entry.path)]
    assert a.status()["archive"].queued == 0


def _holder(url: str, node: str, host: str, pid: int) -> None:
    """A registration of `node` as held by process `pid` of `host`, seen just now."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(NODES_TABLE)
        conn.execute(
            "INSERT INTO dicomnet_node VALUES ('route', %s, 'held', %s, %s, now())"
            " ON CONFLICT (kind, node) DO UPDATE SET seen = now()",
            (node, host, pid),
        )


def test_a_node_name_in_use_is_refused(tmp_path: Path, url: str) -> None:
    """Two routers given one name would take each other's copies for their own: the
    second is refused, with what to do, while the first runs (seen within a lease)."""
    import os
    import socket

    stop = threading.Event()

    def running() -> None:  # another process of this host, alive, renewing
        while not stop.is_set():
            _holder(url, "a", socket.gethostname(), os.getppid())
            time.sleep(0.1)

    holder = threading.Thread(target=running)
    holder.start()
    try:
        time.sleep(0.2)
        with pytest.raises(NodeInUse, match="give each node a name of its own"):
            node(tmp_path, url, "a", lease=0.4)
    finally:
        stop.set()
        holder.join(5)


def test_a_node_name_is_taken_back_from_a_process_gone(tmp_path: Path, url: str) -> None:
    """Restarted on the same host after a kill: the name is taken at once. Held on
    another host that is no longer seen: taken once its lease is over."""
    import socket
    import subprocess

    done = subprocess.Popen(["true"])
    done.wait()  # its pid: a process of this host that is gone
    _holder(url, "a", socket.gethostname(), done.pid)
    started = time.monotonic()
    node(tmp_path, url, "a", lease=30).close()
    assert time.monotonic() - started < 5
    _holder(url, "b", "another-host", 1)
    started = time.monotonic()
    node(tmp_path, url, "b", lease=0.5).close()
    assert 0.3 < time.monotonic() - started < 5
