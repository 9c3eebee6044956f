"""The embedded SCP's background indexer, in a process and in a thread."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from peers import HOST, describe_cli, run_dicomnet
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicomnet.pacs import scp as pacs
from dicomnet.pacs.index import INDEX_FILE_NAME, Index
from dicomnet.pacs.scp import Indexer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def files(folder: Path, count: int) -> list[Path]:
    source = dcmread(get_testdata_file("CT_small.dcm"))
    paths = []
    for i in range(count):
        source.SOPInstanceUID = generate_uid()
        path = folder / f"{i}.dcm"
        source.save_as(path)
        paths.append(path)
    return paths


def recorded_batches(
    index: Index, monkeypatch: pytest.MonkeyPatch, hold: Callable[[], object] = lambda: None
) -> list[int]:
    """The sizes of the batches given to `index.add_many` (indexing in a thread), in
    order; `hold` runs before each one is indexed."""
    batches: list[int] = []
    add_many = index.add_many

    def recording(batch: list[Path]) -> int:
        batches.append(len(batch))
        hold()
        return add_many(batch)

    monkeypatch.setattr(index, "add_many", recording)
    return batches


@asynccontextmanager
async def running_indexer(
    folder: Path,
    *,
    use_process: bool,
    monkeypatch: pytest.MonkeyPatch | None = None,
    hold: Callable[[], object] = lambda: None,
) -> AsyncIterator[tuple[Index, Indexer, list[int]]]:
    """An index of `folder` and its indexer running in the background, stopped at the
    end of the block; with `monkeypatch`, the sizes of the batches indexed (in order,
    `hold` running before each one)."""
    with Index(folder / INDEX_FILE_NAME, root=folder) as index:
        batches = recorded_batches(index, monkeypatch, hold) if monkeypatch is not None else []
        indexer = Indexer(index, use_process=use_process)
        async with anyio.create_task_group() as tg:
            tg.start_soon(indexer.run)
            await anyio.sleep(0)
            yield index, indexer, batches
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("use_process", [True, False])
async def test_indexer_indexes_everything_before_drain_returns(
    tmp_path: Path, use_process: bool
) -> None:
    paths = files(tmp_path, 30)
    async with running_indexer(tmp_path, use_process=use_process) as (index, indexer, _):
        for path in paths[:10]:
            indexer.add(path)
        await indexer.drain()
        assert len(index) == 10
        for path in paths[10:]:
            indexer.add(path)
        await indexer.drain()
        assert len(index) == 30
        assert (indexer._process is not None) == use_process
    assert indexer._process is None  # the indexer process is stopped with the task


async def test_the_indexer_process_stops_when_idle_and_starts_for_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle `serve` is one process: the indexer process is stopped after
    `INDEXER_IDLE` seconds without a batch, and started again for the next one."""
    monkeypatch.setattr(pacs, "INDEXER_IDLE", 0.5)
    paths = files(tmp_path, 4)
    async with running_indexer(tmp_path, use_process=True) as (index, indexer, _):
        indexer.add(paths[0])
        await indexer.drain()
        first = indexer._process
        assert first is not None and len(index) == 1
        with anyio.fail_after(5):
            while indexer._process is not None or first.poll() is None:
                await anyio.sleep(0.05)
        assert first.returncode == 0  # it ended cleanly, told by the serving process
        for path in paths[1:]:
            indexer.add(path)
        await indexer.drain()
        assert len(index) == 4
        assert indexer._process is not None and indexer._process.pid != first.pid


async def test_stores_of_the_next_moments_share_a_batch_and_a_query_does_not_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = files(tmp_path, 12)
    monkeypatch.setattr(pacs, "INDEX_LINGER", 2.0)
    running = running_indexer(tmp_path, use_process=False, monkeypatch=monkeypatch)
    async with running as (index, indexer, batches):
        for path in paths[:6]:
            indexer.add(path)
            await anyio.sleep(0.02)
        assert batches == []  # still gathering
        await anyio.sleep(2.5)
        assert batches == [6]
        assert len(index) == 6
        for path in paths[6:]:
            indexer.add(path)
        with anyio.fail_after(1.5):  # well under the linger
            await indexer.drain()
        assert batches == [6, 6]
        assert len(index) == 12


async def test_stores_arriving_while_a_batch_is_indexed_wait_for_the_next_linger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under steady load each batch gathers for `INDEX_LINGER`, not only the first one
    after a quiet moment: the stores answered while a batch is being indexed do not
    go at once in a batch of their own."""
    paths = files(tmp_path, 6)
    monkeypatch.setattr(pacs, "INDEX_LINGER", 1.0)
    indexing, proceed = threading.Event(), threading.Event()
    running = running_indexer(
        tmp_path,
        use_process=False,
        monkeypatch=monkeypatch,
        hold=lambda: (indexing.set(), proceed.wait(10)),
    )
    async with running as (index, indexer, batches):
        for path in paths[:3]:
            indexer.add(path)
        assert await anyio.to_thread.run_sync(indexing.wait, 10)
        for path in paths[3:]:  # stored while the first batch is being indexed
            indexer.add(path)
        proceed.set()
        await anyio.sleep(0.2)
        assert batches == [3]  # the next one is still gathering
        await anyio.sleep(1.5)
        assert batches == [3, 3]
        assert len(index) == 6


async def test_the_indexer_pipe_is_watched_once_and_let_go_when_the_process_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The answers' pipe is registered with the event loop once, not per batch. If the
    indexer process ends between batches, the pipe (now at its end, always readable) is
    let go at once, and the next batch is indexed in a thread."""
    paths = files(tmp_path, 9)
    registrations: list[int] = []
    async with running_indexer(tmp_path, use_process=True) as (index, indexer, _):
        loop = asyncio.get_running_loop()
        add_reader = loop.add_reader
        monkeypatch.setattr(
            loop, "add_reader", lambda fd, *a: (registrations.append(fd), add_reader(fd, *a))
        )
        for path in paths[:6]:
            indexer.add(path)
            await indexer.drain()  # a batch each
        assert len(index) == 6
        assert len(registrations) == 1
        process = indexer._process
        assert process is not None
        process.kill()
        await anyio.to_thread.run_sync(process.wait, 10)
        with anyio.fail_after(5):
            while indexer._watching is not None:  # the end of the pipe is noticed
                await anyio.sleep(0.01)
        for path in paths[6:]:
            indexer.add(path)
        await indexer.drain()
        assert len(index) == 9
        assert "indexing in a thread" in caplog.text


# In a fresh interpreter, as in `dicomnet serve`: multiprocessing's resource tracker is not
# running yet when the indexer process is started (starting it touches the signal mask).
_SIGNAL_AT_START = """
import anyio, os, signal, sys
from pathlib import Path
from dicomnet.pacs.index import INDEX_FILE_NAME, Index
from dicomnet.pacs.scp import Indexer

async def main(folder):
    paths = sorted(folder.glob("*.dcm"))
    with Index(folder / INDEX_FILE_NAME, root=folder) as index:
        indexer = Indexer(index, use_process=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(indexer.run)
            await anyio.sleep(0)
            os.killpg(os.getpgid(0), signal.SIGTERM)  # as a stop does: the whole group
            for path in paths:
                indexer.add(path)
            await indexer.drain()
            print(len(index), indexer._connection is not None, indexer._process.poll() is None)
            tg.cancel_scope.cancel()

# This process stays to report (a handler, as `serve` has: unlike an ignored signal, a
# handler is not inherited by the new interpreter).
signal.signal(signal.SIGTERM, lambda signum, frame: None)
anyio.run(main, Path(sys.argv[1]))
"""


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_a_stop_signal_while_the_indexer_process_starts_does_not_kill_it(tmp_path: Path) -> None:
    """SIGTERM or Ctrl-C reach the whole process group, the indexer too; one that comes
    while its interpreter is still starting (before it can ignore them) must not kill it."""
    files(tmp_path, 5)
    done = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AT_START, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # a process group of its own, to signal
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["5", "True", "True"], done.stderr
    assert "indexer process stopped" not in done.stderr


# `dicomnet serve`, with a second SIGTERM arriving as its last batch goes to the indexer.
_SECOND_SIGNAL = """
import os, signal, sys
import anyio
from dicomnet import cli
from dicomnet.pacs import scp as pacs

pacs.INDEX_LINGER = 3600.0  # the first batch goes when serving stops
index_in_process = pacs.Indexer._index_in_process

async def signal_again_first(self, batch):
    os.kill(os.getpid(), signal.SIGTERM)
    await anyio.sleep(0.2)
    return await index_in_process(self, batch)

pacs.Indexer._index_in_process = signal_again_first
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_second_stop_signal_does_not_cut_the_last_indexing_batch(tmp_path: Path) -> None:
    """A second SIGTERM or Ctrl-C while `serve` stops (a `--workers` process gets one from
    its process group and one from the first process) must not kill it before its last
    batch is indexed: the stores answered just before would be missing from the index."""
    folder = tmp_path / "in"
    folder.mkdir()
    files(folder, 3)
    storage = tmp_path / "storage"
    argv = [sys.executable, "-c", _SECOND_SIGNAL, "serve", "-v", "--port", "0"]
    server = subprocess.Popen(
        [*argv, "--storage", str(storage)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert server.stdout is not None
        output = ""
        for line in server.stdout:  # log lines, then the one that says where it listens
            output += line
            found = re.search(r"listening on [0-9.]+:([0-9]+)", line)
            if found is not None:
                break
        assert found is not None, output
        stored = run_dicomnet(["store", HOST, found.group(1), folder])
        assert stored.returncode == 0, describe_cli(stored)
        server.send_signal(signal.SIGTERM)
        output += server.communicate(timeout=30)[0]
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0, output
    assert "already shutting down" in output
    with Index(storage / INDEX_FILE_NAME, root=storage) as index:
        assert len(index) == 3


async def test_drain_without_the_background_task_indexes_inline(tmp_path: Path) -> None:
    paths = files(tmp_path, 3)
    with Index(tmp_path / INDEX_FILE_NAME, root=tmp_path) as index:
        indexer = Indexer(index)
        for path in paths:
            indexer.add(path)
        await indexer.drain()
        assert len(index) == 3
        # In a thread: only the background task starts (and stops) the indexer process.
        assert indexer._process is None and indexer._connection is None


async def test_concurrent_drains_without_the_background_task_all_return(tmp_path: Path) -> None:
    paths = files(tmp_path, 4)
    with Index(tmp_path / INDEX_FILE_NAME, root=tmp_path) as index:
        indexer = Indexer(index)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for path in paths[:2]:
                    indexer.add(path)
                tg.start_soon(indexer.drain)
                await anyio.sleep(0)
                for path in paths[2:]:
                    indexer.add(path)
                tg.start_soon(indexer.drain)
        assert len(index) == 4
        assert indexer._process is None


@pytest.mark.parametrize("use_process", [True, False])
async def test_stopping_the_indexer_indexes_what_is_pending(
    tmp_path: Path, use_process: bool
) -> None:
    """Serving stops (Ctrl-C, SIGTERM) right after stores were answered: their files are
    indexed before the indexer goes, in whatever state its last batch was."""
    paths = files(tmp_path, 40)
    with Index(tmp_path / INDEX_FILE_NAME, root=tmp_path) as index:
        indexer = Indexer(index, use_process=use_process)
        async with anyio.create_task_group() as tg:
            tg.start_soon(indexer.run)
            await anyio.sleep(0)
            for path in paths[:20]:
                indexer.add(path)
            await anyio.sleep(0)  # a batch may now be on its way
            for path in paths[20:]:
                indexer.add(path)
            tg.cancel_scope.cancel()
        assert indexer._process is None
        assert len(index) == 40


# --- several serving processes (`serve --workers N`) -----------------------------------------


async def test_a_query_waits_for_what_another_process_stored_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two serving processes' indexers (two slots of one progress file): a drain in one
    returns only once what the other had handed over is indexed, though that one's batch
    is still gathering."""
    paths = files(tmp_path, 4)
    monkeypatch.setattr(pacs, "INDEX_LINGER", 1.0)
    progress_path = tmp_path / "progress"
    first = pacs.IndexProgress.create(progress_path, 2)
    second = pacs.IndexProgress(progress_path, 1)
    db = tmp_path / INDEX_FILE_NAME
    with Index(db, root=tmp_path) as index_a, Index(db, root=tmp_path) as index_b:
        a = Indexer(index_a, use_process=False, progress=first)
        b = Indexer(index_b, use_process=False, progress=second)
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.run)
            tg.start_soon(b.run)
            await anyio.sleep(0)
            a.add(paths[0])
            for path in paths[1:]:
                b.add(path)  # answered by the other process; its batch lingers 1 s
            started = anyio.current_time()
            with anyio.fail_after(5):
                await a.drain()
            assert len(index_a) == 4
            assert anyio.current_time() - started > 0.5  # it did wait for the other
            assert first.waiting_for(first.handed_by_others()) == []
            tg.cancel_scope.cancel()
    first.close()
    second.close()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
async def test_a_query_does_not_wait_for_a_process_that_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A serving process that ended with files handed over but not indexed (it crashed;
    waited for or still a zombie) is not waited for; one that is running but late is
    waited for at most `PROGRESS_WAIT`, with a warning."""
    paths = files(tmp_path, 2)
    ours = pacs.IndexProgress.create(tmp_path / "progress", 4)
    reaped = subprocess.Popen([sys.executable, "-c", "pass"])
    reaped.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    stat = Path(f"/proc/{zombie.pid}/stat")
    with anyio.fail_after(10):
        while stat.read_bytes().rpartition(b")")[2].split()[0] != b"Z":  # ended, not reaped
            await anyio.sleep(0.01)
    slot_size = pacs.IndexProgress._SLOT.size
    for slot, pid in ((1, reaped.pid), (2, zombie.pid), (3, os.getppid())):
        pacs.IndexProgress._SLOT.pack_into(ours._map, slot * slot_size, pid, 5, 2)
    try:
        with Index(tmp_path / INDEX_FILE_NAME, root=tmp_path) as index:
            indexer = Indexer(index, use_process=False, progress=ours)
            indexer.add(paths[0])
            assert ours.waiting_for(ours.handed_by_others()) == [os.getppid()]
            monkeypatch.setattr(pacs, "PROGRESS_WAIT", 0.3)
            started = anyio.current_time()
            with anyio.fail_after(5):
                await indexer.drain()
            assert 0.25 < anyio.current_time() - started < 3
            assert len(index) == 1
            assert "is late" in caplog.text and str(os.getppid()) in caplog.text
            monkeypatch.setattr(pacs, "PROGRESS_WAIT", 60.0)
            pacs.IndexProgress._SLOT.pack_into(  # the late one catches up
                ours._map, 3 * slot_size, os.getppid(), 5, 5
            )
            indexer.add(paths[1])
            with anyio.fail_after(10):  # not PROGRESS_WAIT: nobody is late any more
                await indexer.drain()
            assert len(index) == 2
    finally:
        zombie.wait()
        ours.close()
