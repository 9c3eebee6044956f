"""`Pool`: associations to one destination, opened on demand and reused (after
httpcore's connection pool).

Each association opened proposes contexts for every kind of instance (SOP class,
transfer syntax) the pool was asked to send so far (`contexts_for_instances`). An
instance goes on an open association that takes it, as stored or converted
(`StorageUser.sending_context`), else on a new one. Up to `window` C-STOREs are
outstanding on one association, within the Asynchronous Operations Window the peer
accepted (PS3.7 §D.3.3.3). Associations idle for `idle_timeout` seconds are released;
one aborted or lost is dropped and replaced when next needed.
"""

from __future__ import annotations

import logging
import math
import os
import ssl
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TypeAlias

import anyio
import anyio.abc
import anyio.to_thread
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnet.association import AssociationSettings
from dicomnet.client import open_association
from dicomnet.errors import (
    ConnectionFailed,
    DicomNetError,
    DimseError,
    InvalidDatasetError,
    InvalidStateError,
    NotNegotiatedError,
)
from dicomnet.identity import UserIdentity
from dicomnet.observe import Observer
from dicomnet.proto.contexts import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    VERIFICATION,
    ContextCount,
    PresentationContext,
    contexts_for_instances,
)
from dicomnet.services import Association
from dicomnet.status import Status
from dicomnet.storage import Part10File
from dicomnet.stream import TCP, NetworkBackend

__all__ = ["Pool", "PoolStats"]

log = logging.getLogger("dicomnet")

MAX_CONTEXTS = 128  # presentation contexts in one A-ASSOCIATE-RQ (PS3.8 §9.3.2.2)
MAX_KINDS = 4096  # kinds of instance remembered for the proposals

Pair: TypeAlias = tuple[
    str, str | None
]  # (SOP Class UID, stored syntax; None: a data set without one)
Instance: TypeAlias = Dataset | str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of a pool's counters.

    `opened`: associations opened so far; `open`: open now; `sent`: C-STOREs answered with
    success or a warning; `failed`: stores that raised; `reused`: stores carried by an
    association that had carried one before; `retried`: stores sent again on a new
    association because theirs ended before the request went out; `peak_outstanding`:
    the most C-STOREs outstanding at once on one association.
    """

    opened: int = 0
    open: int = 0
    sent: int = 0
    failed: int = 0
    reused: int = 0
    retried: int = 0
    peak_outstanding: int = 0


@dataclass(frozen=True, slots=True)
class _Kind:
    """What decides which associations can take an instance."""

    sop_class: str
    stored: str | None  # its transfer syntax; None: a data set without file meta
    preferred: str | None  # `transfer_syntax=` of the store

    @property
    def pair(self) -> Pair:
        return (self.sop_class, self.stored)

    @property
    def pairs(self) -> tuple[Pair, ...]:
        """What to propose for it (least recent first)."""
        if self.preferred is None or self.preferred == self.stored:
            return (self.pair,)
        return ((self.sop_class, self.preferred), self.pair)


class _Connection:
    """One association of the pool (None while it is being opened) and its use."""

    def __init__(self, proposed: set[Pair]) -> None:
        self.proposed = proposed
        self.association: Association | None = None
        self.window = 1  # C-STOREs we keep outstanding on it
        self.outstanding = 0
        self.uses = 0
        self.idle_since = anyio.current_time()
        self.retiring = False
        self.error: DicomNetError | None = None  # why it could not be opened

    @property
    def usable(self) -> bool:
        association = self.association
        return association is not None and not self.retiring and association.is_established

    @property
    def idle(self) -> bool:
        return self.usable and self.outstanding == 0

    def refusal(self, kind: _Kind) -> NotNegotiatedError | None:
        """Why this association cannot take `kind` (None: it can)."""
        assert self.association is not None
        source = kind.stored or EXPLICIT_VR_LITTLE_ENDIAN
        try:
            self.association.sending_context(kind.sop_class, source, kind.preferred)
        except NotNegotiatedError as exc:
            return exc
        return None


class Pool:
    """Associations to one destination for C-STORE, shared by many tasks.

    `async with dicomnet.Pool(host, port, aet=..., aec=...) as pool:` then, from any
    number of tasks, `await pool.store(instance)` (a Part-10 path or a pydicom Dataset,
    as `Association.store` takes). Up to `max_associations` are opened on demand; each
    carries up to `window` C-STOREs at once, within the Asynchronous Operations Window
    the peer accepted (PS3.7 §D.3.3.3; the item is proposed only when `window` > 1), and
    is released after `idle_timeout` seconds idle (None: kept until the pool closes). One
    idle for `check_after` seconds is checked with a C-ECHO before it is used again (a
    firewall may have dropped it without a word); if that fails, another is used.
    Leaving the block releases every association (A-RELEASE), or aborts them when the
    block raises. `tls`, the timeouts and `observer` are those of `dicomnet.connect()`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        aet: str = "DICOMNET",
        aec: str = "ANY-SCP",
        tls: ssl.SSLContext | None = None,
        max_associations: int = 4,
        window: int = 1,
        idle_timeout: float | None = 30.0,
        check_after: float | None = 10.0,
        max_pdu_length: int = 262_144,
        connect_timeout: float = 30.0,
        artim_timeout: float = 30.0,
        dimse_timeout: float | None = 60.0,
        write_timeout: float | None = 60.0,
        user_identity: UserIdentity | None = None,
        observer: Observer | None = None,
        backend: NetworkBackend = TCP,
    ) -> None:
        if max_associations < 1 or window < 1:
            raise ValueError("max_associations and window are at least 1")
        self.host, self.port, self.aet, self.aec = host, port, aet, aec
        self.max_associations = max_associations
        self.window = window
        self.idle_timeout = idle_timeout
        self.check_after = check_after
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._user_identity = user_identity
        self._observer = observer
        self._backend = backend
        self._settings = AssociationSettings(
            max_pdu_length=max_pdu_length,
            artim_timeout=artim_timeout,
            dimse_timeout=dimse_timeout,
            write_timeout=write_timeout,
        )
        self._connections: list[_Connection] = []
        self._wanted: dict[Pair, None] = {}  # kinds asked for, most recent last
        self._tg: anyio.abc.TaskGroup | None = None
        self._changed: anyio.Event  # these two are made on entry, in the event loop
        self._reaper: anyio.CancelScope
        self._closing = False
        self._live = 0
        self._stats = PoolStats()

    @property
    def stats(self) -> PoolStats:
        return replace(self._stats, open=self._live)

    # --- lifetime ----------------------------------------------------------------------------

    async def __aenter__(self) -> Pool:
        if self._tg is not None:
            raise InvalidStateError("a pool is entered once")
        self._changed = anyio.Event()
        self._reaper = anyio.CancelScope()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        if self.idle_timeout is not None:
            self._tg.start_soon(self._reap, self.idle_timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        await self._close(abort=exc_type is not None)
        return await self._tg.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        """Release every association (A-RELEASE, once their operations are answered);
        the pool takes no more stores."""
        await self._close(abort=False)

    async def _close(self, *, abort: bool) -> None:
        self._closing = True
        if self._tg is None:
            return
        self._reaper.cancel()
        self._notify()
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for conn in self._connections:
                    if conn.association is not None and not conn.retiring:
                        conn.retiring = True
                        tg.start_soon(_end, conn.association, abort)
            while self._connections:  # those being opened or released meanwhile
                await self._changed.wait()

    # --- storing ------------------------------------------------------------------------------

    async def store(self, instance: Instance, *, transfer_syntax: str | None = None) -> Status:
        """C-STORE `instance` on an association of the pool (PS3.7 §9.1.1).

        Returns the status (success or warning); a failure status raises `DimseError`, an
        instance the peer does not take even on an association proposed for it
        `NotNegotiatedError` (`ConversionError`). A store whose association ends before
        its request went out is sent again once, on a new one; after that (the peer may
        have it) the association's error is raised."""
        if self._tg is None:
            raise InvalidStateError("use the pool in `async with Pool(...) as pool:`")
        try:
            instance, kind = await _identify(instance, transfer_syntax)
            self._want(kind)
            status = await self._store(instance, kind)
        except Exception:
            self._stats = replace(self._stats, failed=self._stats.failed + 1)
            raise
        self._stats = replace(self._stats, sent=self._stats.sent + 1)
        return status

    async def _store(self, instance: Instance, kind: _Kind) -> Status:
        for attempt in (1, 2):
            conn = await self._acquire(kind)
            assert conn.association is not None
            stale = self._stale(conn)
            sent = False

            def progress(done: int, total: int) -> None:
                nonlocal sent
                sent = done >= total  # the last byte went out: the peer may have it

            try:
                if stale:
                    await _check(conn.association)
                return await conn.association.store(
                    instance, transfer_syntax=kind.preferred, progress=progress
                )
            except (DimseError, NotNegotiatedError, InvalidDatasetError):
                raise
            except DicomNetError as exc:
                await self._drop(conn)
                if sent or attempt == 2:
                    raise
                log.debug("%s:%d: association lost before sending (%s); again", *self._at, exc)
                self._stats = replace(self._stats, retried=self._stats.retried + 1)
            finally:
                conn.outstanding -= 1
                if conn.outstanding == 0:
                    conn.idle_since = anyio.current_time()
                self._notify()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _acquire(self, kind: _Kind) -> _Connection:
        """An association that takes `kind` with room in its window: whichever comes first
        of an open one freeing up and one opened for it in the background (a peer serving
        one association at a time answers a new one only when another is released). At
        the limit, the least recently used idle association is released to make room for
        a kind no open one takes."""
        opening: _Connection | None = None
        while True:
            if self._closing:
                raise InvalidStateError("the pool is closed")
            changed = self._changed
            best, covered, refused = self._best(kind)
            if best is not None:
                return self._take(best)
            if opening is not None and opening.error is not None:
                error, opening = opening.error, None
                if not covered:
                    raise error
            if refused is not None and not covered:
                raise refused
            if opening is None and len(self._connections) < self.max_associations:
                opening = self._open()
            elif not covered and not any(conn.retiring for conn in self._connections):
                # One at a time: a place being freed already serves one waiter.
                idle = [conn for conn in self._connections if conn.idle]
                if idle:
                    self._retire(min(idle, key=lambda conn: conn.idle_since))
            await changed.wait()

    def _best(self, kind: _Kind) -> tuple[_Connection | None, bool, NotNegotiatedError | None]:
        """The open association with the most room that takes `kind` (None: none has room),
        whether any takes it, and why one proposed for it did not accept it."""
        best: _Connection | None = None
        covered, refused = False, None
        for conn in self._connections:
            if not conn.usable:
                continue
            error = conn.refusal(kind)
            if error is not None:
                if kind.pair in conn.proposed:
                    refused = error  # proposed for it and not accepted
                continue
            covered = True
            if conn.outstanding < conn.window and (
                best is None or conn.outstanding < best.outstanding
            ):
                best = conn
        return best, covered, refused

    def _stale(self, conn: _Connection) -> bool:
        """Whether `conn`, just taken, idled long enough to be checked before use."""
        return (
            self.check_after is not None
            and conn.outstanding == 1
            and conn.uses > 1
            and anyio.current_time() - conn.idle_since >= self.check_after
        )

    def _take(self, conn: _Connection) -> _Connection:
        conn.outstanding += 1
        stats = self._stats
        self._stats = replace(
            stats,
            reused=stats.reused + (conn.uses > 0),
            peak_outstanding=max(stats.peak_outstanding, conn.outstanding),
        )
        conn.uses += 1
        return conn

    def _open(self) -> _Connection:
        """Open an association in the background, proposing every kind asked for so far;
        it holds its place under the limit meanwhile. A failure is kept in `error`."""
        contexts, pairs = self._proposal()
        conn = _Connection(pairs)
        self._connections.append(conn)
        assert self._tg is not None
        self._tg.start_soon(self._run, conn, contexts)
        return conn

    async def _connect(self, conn: _Connection, contexts: list[PresentationContext]) -> bool:
        try:
            association = await open_association(
                self.host,
                self.port,
                aet=self.aet,
                aec=self.aec,
                contexts=contexts,
                settings=self._settings,
                connect_timeout=self._connect_timeout,
                user_identity=self._user_identity,
                async_operations_window=(self.window, 1) if self.window > 1 else (1, 1),
                backend=self._backend,
                tls=self._tls,
                observer=self._observer,
            )
        except DicomNetError as exc:
            log.info("association to %r at %s:%d failed: %s", self.aec, *self._at, exc)
            conn.error = exc
            return False
        except OSError as exc:  # not expected: open_association says ConnectionFailed
            conn.error = ConnectionFailed(f"could not connect to {self.host}:{self.port}: {exc}")
            return False
        conn.association = association
        negotiated = association.extended.async_operations_window.invoked  # 0: unlimited
        conn.window = self.window if negotiated == 0 else min(negotiated, self.window)
        self._live += 1
        self._stats = replace(self._stats, opened=self._stats.opened + 1)
        log.info(
            "association %d to %r at %s:%d opened (%d contexts accepted, window %d)",
            self._stats.opened,
            self.aec,
            *self._at,
            len(association.contexts),
            conn.window,
        )
        if self._closing:
            self._retire(conn)
        return True

    def _proposal(self) -> tuple[list[PresentationContext], set[Pair]]:
        """Contexts for the kinds asked for, most recent first, as many as fit."""
        count = ContextCount()
        pairs: list[Pair] = []
        for pair in reversed(self._wanted):
            if count.with_(*pair) > MAX_CONTEXTS - 1:  # and one for Verification
                break
            count.add(*pair)
            pairs.append(pair)
        return [*contexts_for_instances(pairs), PresentationContext(VERIFICATION)], set(pairs)

    def _want(self, kind: _Kind) -> None:
        for pair in kind.pairs:
            self._wanted.pop(pair, None)
            self._wanted[pair] = None
        while len(self._wanted) > MAX_KINDS:
            del self._wanted[next(iter(self._wanted))]

    # --- ending associations ------------------------------------------------------------------

    async def _run(self, conn: _Connection, contexts: list[PresentationContext]) -> None:
        """Open the association and run its reader; when it ends (or fails to open), it
        leaves the pool."""
        try:
            if not await self._connect(conn, contexts):
                return
            assert conn.association is not None
            self._notify()
            try:
                await conn.association.run()
            finally:
                log.info(
                    "association to %r at %s:%d ended: %s",
                    self.aec,
                    *self._at,
                    conn.association.outcome,
                )
                self._live -= 1
        finally:
            self._connections.remove(conn)
            self._notify()

    def _retire(self, conn: _Connection) -> None:
        """Release `conn` in the background; its place is free once it has ended."""
        if conn.retiring or conn.association is None:
            return
        conn.retiring = True
        assert self._tg is not None
        self._tg.start_soon(_end, conn.association, False)

    async def _drop(self, conn: _Connection) -> None:
        """`conn` failed: abort it (if it is not over yet)."""
        conn.retiring = True
        if conn.association is not None:
            await conn.association.abort()

    async def _reap(self, timeout: float) -> None:
        """Release the associations idle for `timeout` seconds, as they come due."""
        with self._reaper:
            while True:
                changed = self._changed
                now = anyio.current_time()
                due = math.inf
                for conn in list(self._connections):
                    if conn.idle:
                        if now - conn.idle_since >= timeout:
                            self._retire(conn)
                        else:
                            due = min(due, conn.idle_since + timeout)
                with anyio.move_on_after(due - now):
                    await changed.wait()

    def _notify(self) -> None:
        """Wake whoever waits for a change (an association freed, opened or ended)."""
        self._changed.set()
        self._changed = anyio.Event()

    @property
    def _at(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __repr__(self) -> str:
        return f"<Pool {self.aet!r}->{self.aec!r}@{self.host}:{self.port} {self.stats}>"


async def _end(association: Association, abort: bool) -> None:
    """Release (or abort) `association`; a release that fails becomes an abort."""
    if not abort:
        try:
            await association.release()
            return
        except DicomNetError as exc:
            log.debug("release failed: %s", exc)
    await association.abort()


async def _check(association: Association) -> None:
    """C-ECHO: raises only when the association is gone (a peer that refuses or fails the
    echo is there)."""
    try:
        await association.echo()
    except (DimseError, NotNegotiatedError):
        pass


async def _identify(instance: Instance, preferred: str | None) -> tuple[Instance, _Kind]:
    """`instance` (a file not Part-10 as `Part10File` reads it: decoded, as `store` does)
    and its kind."""
    if isinstance(instance, Dataset):
        sop_class = str(instance.get("SOPClassUID", "") or "")
        if not sop_class:
            raise InvalidDatasetError("the data set has no SOP Class UID")
        meta = getattr(instance, "file_meta", None)
        stored = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
        return instance, _Kind(sop_class, stored or None, preferred)
    try:
        part10 = Part10File.open(instance)
    except ValueError:
        path = instance
        dataset = await anyio.to_thread.run_sync(lambda: dcmread(path, force=True))
        return await _identify(dataset, preferred)
    return instance, _Kind(part10.sop_class_uid, part10.transfer_syntax, preferred)
