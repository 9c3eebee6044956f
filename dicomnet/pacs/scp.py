"""The embedded SCP behind `dicomnet serve`: verification, storage to a folder,
query/retrieve (C-FIND, C-MOVE, C-GET) over an SQLite index of what is stored, and the
Modality Worklist (C-FIND, PS3.4 Annex K) over a folder of items."""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from itertools import islice
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from pydicom.dataset import Dataset

from dicomnet.database import node_folder
from dicomnet.pacs.commitments import (
    COMMITMENTS_FOLDER,
    DatabaseReportStore,
    FolderReportStore,
    check_stored,
)
from dicomnet.pacs.index import INDEX_FILE_NAME, Index, QueryError
from dicomnet.pacs.indexer_process import spawn_indexer
from dicomnet.pacs.mpps import MPPSRecords
from dicomnet.pacs.worklist import WorklistFolder
from dicomnet.server import AE, Server
from dicomnet.services.commitment import CommitmentSCP, report_contexts
from dicomnet.services.mpps import MPPSSCP
from dicomnet.services.qr import (
    FIND_MODELS,
    GET_MODELS,
    MOVE_MODELS,
    FindRequest,
    RetrieveRequest,
)
from dicomnet.services.storage import StoreRequest
from dicomnet.storage import fsync_directory, is_valid_uid

__all__ = ["StorageSCP"]

log = logging.getLogger("dicomnet")

# A stored file waits up to this long (seconds) for others to join its indexing batch:
# one trip to the indexer and one SQLite transaction then cover many stores. Queries
# do not wait for it (they drain the queue first).
INDEX_LINGER = 0.02
INDEX_BATCH = 1024  # a batch this long goes at once
# The indexer process is stopped after this many seconds without a batch to index, and
# started again for the next one: an idle `serve` is one process.
INDEXER_IDLE = 30.0
# A batch whose indexing failed (a full disk) is tried again after this many seconds,
# doubling up to RETRY_MAX.
RETRY_FIRST = 1.0
RETRY_MAX = 30.0

SPOOL_FOLDER = ".tmp"
# In SPOOL_FOLDER, one per serving process (`serving-<slot>.<pid>`), from start to a clean stop
# with everything indexed: one left at start says what was stored may not all be indexed.
SERVING_MARKER = "serving-"
PROGRESS_FILE = "index-progress"  # in SPOOL_FOLDER, with `serve --workers N`
# With an index in PostgreSQL, SPOOL_FOLDER/NODES_FOLDER/<node> is each node's spool.
NODES_FOLDER = "nodes"


# A query waits at most this long (seconds) for another serving process's stores to be
# indexed: a process that hangs must not stop every query.
PROGRESS_WAIT = 10.0
BATCH = 64  # index rows fetched per trip to the worker thread
# A C-STORE of a data set this small, held in memory and not fsynced, is checked and saved
# on the event loop: quicker than a trip to a worker thread.
INLINE_STORE = 64 * 1024
#: What `serve --on-duplicate` may say for an instance stored already.
DUPLICATE_POLICIES = ("keep", "replace", "reject")

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


class IndexProgress:
    """How far each process of `serve --workers N` has indexed what it stored, in a file
    every one of them maps: for each, its process ID, how many stored files it has
    handed to its indexer and how many of those are indexed.

    A C-STORE is answered after its file is handed over; a query waits until every
    other process has indexed as many files as it had handed over when the query came.
    So a query sees each instance whose C-STORE was answered before it, whichever
    process stored it. Each process writes only its own slot.
    """

    _SLOT = struct.Struct("<QQQ")  # process ID, handed over, indexed

    def __init__(self, path: Path, slot: int) -> None:
        self.path = path
        self.slot = slot
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)
        self.slots = len(self._map) // self._SLOT.size
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} of {self.slots}")
        self._offset = slot * self._SLOT.size
        self._pid = os.getpid()  # once: each store writes the slot
        self._handed = self._indexed = 0
        self._write()

    @classmethod
    def create(cls, path: Path, slots: int) -> IndexProgress:
        """A new file of `slots` empty slots, with slot 0 taken by this process."""
        path.write_bytes(bytes(cls._SLOT.size * slots))
        return cls(path, 0)

    def _write(self) -> None:
        self._SLOT.pack_into(self._map, self._offset, self._pid, self._handed, self._indexed)

    def handed(self) -> None:
        self._handed += 1
        self._write()

    def indexed(self, count: int) -> None:
        self._indexed += count
        self._write()

    def _others(self) -> Iterator[tuple[int, int, int, int]]:
        """(slot, process ID, handed over, indexed) of the other processes."""
        for slot in range(self.slots):
            if slot != self.slot:
                yield slot, *self._SLOT.unpack_from(self._map, slot * self._SLOT.size)

    def handed_by_others(self) -> dict[int, int]:
        """{slot: files handed over} of the other processes."""
        return {slot: handed for slot, _, handed, _ in self._others()}

    def waiting_for(self, handed: dict[int, int]) -> list[int]:
        """The process IDs of those that have not yet indexed as many as in `handed`
        (and are still running: what a crashed process stored is not waited for)."""
        return [
            pid
            for slot, pid, _, indexed in self._others()
            if indexed < handed.get(slot, 0) and _is_running(pid)
        ]

    def close(self) -> None:
        self._map.close()


def _is_running(pid: int) -> bool:
    """Whether process `pid` is alive (a zombie, ended but not yet waited for, is not)."""
    if pid <= 0:  # a slot no process has taken yet
        return False
    if os.name == "nt":  # pragma: no cover - signal 0 would end the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists (not ours to signal)
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):  # no /proc here
        return True


class Indexer:
    """Indexes stored files in the background, many per transaction (group commit).

    A C-STORE is answered once its file is safely in place; indexing follows within
    milliseconds. Queries first `drain()` the queue, so a query sees every instance
    whose C-STORE was answered before it. The parsing runs in a process of its own
    (`use_process`), so it does not compete with the event loop for the GIL; in a
    worker thread when that process cannot be started. The process is stopped after
    `INDEXER_IDLE` seconds without a batch, and started again for the next one. A batch gathers for
    `INDEX_LINGER` (from its first file, or from the end of the batch before it under
    steady load), less once `INDEX_BATCH` long, and not at all while a query drains
    the queue.
    """

    def __init__(
        self, index: Index, *, use_process: bool = True, progress: IndexProgress | None = None
    ) -> None:
        self.index = index
        self.use_process = use_process
        self.progress = progress
        self._pending: list[str] = []
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()
        self._drains = 0  # `through` calls waiting: no lingering meanwhile
        self._running = False
        self._process: subprocess.Popen[bytes] | None = None
        self._connection: Connection | None = None
        self._process_failed = False  # then in a thread from now on
        self._answer: asyncio.Future[None] | None = None  # the batch awaiting its answer
        self._watching: asyncio.AbstractEventLoop | None = None  # reading the pipe's answers
        # False once a stored file could not be indexed (a damaged file): it is kept, and
        # the next start tries again.
        self.complete = True
        # Batches whose indexing failed (a full disk): tried again after `_retry_delay`.
        self._retry: list[str] = []
        self._retry_at = 0.0
        self._retry_delay = RETRY_FIRST
        # Files added, and files whose batch has been through (indexed, or failed), in
        # the order added: a file's ticket (`add`) is through once `_through` reaches it.
        self._added = 0
        self._through = 0
        self._batch_done = asyncio.Event()

    @property
    def all_indexed(self) -> bool:
        """Whether every file handed over was indexed (none pending, none failed)."""
        return self.complete and not self._pending and not self._retry

    def add(self, path: str | os.PathLike[str]) -> int:
        """Index `path` soon; its ticket, for `through`."""
        path = os.fspath(path)
        if self._retry and path in self._retry:  # indexed with this batch instead
            self._retry.remove(path)
        self._pending.append(path)
        if self.progress is not None:
            self.progress.handed()
        self._wake.set()
        if len(self._pending) >= INDEX_BATCH:
            self._hurry.set()
        self._added += 1
        return self._added

    async def through(self, ticket: int) -> None:
        """Wait until the file of `ticket` has been through indexing (`failed` says
        whether it was indexed), and no longer: not for the files added after it."""
        if not self._running:
            await self._flush()  # nobody runs the background task: index now
            return
        self._drains += 1
        try:
            while self._through < ticket:
                self._hurry.set()
                await self._batch_done.wait()
        finally:
            self._drains -= 1

    async def drain(self, *, others: bool = True) -> None:
        """Wait until everything added so far is indexed, and with `progress` (unless not
        `others`), everything the other serving processes had added by now."""
        progress = self.progress if others else None
        handed = progress.handed_by_others() if progress is not None else None
        await self.through(self._added)
        if handed:
            await self._wait_for_others(handed)

    async def _wait_for_others(self, handed: dict[int, int]) -> None:
        assert self.progress is not None
        with anyio.move_on_after(PROGRESS_WAIT):
            while self.progress.waiting_for(handed):
                # Another process's batch lingers at most INDEX_LINGER, then is indexed.
                await anyio.sleep(0.002)
            return
        log.warning(
            "indexing by process(es) %s is late: a query goes on without it",
            ", ".join(map(str, self.progress.waiting_for(handed))),
        )

    def _start_process(self) -> None:
        """Start the indexer process (unless it could not be started or died before)."""
        if not self.use_process or self._process_failed or self._process is not None:
            return
        try:
            self._process, self._connection = spawn_indexer(
                self.index.location, str(self.index.root)
            )
        except Exception as exc:
            self._process_failed = True
            log.warning("indexing in a thread: could not start the indexer process: %s", exc)
            return
        log.debug("indexer process %d started", self._process.pid)

    async def _index_in_process(self, batch: list[str]) -> int | None:
        """How many of `batch` the indexer process indexed; None if there is none."""
        if self._connection is None and self._running:
            # Only `run()` starts (and stops) the process, and only its loop sends
            # batches meanwhile: one batch in flight at a time. A `drain()` without
            # `run()` indexes in a thread.
            self._start_process()
        connection = self._connection
        if connection is None:
            return None
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
                    count: int = connection.recv()
                finally:
                    self._answer = None
            return count
        except (EOFError, OSError) as exc:
            log.warning("the indexer process stopped (%s): indexing in a thread", exc)
            self._unwatch()
            self._connection = None
            self._process_failed = True
            return None

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
            count = await self._index_in_process(batch)
            if count is None:
                count = await anyio.to_thread.run_sync(self.index.add_many, batch)
            if count < 0:  # the indexer process could not write (it logged why)
                self._retry_later(batch)
            elif count < len(batch):  # damaged files (logged): the next start tries again
                self.complete = False
        except Exception as exc:  # files are kept; indexing them is tried again
            log.error("could not index %d stored file(s): %s", len(batch), exc)
            self._retry_later(batch)
        except BaseException:
            # Cancelled (serving stops): keep the batch for the last flush. Indexing
            # one twice is harmless (an upsert).
            self._pending[:0] = batch
            raise
        if self.progress is not None:
            self.progress.indexed(len(batch))
        self._through += len(batch)
        self._batch_done.set()
        self._batch_done = asyncio.Event()

    def failed(self, path: str) -> bool:
        """Whether indexing `path` failed (it is tried again later)."""
        return path in self._retry

    def _retry_later(self, batch: list[str]) -> None:
        """Index `batch` again later (backing off): e.g. once disk space is back."""
        self._retry.extend(batch)
        delay = self._retry_delay
        self._retry_at = time.monotonic() + delay
        self._retry_delay = min(delay * 2, RETRY_MAX)
        if self._running:
            asyncio.get_running_loop().call_later(delay, self._wake.set)

    async def _retry_failed(self) -> None:
        batch, self._retry = self._retry, []
        try:
            count = await anyio.to_thread.run_sync(self.index.add_many, batch)
        except Exception as exc:
            log.warning("indexing %d stored file(s) failed again: %s", len(batch), exc)
            self._retry_later(batch)
            return
        log.info("indexed %d stored file(s) whose indexing had failed", count)
        self._retry_delay = RETRY_FIRST
        if count < len(batch):
            self.complete = False

    async def _flush(self) -> None:
        while self._pending:
            await self._send_batch()

    async def run(self) -> None:
        self._start_process()
        self._running = True
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not await self._woken():
                    continue
                self._wake.clear()
                if self._retry and time.monotonic() >= self._retry_at:
                    await self._retry_failed()
                if not self._pending:
                    continue  # woken to retry only
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
        finally:
            self._running = False
            with anyio.CancelScope(shield=True):
                # Index what was stored before serving stopped, then stop the process.
                await self._flush()
                if self._retry:
                    await self._retry_failed()  # a last try; else the next start does it
                await self._stop_process()

    async def _woken(self) -> bool:
        """Wait for work; False if the indexer process was stopped instead, after
        `INDEXER_IDLE` seconds without any (the next batch starts one again)."""
        if self._process is None:
            await self._wake.wait()
            return True
        with anyio.move_on_after(INDEXER_IDLE):
            await self._wake.wait()
            return True
        log.debug("indexer process idle for %g s: stopped", INDEXER_IDLE)
        await self._stop_process()
        return False

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
            try:
                await anyio.to_thread.run_sync(process.wait, 5)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    await anyio.to_thread.run_sync(process.wait, 5)
                except subprocess.TimeoutExpired:  # pragma: no cover - ignores SIGTERM
                    process.kill()
                    await anyio.to_thread.run_sync(process.wait)


class StorageSCP:
    """Stores every received instance as `<storage>/<SOPInstanceUID>.dcm`, bit-preserving,
    indexes it, and answers C-FIND / C-MOVE / C-GET from the index; also a Storage
    Commitment Push Model SCP over the stored files (`commitment`) and an MPPS SCP whose
    instances are kept in the index database (`mpps`).

    Data sets are spooled in `<storage>/.tmp` (same file system, so the final rename is
    atomic); leftovers of an earlier crash there are removed at start. A C-STORE is
    answered once its file is in place, before it is indexed: after a crash (`kill -9`),
    or a stop with indexing left undone, the next start first indexes the stored files
    the index lacks (a marker per serving process in `.tmp` says whether it stopped
    cleanly), so every acknowledged instance is found by queries again. The index lives
    in `<storage>/.dicomnet-index.sqlite`; a new or outdated one is rebuilt from the files.

    `processes` > 1: this is the first of that many processes serving `storage` (`serve
    --workers N`); `process_slot` k > 0: it is the k-th of them, started after the first.
    Their queries then also wait for what the others stored (see `IndexProgress`).

    `worklist`: a folder of worklist items (`WorklistFolder`); the AE then also accepts the
    Modality Worklist model, and its C-FINDs are answered from the folder.

    `index`: a PostgreSQL URL for the index instead of the SQLite file; several nodes
    (named by `node`, the host name by default) may then share `storage` and the
    database: each spools in `<storage>/.tmp/nodes/<node>`, and a C-STORE is answered
    once its instance is indexed.

    Each data set is walked before it is answered (`StoreRequest.check`): one that does
    not parse is refused (C000), one whose SOP Class / Instance UIDs are not the
    request's too (A900). `on_duplicate` says what happens to an instance whose file
    exists already: "keep" the stored copy (success; the one received is dropped, as
    Orthanc does by default), "replace" it, or "reject" the new one with 0111 (Duplicate
    SOP Instance, PS3.7 Annex C). A full disk is answered A700 (Out of Resources).
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
        idle_timeout: float | None = 60.0,
        reindex: bool = False,
        clean_spool: bool = True,
        processes: int = 1,
        process_slot: int = 0,
        worklist: Path | None = None,
        on_duplicate: str = "keep",
        index: str | None = None,
        node: str | None = None,
    ) -> None:
        if on_duplicate not in DUPLICATE_POLICIES:
            raise ValueError(f"on_duplicate must be one of {DUPLICATE_POLICIES}")
        self.on_duplicate = on_duplicate
        self.storage = storage
        self.worklist = WorklistFolder(worklist) if worklist is not None else None
        self._storage_folder = str(storage)
        storage.mkdir(parents=True, exist_ok=True)
        spool = storage / SPOOL_FOLDER
        reports: DatabaseReportStore | FolderReportStore
        if index is not None:
            # Nodes sharing the storage folder and the database: each spools and keeps
            # its serving markers in a folder of its own, and its undelivered storage
            # commitment reports as rows of its own, and clears or resends only those.
            node = node or socket.gethostname()
            spool = spool / NODES_FOLDER / node_folder(node)
            reports = DatabaseReportStore(index, node)
        else:
            reports = FolderReportStore(storage / COMMITMENTS_FOLDER, fsync=fsync)
        self._reports = reports
        spool.mkdir(parents=True, exist_ok=True)
        if clean_spool:  # not in a worker: the others may be writing there
            for leftover in spool.glob("*.part"):
                leftover.unlink(missing_ok=True)
            for leftover in storage.glob(".*.part") if index is None else ():
                leftover.unlink(missing_ok=True)
        # `index`: a PostgreSQL URL (`dicomnet.pacs.index_db`); the SQLite file by default.
        self.index = Index(index or storage / INDEX_FILE_NAME, root=storage)
        stale = sorted(spool.glob(SERVING_MARKER + "*")) if clean_spool else []
        if reindex or self.index.created:
            count = self.index.rebuild(storage)
            log.info("indexed %d instance(s) in %s", count, storage)
        elif stale:
            # Killed (or out of disk) last time: stored files the index lacks, at most the
            # last moments' worth, are indexed now, before anything is answered.
            count = self.index.reconcile(storage)
            log.warning(
                "serving did not stop cleanly last time: indexed %d stored file(s) that "
                "the index lacked",
                count,
            )
        for marker in stale:
            marker.unlink(missing_ok=True)
        self._marker = spool / f"{SERVING_MARKER}{process_slot}.{os.getpid()}"
        self._marker.touch()
        if fsync:
            fsync_directory(spool)
        self.ae = AE(
            ae_title,
            max_associations=max_associations,
            allowed_calling_ae_titles=allowed_calling_ae_titles,
            spool_dir=spool,
            fsync=fsync,
            idle_timeout=idle_timeout,
            peers=peers,
            query_models=("patient", "study", "mwl") if worklist else ("patient", "study"),
        )
        # SOP Class Extended Negotiation (PS3.4 §C.5.1.1.2, §C.5.2.1.2, §C.5.3.1.2): the
        # index does relational queries and retrieves, and combined date-time matching.
        for model in ("patient", "study"):
            self.ae.sop_class_extended[FIND_MODELS[model]] = b"\x01\x01"
            self.ae.sop_class_extended[MOVE_MODELS[model]] = b"\x01"
            self.ae.sop_class_extended[GET_MODELS[model]] = b"\x01"
        # One process of several serving this storage (`serve --workers N`) on SQLite,
        # where a store is answered before it is indexed: the first makes the file
        # where each says how far it has indexed (see IndexProgress), for a query to
        # wait on. With a database that nodes share, a store is answered once indexed
        # (`_indexed_now`): the database is all the processes need.
        self.progress: IndexProgress | None = None
        if index is None and processes > 1 and process_slot == 0:
            self.progress = IndexProgress.create(spool / PROGRESS_FILE, processes)
        elif index is None and process_slot > 0:
            self.progress = IndexProgress(spool / PROGRESS_FILE, process_slot)
        self.indexer = Indexer(self.index, progress=self.progress)
        self.ae.on_store(self.store)
        self.ae.on_find(self.find)
        self.ae.on_move(self.retrieve)
        self.ae.on_get(self.retrieve)
        self._first_process = process_slot == 0
        self.commitment = CommitmentSCP(
            lambda references: check_stored(storage, references),
            reports,
            ae_title=ae_title,
            connect=self._report_association,
        )
        self.commitment.install(self.ae.handlers)
        # MPPS instances, in a table of the index database (PS3.4 Annex F).
        self.mpps = MPPSRecords(index or storage / INDEX_FILE_NAME)
        MPPSSCP(self.mpps).install(self.ae.handlers)

    def _report_association(self, ae_title: str) -> Any:
        """An association to a storage commitment requestor, to send its report on
        (PS3.4 §J.3.3): to its `--peer` address, with us as SCP by role selection."""
        address = self.ae.peers.get(ae_title.strip())
        if address is None:
            return None
        host, port = address
        return self.ae.connect(host, port, aec=ae_title, contexts=report_contexts())

    @asynccontextmanager
    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 11112,
        *,
        reuse_port: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> AsyncIterator[Server]:
        """Serve (over TLS with `tls`), with the background indexer running; stops both
        at the end."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.indexer.run)
            # With `--workers`, the first process alone resends what was left undelivered.
            await tg.start(partial(self.commitment.run, resume=self._first_process))
            async with self.ae.serve(host, port, reuse_port=reuse_port, tls=tls) as server:
                yield server
            with anyio.CancelScope(shield=True):
                await self.indexer.drain(others=False)
            tg.cancel_scope.cancel()

    def close(self) -> None:
        if self.indexer.all_indexed:
            self._marker.unlink(missing_ok=True)  # a clean stop: everything is indexed
        self.index.close()
        self.mpps.close()
        self._reports.close()
        if self.progress is not None:
            self.progress.close()

    async def store(self, request: StoreRequest) -> int | tuple[int, str]:
        """Check the data set (`StoreRequest.check`), then keep it as `<uid>.dcm` as
        `on_duplicate` says when that file exists already."""
        uid = request.sop_instance_uid
        if not is_valid_uid(uid):  # also checked before the data set is spooled
            return 0xC000, "invalid SOP Instance UID"
        path = os.path.join(self._storage_folder, f"{uid}.dcm")
        if request.spool.on_disk or request.fsync or request.size >= INLINE_STORE:
            outcome = await anyio.to_thread.run_sync(self._keep, request, path)
        else:  # small, in memory, no fsync: quicker here than a trip to a worker thread
            outcome = self._keep(request, path)
        if outcome is not None:
            if outcome == 0x0000 and self.index.path is None:
                # Kept as stored before: by a node that may have died before indexing it.
                return await self._indexed_now(path) or outcome
            return outcome
        ticket = self.indexer.add(path)
        if self.index.path is None:
            refused = await self._indexed_now(path, ticket)
            if refused is not None:
                return refused
        log.info("stored %s.dcm from %r (%d bytes)", uid, request.calling_ae_title, request.size)
        return 0x0000

    async def _indexed_now(self, path: str, ticket: int | None = None) -> tuple[int, str] | None:
        """With a database other nodes query too, a C-STORE is answered once its instance
        is indexed, so that a query on any node after the answer finds it (it joins the
        next batch: concurrent stores share a transaction, and none waits for the stores
        that came after it). None once indexed; a failure status (the file is kept) when
        indexing failed, so that the sender tries again (PS3.4 Annex C: Refused, Out of
        Resources). `ticket`: the path's, when added already."""
        if ticket is None:
            ticket = self.indexer.add(path)
        await self.indexer.through(ticket)
        if self.indexer.failed(path):
            return 0xA700, "stored, but not indexed yet: send it again"
        return None

    def _keep(self, request: StoreRequest, path: str) -> int | tuple[int, str] | None:
        """Check and save (blocking); None when saved, else the response to send."""
        refusal = request.check()
        if refusal is not None:
            return refusal
        policy = self.on_duplicate
        existed = policy == "replace" and os.path.exists(path)
        try:
            request.spool.save_now(path, fsync=request.fsync, replace=policy == "replace")
        except FileExistsError:
            uid, calling = request.sop_instance_uid, request.calling_ae_title
            if policy == "reject":
                log.warning(
                    "refused %s from %r: stored already (--on-duplicate reject)", uid, calling
                )
                return 0x0111, "Duplicate SOP Instance: stored already"
            log.info(
                "kept the stored %s.dcm; the copy from %r is dropped (--on-duplicate keep)",
                uid,
                calling,
            )
            return 0x0000
        if existed:
            log.info(
                "replaced %s.dcm with the copy from %r (--on-duplicate replace)",
                request.sop_instance_uid,
                request.calling_ae_title,
            )
        return None

    async def find(self, request: FindRequest) -> AsyncIterator[Dataset | tuple[Dataset, int]]:
        if request.model == "mwl" and self.worklist is not None:
            async for item in self.worklist.find(request.identifier):
                yield item
            return
        if request.model not in ("patient", "study"):
            raise QueryError(0xC000, f"the {request.model or 'requested'} model is not served")
        await self.indexer.drain()
        model: Any = request.model
        level: Any = request.level
        identifier = request.identifier
        fill_retrieve_ae = "RetrieveAETitle" in identifier
        relational, combined = request.relational, request.combined_datetime
        matches = partial(
            self.index.query,
            model,
            level,
            identifier,
            relational=relational,
            combined_datetime=combined,
        )
        async for match in _batches(matches):
            if fill_retrieve_ae:
                match.RetrieveAETitle = self.ae.ae_title
            yield match

    async def retrieve(self, request: RetrieveRequest) -> AsyncIterator[Path]:
        await self.indexer.drain()
        model: Any = request.model
        level: Any = request.level
        identifier = request.identifier
        files = partial(self.index.files, model, level, identifier, relational=request.relational)
        async for path, *_ in _batches(files):
            yield path
