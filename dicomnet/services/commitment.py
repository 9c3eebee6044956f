"""Storage Commitment Push Model (PS3.4 Annex J), both roles, on DIMSE-N.

SCU: `assoc.request_commitment(instances)` sends the N-ACTION (action type 1) with a
new Transaction UID and waits for the N-EVENT-REPORT carrying it, on the association
or on a `CommitmentListener` of ours (a new association from the SCP, which then
takes the SCP role by role selection, PS3.7 §D.3.3.4).

SCP: `CommitmentSCP` answers the N-ACTION at once, checks the instances with a
function given to it, and sends the report (event type 1: all committed; 2: failures
exist, PS3.4 §J.3.3) on the same association while it is open, else on a new one to
the requestor's address. Undelivered reports are kept in a `ReportStore` and retried.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import anyio.abc
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from dicomnet.association import BaseAssociation, Handlers
from dicomnet.errors import DicomNetError, DicomTimeoutError, DimseError
from dicomnet.proto.contexts import (
    STORAGE_COMMITMENT_PUSH,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    PresentationContext,
)
from dicomnet.proto.dimse import NEventReportRQ
from dicomnet.services.nservices import (
    N_ACTION,
    N_EVENT_REPORT,
    NRequest,
    NServiceUser,
    handler_key,
)
from dicomnet.storage import Part10File

__all__ = [
    "STORAGE_COMMITMENT",
    "STORAGE_COMMITMENT_INSTANCE",
    "CommitmentListener",
    "CommitmentResult",
    "CommitmentSCP",
    "CommitmentUser",
    "PendingCommitment",
    "PendingReport",
    "ReportStore",
    "instance_references",
]

log = logging.getLogger("dicomnet")

STORAGE_COMMITMENT = STORAGE_COMMITMENT_PUSH  # Storage Commitment Push Model SOP Class
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known instance
REQUEST_COMMITMENT = 1  # Action Type ID (PS3.4 Table J.3-1)
ALL_COMMITTED = 1  # Event Type IDs (PS3.4 Table J.3-2)
FAILURES_EXIST = 2

# Failure Reasons (PS3.4 §J.3.3.1.2; PS3.7 Annex C)
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
RESOURCE_LIMITATION = 0x0213
REFERENCED_SOP_CLASS_NOT_SUPPORTED = 0x0122
CLASS_INSTANCE_CONFLICT = 0x0119
DUPLICATE_TRANSACTION_UID = 0x0131

Reference = tuple[str, str]  # (SOP Class UID, SOP Instance UID)
Failure = tuple[str, str, int]  # and the Failure Reason


@dataclass(frozen=True, slots=True)
class CommitmentResult:
    """A storage commitment report: what the SCP committed and what failed (with its
    Failure Reason)."""

    transaction_uid: str
    committed: tuple[Reference, ...] = ()
    failed: tuple[Failure, ...] = ()
    retrieve_ae_title: str | None = None

    @property
    def all_committed(self) -> bool:
        return not self.failed


def instance_references(instances: Iterable[Any]) -> list[Reference]:
    """(SOP Class UID, SOP Instance UID) pairs from pairs, Datasets or Part-10 paths."""
    references: list[Reference] = []
    for item in instances:
        if isinstance(item, tuple):
            references.append((str(item[0]), str(item[1])))
        elif isinstance(item, Dataset):
            references.append((str(item.SOPClassUID), str(item.SOPInstanceUID)))
        elif isinstance(item, (str, os.PathLike)):
            part10 = Part10File.open(item)
            references.append((part10.sop_class_uid, part10.sop_instance_uid))
        else:
            raise TypeError(f"not an instance reference: {type(item).__name__}")
    return references


def _items(references: Iterable[Reference], reasons: Iterable[int] | None = None) -> DicomSequence:
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    if reasons is not None:
        for item, reason in zip(items, reasons, strict=True):
            item.FailureReason = reason
    return DicomSequence(items)


def action_information(transaction_uid: str, references: Sequence[Reference]) -> Dataset:
    """The N-ACTION's data set (PS3.4 Table J.3-1)."""
    dataset = Dataset()
    dataset.TransactionUID = transaction_uid
    dataset.ReferencedSOPSequence = _items(references)
    return dataset


def parse_action(dataset: Dataset | None) -> tuple[str, list[Reference]]:
    """Transaction UID and references of an N-ACTION; a bad one raises `DimseError`
    (0x0120 missing attribute, 0x0106 invalid attribute value)."""
    if dataset is None or not dataset.get("TransactionUID"):
        raise DimseError(0x0120, "no Transaction UID")
    references = []
    for item in dataset.get("ReferencedSOPSequence", None) or ():
        if not isinstance(item, Dataset):  # the element is not a sequence (its VR)
            raise DimseError(0x0106, "Referenced SOP Sequence is not a sequence")
        sop_class = str(item.get("ReferencedSOPClassUID", "") or "")
        sop_instance = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if not sop_class or not sop_instance:
            raise DimseError(0x0106, "a Referenced SOP Sequence item lacks a UID")
        references.append((sop_class, sop_instance))
    if not references:
        raise DimseError(0x0120, "no Referenced SOP Sequence")
    return str(dataset.TransactionUID), references


def report_information(result: CommitmentResult) -> tuple[int, Dataset]:
    """The N-EVENT-REPORT's event type and data set (PS3.4 Table J.3-2)."""
    dataset = Dataset()
    dataset.TransactionUID = result.transaction_uid
    if result.retrieve_ae_title:
        dataset.RetrieveAETitle = result.retrieve_ae_title
    if result.committed:
        dataset.ReferencedSOPSequence = _items(result.committed)
    if result.failed:
        references = [(c, i) for c, i, _ in result.failed]
        dataset.FailedSOPSequence = _items(references, [r for _, _, r in result.failed])
    return (FAILURES_EXIST if result.failed else ALL_COMMITTED), dataset


def parse_report(dataset: Dataset | None) -> CommitmentResult:
    """A report's data set as a `CommitmentResult`; a bad one raises `DimseError` (0x0120
    missing attribute, 0x0106 invalid attribute value: an item without both UIDs or
    with a Failure Reason that is not a number, PS3.4 Table J.3-2)."""
    if dataset is None or not dataset.get("TransactionUID"):
        raise DimseError(0x0120, "no Transaction UID in the report")
    try:
        committed = tuple(
            (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
            for item in dataset.get("ReferencedSOPSequence", None) or ()
        )
        failed = tuple(
            (
                str(item.get("ReferencedSOPClassUID", "")),
                str(item.get("ReferencedSOPInstanceUID", "")),
                int(item.get("FailureReason", PROCESSING_FAILURE)),
            )
            for item in dataset.get("FailedSOPSequence", None) or ()
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise DimseError(0x0106, f"invalid report: {exc}"[:64]) from None
    aet = dataset.get("RetrieveAETitle", None)
    return CommitmentResult(str(dataset.TransactionUID), committed, failed, aet and str(aet))


# --- SCU -------------------------------------------------------------------------------------


class _Waiters:
    """Transaction UID -> the result it waits for."""

    def __init__(self) -> None:
        self._waiting: dict[str, anyio.Event] = {}
        self.results: dict[str, CommitmentResult] = {}

    def expect(self, transaction_uid: str) -> anyio.Event:
        event = self._waiting[transaction_uid] = anyio.Event()
        return event

    def forget(self, transaction_uid: str) -> None:
        self._waiting.pop(transaction_uid, None)
        self.results.pop(transaction_uid, None)

    async def take(self, request: NRequest) -> bool:
        """A diversion for N-EVENT-REPORT: True when the report is one we wait for."""
        if request.sop_class_uid != STORAGE_COMMITMENT:
            return False
        try:
            result = parse_report(request.dataset)
        except DimseError as exc:
            request.status = exc.status
            return False
        event = self._waiting.get(result.transaction_uid)
        if event is None:
            return False
        self.results[result.transaction_uid] = result
        event.set()
        return True


class CommitmentListener:
    """An AE of ours that receives storage commitment reports on associations the SCP
    opens (it accepts the Storage Commitment Push Model with the requestor as SCP).
    Made by `dicomnet.commitment_listener()`; pass it to `request_commitment`."""

    def __init__(self, ae_title: str) -> None:
        self.ae_title = ae_title
        self.host = ""
        self.port = 0
        self.waiters = _Waiters()

    def install(self, handlers: Handlers) -> None:
        """Answer storage commitment reports with this listener (an AE's handlers)."""
        handlers.set(handler_key(N_EVENT_REPORT, STORAGE_COMMITMENT), self._on_report)

    async def _on_report(self, request: NRequest) -> int:
        if await self.waiters.take(request):
            return 0x0000
        log.warning("storage commitment report nobody waits for (%s)", request.association)
        return request.status or 0x0110


class PendingCommitment:
    """A storage commitment request sent, its report still to come (`result()`)."""

    def __init__(
        self,
        association: BaseAssociation,
        transaction_uid: str,
        listener: CommitmentListener | None,
    ) -> None:
        self.association = association
        self.transaction_uid = transaction_uid
        self.listener = listener
        self._waiters = [_Waiters()] + ([listener.waiters] if listener is not None else [])
        self._arrived = [w.expect(transaction_uid) for w in self._waiters]
        association.add_diversion(NEventReportRQ, self._waiters[0].take)

    async def result(self, timeout: float = 600.0) -> CommitmentResult:
        """The report, on the association or the listener, within `timeout` seconds.
        Without a listener, the association ending first is an error."""
        with anyio.move_on_after(timeout):
            async with anyio.create_task_group() as tg:
                for event in self._arrived:
                    tg.start_soon(_cancel_when_set, event, tg.cancel_scope)
                if self.listener is None:
                    tg.start_soon(_cancel_when_closed, self.association, tg.cancel_scope)
        for waiting in self._waiters:
            if self.transaction_uid in waiting.results:
                return waiting.results[self.transaction_uid]
        if self.listener is None and self.association.is_closed:
            raise self.association.termination_error()
        raise DicomTimeoutError(
            f"no storage commitment report for {self.transaction_uid} within {timeout:g} s"
        )

    def close(self) -> None:
        """Stop waiting for the report."""
        self.association.remove_diversion(NEventReportRQ, self._waiters[0].take)
        for waiting in self._waiters:
            waiting.forget(self.transaction_uid)


class CommitmentUser(NServiceUser):
    """What Storage Commitment offers the SCU."""

    async def request_commitment(
        self,
        instances: Iterable[Any],
        *,
        listener: CommitmentListener | None = None,
        timeout: float = 600.0,
    ) -> CommitmentResult:
        """Ask the peer to commit `instances` ((class, instance) UID pairs, Datasets or
        Part-10 paths) and wait at most `timeout` seconds for its report, on this
        association or on `listener` (PS3.4 §J.3.2); the association stays open
        meanwhile. `DimseError` if the N-ACTION fails; `DicomTimeoutError` if no report
        comes in time."""
        pending = await self.send_commitment_request(instances, listener=listener)
        try:
            return await pending.result(timeout)
        finally:
            pending.close()

    async def send_commitment_request(
        self, instances: Iterable[Any], *, listener: CommitmentListener | None = None
    ) -> PendingCommitment:
        """Send the N-ACTION only: the report is `await pending.result()`, which may
        come on `listener` after this association is released. `pending.close()`
        when done with it."""
        references = await anyio.to_thread.run_sync(instance_references, list(instances))
        pending = PendingCommitment(self, generate_uid(prefix=None), listener)
        try:
            await self.n_action(
                STORAGE_COMMITMENT,
                STORAGE_COMMITMENT_INSTANCE,
                REQUEST_COMMITMENT,
                action_information(pending.transaction_uid, references),
            )
        except BaseException:
            pending.close()
            raise
        return pending


async def _cancel_when_set(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _cancel_when_closed(association: BaseAssociation, scope: anyio.CancelScope) -> None:
    await association.wait_closed()
    scope.cancel()


# --- SCP -------------------------------------------------------------------------------------


@dataclass
class PendingReport:
    """A storage commitment request received, until its report is delivered."""

    transaction_uid: str
    requestor: str  # the requestor's AE title: where a report on a new association goes
    references: list[Reference]
    received: float  # time.time() of the N-ACTION
    result: CommitmentResult | None = None  # once the instances were checked
    attempts: int = 0


class ReportStore(Protocol):
    """Where pending reports survive a restart; `OSError` when it cannot be reached (a
    request then fails; a report already accepted is still delivered)."""

    def save(self, pending: PendingReport) -> None: ...

    def delete(self, transaction_uid: str) -> None: ...

    def load(self) -> list[PendingReport]: ...


Check = Callable[[Sequence[Reference]], Awaitable[tuple[list[Reference], list[Failure]]]]


class CommitmentSCP:
    """A Storage Commitment Push Model SCP (PS3.4 §J.3.2 SCP behaviour).

    `check(references)` says which instances are committed and which failed (with a
    Failure Reason). `connect(aet)` opens an association to a requestor by its AE title
    (for a report whose association is gone), or None if it is unknown. Reports not
    yet delivered stay in `store` and are retried every `retry` seconds, doubling up to
    ten minutes, and dropped after `keep` seconds.
    """

    def __init__(
        self,
        check: Check,
        store: ReportStore,
        *,
        ae_title: str,
        connect: Callable[[str], Any | None],
        retry: float = 10.0,
        keep: float = 7 * 86400.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._check = check
        self._store = store
        self.ae_title = ae_title
        self._connect = connect
        self.retry = retry
        self.keep = keep
        self._clock = clock or time.time
        self._task_group: anyio.abc.TaskGroup | None = None

    def install(self, handlers: Handlers) -> None:
        """Answer N-ACTION for storage commitment with this SCP (an AE's handlers)."""
        handlers.set(handler_key(N_ACTION, STORAGE_COMMITMENT), self.on_action)

    async def run(
        self,
        *,
        resume: bool = True,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Deliver reports until cancelled; with `resume`, those left from before too."""
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            left = await anyio.to_thread.run_sync(self._store.load) if resume else []
            for pending in left:
                log.info("storage commitment %s: report still to send", pending.transaction_uid)
                tg.start_soon(self._complete, pending, None)
            task_status.started()
            await anyio.sleep_forever()

    async def on_action(self, request: NRequest) -> int:
        """N-ACTION (PS3.4 §J.3.2.1): answered at once; the report follows."""
        if request.action_type != REQUEST_COMMITMENT:
            raise DimseError(0x0123, f"no such action type {request.action_type}")
        transaction_uid, references = parse_action(request.dataset)
        if self._task_group is None:
            raise DimseError(RESOURCE_LIMITATION, "storage commitment is not running")
        pending = PendingReport(
            transaction_uid, request.association.peer_ae_title, references, self._clock()
        )
        await anyio.to_thread.run_sync(self._store.save, pending)
        log.info(
            "storage commitment %s of %d instance(s) from %r",
            transaction_uid,
            len(references),
            pending.requestor,
        )
        self._task_group.start_soon(self._complete, pending, request)
        return 0x0000

    async def _complete(self, pending: PendingReport, request: NRequest | None) -> None:
        if pending.result is None:
            committed, failed = await self._check(pending.references)
            pending.result = CommitmentResult(
                pending.transaction_uid, tuple(committed), tuple(failed), self.ae_title
            )
            await self._keep(self._store.save, pending)
        if request is not None:
            await request.responded()
            if await self._on_same_association(request, pending.result):
                await self._keep(self._store.delete, pending.transaction_uid)
                return
        await self._deliver_with_retries(pending)

    async def _keep(self, change: Callable[[Any], None], argument: Any) -> None:
        """Record a report's progress; a store that cannot be reached is logged (the
        report goes on: at worst it is sent again after a restart)."""
        try:
            await anyio.to_thread.run_sync(change, argument)
        except OSError as exc:
            log.error("storage commitment: could not record a report's progress: %s", exc)

    async def _on_same_association(self, request: NRequest, result: CommitmentResult) -> bool:
        association = request.association
        if association.is_closed or not association.is_established:
            return False
        if not isinstance(association, NServiceUser):  # pragma: no cover - always one
            return False
        event_type, information = report_information(result)
        try:
            await association.n_event_report(
                STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, event_type, information
            )
        except DicomNetError as exc:
            log.warning("storage commitment report %s: %s", result.transaction_uid, exc)
            return False
        log.info("storage commitment report %s sent", result.transaction_uid)
        return True

    async def _deliver_with_retries(self, pending: PendingReport) -> None:
        while self._clock() - pending.received < self.keep:
            if await self._deliver(pending):
                await self._keep(self._store.delete, pending.transaction_uid)
                return
            pending.attempts += 1
            await self._keep(self._store.save, pending)
            await anyio.sleep(min(600.0, self.retry * math.pow(2, min(pending.attempts - 1, 10))))
        log.error(
            "storage commitment report %s to %r dropped: undelivered after %d attempts",
            pending.transaction_uid,
            pending.requestor,
            pending.attempts,
        )
        await self._keep(self._store.delete, pending.transaction_uid)

    async def _deliver(self, pending: PendingReport) -> bool:
        """Send the report on a new association to the requestor, we as SCP."""
        assert pending.result is not None
        opened = self._connect(pending.requestor)
        if opened is None:
            log.warning(
                "storage commitment report %s: %r has no known address (a --peer)",
                pending.transaction_uid,
                pending.requestor,
            )
            return False
        event_type, information = report_information(pending.result)
        try:
            async with opened as association:
                await association.n_event_report(
                    STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, event_type, information
                )
        except (DicomNetError, OSError) as exc:
            log.warning(
                "storage commitment report %s to %r failed (attempt %d): %s",
                pending.transaction_uid,
                pending.requestor,
                pending.attempts + 1,
                exc,
            )
            return False
        log.info(
            "storage commitment report %s sent to %r", pending.transaction_uid, pending.requestor
        )
        return True


def report_contexts() -> list[PresentationContext]:
    """What to propose for sending reports on a new association: the Push Model with
    us (the requestor) as SCP only (PS3.4 §J.3.3, PS3.7 §D.3.3.4)."""
    return [
        PresentationContext(
            STORAGE_COMMITMENT, UNCOMPRESSED_TRANSFER_SYNTAXES, scu_role=False, scp_role=True
        )
    ]
