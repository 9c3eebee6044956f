"""The embedded SCP behind `dicomnet serve`: verification, storage to a folder, and
query/retrieve (C-FIND, C-MOVE, C-GET) over an SQLite index of what is stored."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from itertools import islice
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from pydicom.dataset import Dataset

from dicomnet.index import INDEX_FILE_NAME, Index, QueryError
from dicomnet.qr import FindRequest, RetrieveRequest
from dicomnet.server import AE, Server
from dicomnet.service import StoreRequest
from dicomnet.storage import is_valid_uid

__all__ = ["StorageSCP"]

log = logging.getLogger("dicomnet")

# The indexer process runs at this lower priority (nice(2) increment).
INDEXER_NICENESS = 10

# A stored file waits up to this long (seconds) for others to join its indexing batch:
# one trip to the indexer and one SQLite transaction then cover many stores. Queries
# do not wait for it (they drain the queue first).
INDEX_LINGER = 0.02
INDEX_BATCH = 1024  # a batch this long goes at once

SPOOL_FOLDER = ".tmp"
BATCH = 64  # index rows fetched per trip to the worker thread

T = TypeVar("T")


async def _batches(make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Iterate a blocking iterator (an SQLite cursor) in a worker thread, a batch at a time."""
    iterator = await anyio.to_thread.run_sync(make)
    try:
        while True:
            batch = await anyio.to_thread.run_sync(lambda: list(islice(iterator, BATCH)))
            if not batch:
                return
            for item in batch:
                yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            await anyio.to_thread.run_sync(close)


# Signals that stop `serve` (Ctrl-C, SIGTERM to the process group), not its indexer.
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_HAVE_SIGNAL_MASK = hasattr(signal, "pthread_sigmask")  # not on Windows


def _index_worker(database: str, root: str, connection: Connection) -> None:
    """The indexer process: index each batch of paths it is sent, answer with the count.

    It ignores SIGINT/SIGTERM (a Ctrl-C or a signal to the process group): the serving
    process stops it by closing the pipe, after the last batch. It starts with both
    blocked (see `Indexer._start_process`), so one sent while it was starting up is
    dropped here.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if _HAVE_SIGNAL_MASK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    try:
        # Background work: on a busy machine, answering associations comes first.
        os.nice(INDEXER_NICENESS)
    except (AttributeError, OSError):  # pragma: no cover - Windows, or not permitted
        pass
    with Index(database, root=root) as index:
        while True:
            try:
                batch = connection.recv()
            except (EOFError, OSError):  # the serving process is gone
                return
            if batch is None:
                return
            try:
                count = index.add_many(batch)
            except Exception as exc:  # answer anyway: the files stay, a reindex retries
                log.error("could not index %d stored file(s): %s", len(batch), exc)
                count = 0
            try:
                connection.send(count)
            except OSError:  # the serving process is gone; the batch is indexed
                return


class Indexer:
    """Indexes stored files in the background, many per transaction (group commit).

    A C-STORE is answered once its file is safely in place; indexing follows within
    milliseconds. Queries first `drain()` the queue, so a query sees every instance
    whose C-STORE was answered before it. The parsing runs in a process of its own
    (`use_process`), so it does not compete with the event loop for the GIL; in a
    worker thread when that process cannot be started. A batch gathers for
    `INDEX_LINGER` (from its first file, or from the end of the batch before it under
    steady load), less once `INDEX_BATCH` long, and not at all while a query drains
    the queue.
    """

    def __init__(self, index: Index, *, use_process: bool = True) -> None:
        self.index = index
        self.use_process = use_process
        self._pending: list[str] = []
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._drains = 0  # drain() calls waiting: no lingering meanwhile
        self._running = False
        self._process: BaseProcess | None = None
        self._connection: Connection | None = None
        self._answer: asyncio.Future[None] | None = None  # the batch awaiting its answer
        self._watching: asyncio.AbstractEventLoop | None = None  # reading the pipe's answers

    def add(self, path: str | os.PathLike[str]) -> None:
        self._pending.append(os.fspath(path))
        self._idle.clear()
        self._wake.set()
        if len(self._pending) >= INDEX_BATCH:
            self._hurry.set()

    async def drain(self) -> None:
        """Wait until everything added so far is indexed."""
        if not self._running:
            await self._flush()  # nobody runs the background task: index now
        elif self._pending or not self._idle.is_set():
            self._drains += 1
            try:
                self._hurry.set()
                await self._idle.wait()
            finally:
                self._drains -= 1

    def _start_process(self) -> None:
        if not self.use_process:
            return
        try:
            context = multiprocessing.get_context("spawn")
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_index_worker,
                args=(str(self.index.path), str(self.index.root), theirs),
                name="dicomnet-indexer",
                daemon=True,
            )
            # The child inherits this thread's signal mask: with the stop signals blocked,
            # one that reaches the process group while the new interpreter is still
            # starting up (before it can ignore them) stays pending instead of killing it.
            if _HAVE_SIGNAL_MASK:
                # Spawning first starts multiprocessing's resource tracker if it is not
                # running, which unblocks both signals when it is done: start it now.
                resource_tracker.ensure_running()
                previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                process.start()
            finally:
                if _HAVE_SIGNAL_MASK:
                    signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            theirs.close()
        except Exception as exc:
            log.warning("indexing in a thread: could not start the indexer process: %s", exc)
            return
        self._process, self._connection = process, ours

    async def _index_in_process(self, batch: list[str]) -> bool:
        connection = self._connection
        if connection is None:
            return False
        try:
            # The pipe stays watched between batches: registering it for each one cost a
            # dozen system calls per batch (epoll_ctl, ioctl, getpid).
            if self._watching is None:
                self._watching = asyncio.get_running_loop()
                self._watching.add_reader(connection.fileno(), self._answered)
            answer = self._answer = self._watching.create_future()
            connection.send(batch)
            # A batch sent is a batch answered, even when serving stops meanwhile: the
            # answer must not be left in the pipe for the next batch to read.
            with anyio.CancelScope(shield=True):
                try:
                    await answer
                    connection.recv()
                finally:
                    self._answer = None
            return True
        except (EOFError, OSError) as exc:
            log.warning("the indexer process stopped (%s): indexing in a thread", exc)
            self._unwatch()
            self._connection = None
            return False

    def _answered(self) -> None:
        """The pipe is readable: the answer to the batch in flight, or the end of the
        indexer process (then it is no longer watched; the next batch notices)."""
        answer = self._answer
        if answer is not None:
            if not answer.done():
                answer.set_result(None)
        elif self._connection is not None and self._connection.poll(0):
            # Nothing in flight, yet readable: the indexer is gone. (A callback queued
            # before the last answer was read finds nothing to read.)
            self._unwatch()

    def _unwatch(self) -> None:
        if self._watching is not None and self._connection is not None:
            self._watching.remove_reader(self._connection.fileno())
        self._watching = None

    async def _send_batch(self) -> None:
        """Index what is pending now."""
        batch, self._pending = self._pending, []
        try:
            if not await self._index_in_process(batch):
                await anyio.to_thread.run_sync(self.index.add_many, batch)
        except Exception as exc:  # files are kept; `dicomnet index` can retry
            log.error("could not index %d stored file(s): %s", len(batch), exc)
        except BaseException:
            # Cancelled (serving stops): keep the batch for the last flush. Indexing
            # one twice is harmless (an upsert).
            self._pending[:0] = batch
            raise

    async def _flush(self) -> None:
        while self._pending:
            await self._send_batch()
        self._idle.set()

    async def run(self) -> None:
        self._start_process()
        self._running = True
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if not self._hurry.is_set() and not self._drains:
                    # Group commit: let the stores of the next moments join this batch.
                    timer = loop.call_later(INDEX_LINGER, self._hurry.set)
                    try:
                        await self._hurry.wait()
                    finally:
                        timer.cancel()
                self._hurry.clear()
                await self._send_batch()
                if self._pending:  # stored meanwhile: the next batch, which lingers too
                    self._wake.set()
                    if len(self._pending) >= INDEX_BATCH:
                        self._hurry.set()
                else:
                    self._idle.set()
        finally:
            self._running = False
            with anyio.CancelScope(shield=True):
                # Index what was stored before serving stopped, then stop the process.
                await self._flush()
                await self._stop_process()

    async def _stop_process(self) -> None:
        self._unwatch()
        connection, process = self._connection, self._process
        self._connection = self._process = None
        if connection is not None:
            try:
                connection.send(None)
            except OSError:
                pass
            connection.close()
        if process is not None:
            await anyio.to_thread.run_sync(process.join, 5)
            if process.is_alive():
                process.terminate()


class StorageSCP:
    """Stores every received instance as `<storage>/<SOPInstanceUID>.dcm`, bit-preserving,
    indexes it, and answers C-FIND / C-MOVE / C-GET from the index.

    Data sets are spooled in `<storage>/.tmp` (same file system, so the final rename is
    atomic); leftovers of an earlier crash there are removed at start. The index lives
    in `<storage>/.dicomnet-index.sqlite`; a new or outdated one is rebuilt from the files.
    """

    def __init__(
        self,
        storage: Path,
        *,
        ae_title: str = "DICOMNET",
        peers: dict[str, tuple[str, int]] | None = None,
        allowed_calling_ae_titles: Iterable[str] | None = None,
        max_associations: int | None = None,
        fsync: bool = True,
        idle_timeout: float | None = 600.0,
        reindex: bool = False,
        clean_spool: bool = True,
    ) -> None:
        self.storage = storage
        self._storage_folder = str(storage)
        storage.mkdir(parents=True, exist_ok=True)
        spool = storage / SPOOL_FOLDER
        spool.mkdir(exist_ok=True)
        if clean_spool:  # not in a worker: the others may be writing there
            for leftover in spool.glob("*.part"):
                leftover.unlink(missing_ok=True)
            for leftover in storage.glob(".*.part"):
                leftover.unlink(missing_ok=True)
        self.index = Index(storage / INDEX_FILE_NAME, root=storage)
        if reindex or self.index.created:
            count = self.index.rebuild(storage)
            log.info("indexed %d instance(s) in %s", count, storage)
        self.ae = AE(
            ae_title,
            max_associations=max_associations,
            allowed_calling_ae_titles=allowed_calling_ae_titles,
            spool_dir=spool,
            fsync=fsync,
            idle_timeout=idle_timeout,
            peers=peers,
            query_models=("patient", "study"),
        )
        self.indexer = Indexer(self.index)
        self.ae.on_store(self.store)
        self.ae.on_find(self.find)
        self.ae.on_move(self.retrieve)
        self.ae.on_get(self.retrieve)

    @asynccontextmanager
    async def serve(
        self, host: str = "127.0.0.1", port: int = 11112, *, reuse_port: bool = False
    ) -> AsyncIterator[Server]:
        """Serve, with the background indexer running; stops both at the end."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.indexer.run)
            async with self.ae.serve(host, port, reuse_port=reuse_port) as server:
                yield server
            with anyio.CancelScope(shield=True):
                await self.indexer.drain()
            tg.cancel_scope.cancel()

    def close(self) -> None:
        self.index.close()

    async def store(self, request: StoreRequest) -> int | tuple[int, str]:
        uid = request.sop_instance_uid
        if not is_valid_uid(uid):  # also checked before the data set is spooled
            return 0xC000, "invalid SOP Instance UID"
        path = os.path.join(self._storage_folder, f"{uid}.dcm")
        await request.spool.save_to(path, fsync=request.fsync)
        self.indexer.add(path)
        log.info("stored %s.dcm from %r (%d bytes)", uid, request.calling_ae_title, request.size)
        return 0x0000

    async def find(self, request: FindRequest) -> AsyncIterator[Dataset | tuple[Dataset, int]]:
        if request.model not in ("patient", "study"):
            raise QueryError(0xC000, f"the {request.model or 'requested'} model is not served")
        await self.indexer.drain()
        model: Any = request.model
        level: Any = request.level
        identifier = request.identifier
        fill_retrieve_ae = "RetrieveAETitle" in identifier
        async for match in _batches(lambda: self.index.query(model, level, identifier)):
            if fill_retrieve_ae:
                match.RetrieveAETitle = self.ae.ae_title
            yield match

    async def retrieve(self, request: RetrieveRequest) -> AsyncIterator[Path]:
        await self.indexer.drain()
        model: Any = request.model
        level: Any = request.level
        identifier = request.identifier
        async for path, *_ in _batches(lambda: self.index.files(model, level, identifier)):
            yield path
