"""pynetdicom as the real peer of the DIMSE-N tests (PS3.7 §10), in both roles.

- ``NServiceSCP``: a pynetdicom SCP of N-GET / N-SET / N-ACTION / N-CREATE /
  N-DELETE / N-EVENT-REPORT in a thread; records every request, answers from a
  table or a small instance store, and as Storage Commitment SCP sends the
  N-EVENT-REPORT on the same association (after the N-ACTION-RSP, or from inside
  the N-ACTION handler, i.e. before it) or on a new association it opens;
- ``n_association`` / ``n_get`` ... ``n_event_report``: pynetdicom as SCU,
  returning ``NOutcome(status, dataset, affected_uid)`` and recording every
  received command set;
- ``storage_commitment_scu`` and ``CommitmentListener``: a Storage Commitment
  request whose report arrives on the same association or on a new one;
- ``mpps_lifecycle``: MPPS N-CREATE (IN PROGRESS) then N-SETs.

pynetdicom 3.0 facts these helpers rely on:
pynetdicom as SCP serves only the N-services of a class's service class and
aborts on any other; N-EVENT-REPORT-RQs are served in a thread of their own in
both roles; an N-CREATE handler gives the SCP-assigned UID as (0000,1000) in its
returned data set; ``send_n_*`` status data sets drop the response's Affected SOP
Instance UID, so it is read from the received command set (EVT_DIMSE_RECV).

Everything talks to 127.0.0.1 only. Nothing here imports dicomnet.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from peers import HOST, free_port, pynetdicom_ae, wait_until
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

MPPS = "1.2.840.10008.3.1.2.3.3"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known instance (J.3.5)
BASIC_FILM_SESSION = "1.2.840.10008.5.1.1.1"
PRINTER = "1.2.840.10008.5.1.1.16"
PRINTER_INSTANCE = "1.2.840.10008.5.1.1.17"  # the well-known Printer instance
N_CLASSES = (MPPS, STORAGE_COMMITMENT, BASIC_FILM_SESSION, PRINTER)

N_SERVICES = ("N-EVENT-REPORT", "N-GET", "N-SET", "N-ACTION", "N-CREATE", "N-DELETE")
#: Command Field of each N-service's request; the response adds 0x8000.
COMMAND_FIELD = {
    "N-EVENT-REPORT": 0x0100, "N-GET": 0x0110, "N-SET": 0x0120,
    "N-ACTION": 0x0130, "N-CREATE": 0x0140, "N-DELETE": 0x0150,
}  # fmt: skip
#: The N-services pynetdicom as SCP serves per class; it aborts on any other one.
PYNETDICOM_SERVES = {
    MPPS: {"N-CREATE", "N-SET", "N-GET", "N-EVENT-REPORT"},
    STORAGE_COMMITMENT: {"N-ACTION", "N-EVENT-REPORT"},
    BASIC_FILM_SESSION: set(N_SERVICES),
    PRINTER: set(N_SERVICES),  # pynetdicom's Print Management serves all six
}
#: The request's data set parameter, and the pynetdicom Event property decoding it.
_DATASET_PARAM = {
    "N-EVENT-REPORT": ("EventInformation", "event_information"),
    "N-SET": ("ModificationList", "modification_list"),
    "N-ACTION": ("ActionInformation", "action_information"),
    "N-CREATE": ("AttributeList", "attribute_list"),
}
N_TIMEOUT = 30.0  # seconds: DIMSE / ACSE waits of the pynetdicom peers
NO_DATASET = 0x0101  # Command Data Set Type: no data set follows
_FINAL = ("COMPLETED", "DISCONTINUED")  # MPPS states that may no longer be updated


def n_ae(aet: str, timeout: float = N_TIMEOUT) -> Any:
    """A pynetdicom AE with every wait bounded by ``timeout``."""
    ae = pynetdicom_ae(aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    return ae


def _ours_first(assoc: Any) -> None:
    """Move pynetdicom's logging handlers after ours on an association.

    Notification handlers share one try block: when pynetdicom's standard DIMSE
    logger raises (it does for an N-GET with one tag or none in its Attribute
    Identifier List: ``len(BaseTag)``), the handlers bound after it are skipped.
    """
    from pynetdicom import _handlers, evt

    for event, std in (
        (evt.EVT_DIMSE_RECV, _handlers.standard_dimse_recv_handler),
        (evt.EVT_DIMSE_SENT, _handlers.standard_dimse_sent_handler),
        (evt.EVT_PDU_SENT, _handlers.standard_pdu_sent_handler),
    ):
        if any(h[0] is std for h in assoc.get_handlers(event)):
            assoc.unbind(event, std)
            assoc.bind(event, std)


def _data(ds: Dataset | None) -> Dataset | None:
    """None for an empty data set: pynetdicom would announce one (Command Data Set
    Type 0x0001) and then send no data set fragment, leaving the peer waiting."""
    return ds if ds is not None and len(ds) else None


def _listen(ae: Any, handlers: list[Any]) -> int:
    """Start ``ae``'s server thread on a free loopback port (3 tries); the port."""
    from pynetdicom import evt

    handlers = [*handlers, (evt.EVT_REQUESTED, lambda event: _ours_first(event.assoc))]
    last: Exception | None = None
    for _ in range(3):
        port = free_port()
        try:
            ae.start_server((HOST, port), block=False, evt_handlers=handlers)
            return port
        except OSError as exc:
            last = exc
    assert last is not None
    raise last


def _uid(value: Any) -> str | None:
    return None if value is None else str(value)


def _tags(value: Any) -> list[int] | None:
    if value is None:
        return None
    return [int(t) for t in (value if isinstance(value, list) else [value])]


def _quiesce(assoc: Any, settle: float = 0.02, limit: float = 2.0) -> None:
    """Hold pynetdicom's reactor at its checkpoint before a ``send_*`` call.

    ``send_*`` only waits for ``_is_paused``, which the reactor also shows just
    after passing the checkpoint: it may then take the response off the queue
    (pydicom/pynetdicom#875) and the call waits out its DIMSE timeout. Waiting
    until ``_is_paused`` has stayed true for ``settle`` seconds closes that gap.
    """
    assoc._reactor_checkpoint.clear()
    deadline = time.monotonic() + limit
    since: float | None = None
    while time.monotonic() < deadline:
        now = time.monotonic()
        if not assoc._is_paused:
            since = None
        elif since is None:
            since = now
        elif now - since >= settle:
            return
        time.sleep(0.001)


# --------------------------------------------------------------------------
# what was seen


@dataclass
class NRequest:
    """An N-service request as received, command set fields kept as sent."""

    service: str  # "N-GET", ...
    message_id: int | None
    affected_sop_class_uid: str | None
    affected_sop_instance_uid: str | None
    requested_sop_class_uid: str | None
    requested_sop_instance_uid: str | None
    action_type_id: int | None
    event_type_id: int | None
    attribute_identifier_list: list[int] | None  # tags as ints; [] empty; None absent
    dataset: Dataset | None  # decoded; None when the request had no data set
    command: Dataset | None  # the command set exactly as decoded from the wire
    transfer_syntax: str
    calling_aet: str

    @property
    def sop_class_uid(self) -> str | None:
        return self.affected_sop_class_uid or self.requested_sop_class_uid

    @property
    def sop_instance_uid(self) -> str | None:
        return self.affected_sop_instance_uid or self.requested_sop_instance_uid


@dataclass(frozen=True)
class RoleItem:
    """An SCP/SCU Role Selection sub-item (PS3.7 D.3.3.4), as pynetdicom decoded it."""

    sop_class_uid: str
    scu_role: bool | None
    scp_role: bool | None


@dataclass
class AssociationSeen:
    """An association pynetdicom accepted: the role items of its RQ and of our AC."""

    calling_aet: str
    called_aet: str
    proposed_roles: list[RoleItem]  # in the A-ASSOCIATE-RQ
    replied_roles: list[RoleItem]  # in pynetdicom's A-ASSOCIATE-AC
    contexts: list[tuple[str, str, bool, bool]]  # (abstract, transfer syntax, our SCU, our SCP)


def _roles(user: Any) -> list[RoleItem]:
    return [
        RoleItem(str(uid), item.scu_role, item.scp_role)
        for uid, item in sorted(user.role_selection.items())
    ]


def _seen(assoc: Any) -> AssociationSeen:
    rq = assoc.requestor.primitive
    return AssociationSeen(
        calling_aet=str(rq.calling_ae_title).strip(),
        called_aet=str(rq.called_ae_title).strip(),
        proposed_roles=_roles(assoc.requestor),
        replied_roles=_roles(assoc.acceptor),
        contexts=[
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0]), cx.as_scu, cx.as_scp)
            for cx in assoc.accepted_contexts
        ],
    )


class _Commands:
    """Request command sets caught by EVT_DIMSE_RECV, for the handler to pick up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[tuple[int, int, int], Dataset] = {}

    def on_recv(self, event: Any) -> None:
        cs = event.message.command_set
        if int(cs.CommandField) & 0x8000 == 0:
            with self._lock:
                key = (id(event.assoc), int(cs.CommandField), int(cs.get("MessageID", -1)))
                self._by_key[key] = copy.deepcopy(cs)

    def take(self, assoc: Any, service: str, message_id: int | None) -> Dataset | None:
        key = (id(assoc), COMMAND_FIELD[service], -1 if message_id is None else message_id)
        with self._lock:
            return self._by_key.pop(key, None)


def _request(event: Any, service: str, command: Dataset | None) -> NRequest:
    """An NRequest from a pynetdicom N-service event."""
    req = event.request
    dataset: Dataset | None = None
    param, prop = _DATASET_PARAM.get(service, ("", ""))
    raw = getattr(req, param) if param else None
    if raw is not None and raw.getvalue():
        dataset = getattr(event, prop)
    return NRequest(
        service=service,
        message_id=req.MessageID,
        affected_sop_class_uid=_uid(getattr(req, "AffectedSOPClassUID", None)),
        affected_sop_instance_uid=_uid(getattr(req, "AffectedSOPInstanceUID", None)),
        requested_sop_class_uid=_uid(getattr(req, "RequestedSOPClassUID", None)),
        requested_sop_instance_uid=_uid(getattr(req, "RequestedSOPInstanceUID", None)),
        action_type_id=getattr(req, "ActionTypeID", None),
        event_type_id=getattr(req, "EventTypeID", None),
        attribute_identifier_list=_tags(getattr(req, "AttributeIdentifierList", None))
        or ([] if command is not None and 0x00001005 in command else None),
        dataset=dataset,
        command=command,
        transfer_syntax=str(event.context.transfer_syntax),
        calling_aet=str(event.assoc.requestor.ae_title).strip(),
    )


# --------------------------------------------------------------------------
# Storage Commitment data sets (PS3.4 J.3)


def commitment_action_info(references: Sequence[tuple[str, str]], transaction_uid: str) -> Dataset:
    """The N-ACTION Action Information: Transaction UID and Referenced SOP Sequence."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = DicomSequence(_ref(c, i) for c, i in references)
    return ds


def _ref(sop_class: str, sop_instance: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item


def commitment_event_info(
    action_info: Dataset | None, failures: dict[str, int]
) -> tuple[int, Dataset]:
    """(Event Type ID, Event Information) answering an N-ACTION's Action Information."""
    ok: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    for item in (action_info or Dataset()).get("ReferencedSOPSequence", []):
        c, i = str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID)
        (failed if i in failures else ok).append((c, i))
    ds = Dataset()
    ds.TransactionUID = (action_info or Dataset()).get("TransactionUID", generate_uid())
    if ok:
        ds.ReferencedSOPSequence = DicomSequence(_ref(c, i) for c, i in ok)
    if failed:
        ds.FailedSOPSequence = DicomSequence(_ref(c, i, failures[i]) for c, i in failed)
    return (2 if failed else 1), ds


@dataclass
class CommitmentReport:
    """A Storage Commitment N-EVENT-REPORT as received by pynetdicom."""

    on: str  # "same": on the requesting association; "new": on the listener
    event_type: int | None
    transaction_uid: str | None
    referenced: list[tuple[str, str]]
    failed: list[tuple[str, str, int | None]]  # (class, instance, Failure Reason)
    request: NRequest
    association: AssociationSeen | None  # the listener's association, for "new"


def parse_commitment_report(
    req: NRequest, on: str, association: AssociationSeen | None = None
) -> CommitmentReport:
    ds = req.dataset or Dataset()
    uid = ds.get("TransactionUID")
    return CommitmentReport(
        on=on,
        event_type=req.event_type_id,
        transaction_uid=None if uid is None else str(uid),
        referenced=[
            (str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
            for i in ds.get("ReferencedSOPSequence", [])
        ],
        failed=[
            (
                str(i.ReferencedSOPClassUID),
                str(i.ReferencedSOPInstanceUID),
                None if i.get("FailureReason") is None else int(i.FailureReason),
            )
            for i in ds.get("FailedSOPSequence", [])
        ],
        request=req,
        association=association,
    )


# --------------------------------------------------------------------------
# pynetdicom as SCP


@dataclass
class NReply:
    """How ``NServiceSCP`` answers a request.

    ``created_uid``: the N-CREATE-RSP Affected SOP Instance UID when the RQ had
    none. ``command``: more response command elements by keyword (ErrorComment,
    ErrorID, AttributeIdentifierList, AffectedSOPInstanceUID, ...), which
    pynetdicom copies into the response when its primitive has that parameter.
    """

    status: int = 0x0000
    dataset: Dataset | None = None
    created_uid: str | None = None
    command: dict[str, Any] = field(default_factory=dict)


@dataclass
class SentReport:
    """An N-EVENT-REPORT that ``NServiceSCP`` sent as Storage Commitment SCP."""

    on: str  # "after" / "in-handler" (same association, after / before the RSP) or "new"
    event_type: int
    dataset: Dataset
    status: int | None  # the requestor's N-EVENT-REPORT-RSP status; None: none
    replied_roles: list[RoleItem] = field(default_factory=list)  # the AC's, on "new"
    scp_role_accepted: bool | None = None  # on "new": our context allows us as SCP
    error: str | None = None


def _default_instances() -> dict[str, Dataset]:
    return {STORAGE_COMMITMENT_INSTANCE: Dataset(), PRINTER_INSTANCE: Dataset()}


@dataclass
class NServiceSCP:
    """A pynetdicom SCP of the six N-services in a background thread.

    Each request is recorded in ``requests`` and answered by, in order:
    ``handler(request)`` when it returns an NReply; ``answers[(service, sop
    instance uid)]`` then ``answers[(service, None)]``; else the instance store
    ``instances`` (uid -> data set): N-CREATE adds (0x0111 when present, a new UID
    when the RQ has none), N-SET merges, N-GET returns the asked attributes (all
    without a list), N-DELETE removes; N-GET/N-SET/N-ACTION/N-DELETE of an absent
    instance get 0x0112 (``check_instances=False``: 0x0000); N-EVENT-REPORT gets
    0x0000. With ``mpps_rules`` an N-SET of a COMPLETED/DISCONTINUED MPPS gets
    0x0110, Error ID 0xA710 (PS3.4 F.7.2.2).

    A successful Storage Commitment N-ACTION (type 1) is reported per
    ``commitment_report``: "after" (same association, once the N-ACTION-RSP has
    been sent), "in-handler" (same association, from the handler: before the
    N-ACTION-RSP), "new" (an association to ``report_to`` = (port, AE title),
    proposing ``report_roles`` = (SCU-role, SCP-role); None: no role item) or None.
    ``commit_failures`` maps SOP Instance UIDs to the Failure Reason to report.
    """

    aet: str = "PYNETNSCP"
    sop_classes: Sequence[str] = N_CLASSES
    transfer_syntaxes: Sequence[str] | None = None  # None: pynetdicom's defaults
    answers: dict[tuple[str, str | None], NReply] = field(default_factory=dict)
    handler: Callable[[NRequest], NReply | None] | None = None
    instances: dict[str, Dataset] = field(default_factory=_default_instances)
    check_instances: bool = True
    mpps_rules: bool = True
    commitment_report: str | None = "after"
    report_to: tuple[int, str] | None = None
    report_roles: tuple[bool, bool] | None = (False, True)
    report_delay: float = 0.0
    commit_failures: dict[str, int] = field(default_factory=dict)
    timeout: float = N_TIMEOUT
    port: int = 0
    requests: list[NRequest] = field(default_factory=list)
    associations: list[AssociationSeen] = field(default_factory=list)
    reports: list[SentReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _ae: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _commands: _Commands = field(default_factory=_Commands)
    _threads: list[threading.Thread] = field(default_factory=list)
    _pending: dict[int, Callable[[], None]] = field(default_factory=dict)
    _armed: dict[int, tuple[int, Callable[[], None]]] = field(default_factory=dict)
    _msg_id: int = 0

    # answering

    def _answer(self, req: NRequest) -> NReply:
        if self.handler is not None:
            reply = self.handler(req)
            if reply is not None:
                return reply
        for key in ((req.service, req.sop_instance_uid), (req.service, None)):
            if key in self.answers:
                return copy.deepcopy(self.answers[key])
        return self._store(req)

    def _store(self, req: NRequest) -> NReply:
        uid = req.sop_instance_uid
        with self._lock:
            if req.service == "N-CREATE":
                created = None if uid else generate_uid()
                uid = uid or created
                assert uid is not None
                if uid in self.instances:
                    return NReply(0x0111)
                self.instances[uid] = copy.deepcopy(req.dataset or Dataset())
                return NReply(0, copy.deepcopy(self.instances[uid]), created)
            if req.service == "N-EVENT-REPORT":
                return NReply()
            stored = self.instances.get(uid or "")
            if stored is None:
                return NReply(0x0112 if self.check_instances else 0x0000)
            if req.service == "N-SET":
                state = stored.get("PerformedProcedureStepStatus", "")
                if self.mpps_rules and req.sop_class_uid == MPPS and state in _FINAL:
                    return NReply(0x0110, command={"ErrorID": 0xA710})
                for elem in req.dataset or Dataset():
                    stored[elem.tag] = copy.deepcopy(elem)
                return NReply()
            if req.service == "N-GET":
                tags = req.attribute_identifier_list
                ds = Dataset()
                for elem in stored:
                    if tags is None or int(elem.tag) in tags:
                        ds[elem.tag] = copy.deepcopy(elem)
                return NReply(0, ds)
            if req.service == "N-DELETE":
                del self.instances[uid or ""]
            return NReply()

    def _serve(self, event: Any, service: str) -> Any:
        """The handler bound to every EVT_N_*: record, answer, maybe report."""
        try:
            msg_id = event.request.MessageID
            req = _request(event, service, self._commands.take(event.assoc, service, msg_id))
            with self._lock:
                self.requests.append(req)
            reply = self._answer(req)
        except Exception as exc:  # pragma: no cover - reported by the test
            self.errors.append(f"{service}: {exc!r}")
            return 0x0110 if service == "N-DELETE" else (0x0110, None)
        extra = dict(reply.command)
        dataset = copy.deepcopy(reply.dataset)
        if service == "N-CREATE" and reply.created_uid and req.affected_sop_instance_uid is None:
            extra.setdefault("AffectedSOPInstanceUID", reply.created_uid)
            if reply.status == 0x0000:  # pynetdicom takes it from the data set, then drops it
                dataset = dataset if dataset is not None else Dataset()
                dataset.AffectedSOPInstanceUID = reply.created_uid
        status: int | Dataset = reply.status
        if extra:
            status = Dataset()
            status.Status = reply.status
            for keyword, value in extra.items():
                setattr(status, keyword, value)
        if (
            service == "N-ACTION"
            and req.sop_class_uid == STORAGE_COMMITMENT
            and req.action_type_id == 1
            and reply.status == 0x0000
            and self.commitment_report
        ):
            self._plan_report(event.assoc, req)
        return status if service == "N-DELETE" else (status, dataset)

    # Storage Commitment reports

    def _next_msg_id(self) -> int:
        with self._lock:
            self._msg_id = self._msg_id % 0xFFFF + 1
            return self._msg_id

    def _plan_report(self, assoc: Any, req: NRequest) -> None:
        event_type, info = commitment_event_info(req.dataset, self.commit_failures)
        mode = self.commitment_report
        if mode == "in-handler":
            self._send_same(assoc, event_type, info, "in-handler", quiesce=False)
        elif mode in ("after", "new"):
            send = self._send_same if mode == "after" else self._send_new

            def job() -> None:
                time.sleep(self.report_delay)
                send(assoc, event_type, info, mode, quiesce=True)

            with self._lock:
                self._pending[id(assoc)] = job
        else:
            self.errors.append(f"unknown commitment_report {mode!r}")

    def _send_same(
        self, assoc: Any, event_type: int, info: Dataset, on: str, *, quiesce: bool
    ) -> None:
        sent = SentReport(on, event_type, info, None)
        try:
            if quiesce:
                _quiesce(assoc)
            try:
                rsp, _ = assoc.send_n_event_report(
                    info, event_type, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE,
                    msg_id=self._next_msg_id(),
                )  # fmt: skip
            finally:
                if quiesce:
                    assoc._reactor_checkpoint.set()
            sent.status = int(rsp.Status) if "Status" in rsp else None
        except Exception as exc:
            sent.error = repr(exc)
        with self._lock:
            self.reports.append(sent)

    def _send_new(
        self, assoc: Any, event_type: int, info: Dataset, on: str, *, quiesce: bool
    ) -> None:
        from pynetdicom import build_role

        sent = SentReport("new", event_type, info, None)
        try:
            if self.report_to is None:
                raise ValueError("commitment_report='new' needs report_to=(port, aet)")
            port, aet = self.report_to
            ae = n_ae(self.aet, self.timeout)
            ae.add_requested_context(STORAGE_COMMITMENT)
            roles = []
            if self.report_roles is not None:
                scu, scp = self.report_roles
                roles = [build_role(STORAGE_COMMITMENT, scu_role=scu, scp_role=scp)]
            out = ae.associate(HOST, port, ae_title=aet, ext_neg=roles or None)
            if not out.is_established:
                raise ConnectionError(f"association refused/aborted by {aet}@{port}")
            _ours_first(out)
            try:
                sent.replied_roles = _roles(out.acceptor)
                sent.scp_role_accepted = any(cx.as_scp for cx in out.accepted_contexts)
                rsp, _ = out.send_n_event_report(
                    info, event_type, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE,
                    msg_id=self._next_msg_id(),
                )  # fmt: skip
                sent.status = int(rsp.Status) if "Status" in rsp else None
            finally:
                if out.is_established:
                    out.release()
        except Exception as exc:
            sent.error = repr(exc)
        with self._lock:
            self.reports.append(sent)

    def _on_dimse_sent(self, event: Any) -> None:
        """An N-ACTION-RSP is about to go out: arm its report for when it has been sent."""
        cs = event.message.command_set
        if int(cs.CommandField) != 0x8130:
            return
        with self._lock:
            job = self._pending.pop(id(event.assoc), None)
            if job is not None:
                has_data = int(cs.CommandDataSetType) != NO_DATASET
                self._armed[id(event.assoc)] = (0x02 if has_data else 0x03, job)

    def _on_pdu_sent(self, event: Any) -> None:
        """Start an armed report once the last fragment of the N-ACTION-RSP is on the wire."""
        items = getattr(event.pdu, "presentation_data_value_items", None)
        if not items:
            return
        with self._lock:
            armed = self._armed.get(id(event.assoc))
            if armed is None or not any(
                (pdv.presentation_data_value[0] & 0x03) == armed[0] for pdv in items
            ):
                return
            del self._armed[id(event.assoc)]
            thread = threading.Thread(target=armed[1], name="n-report", daemon=True)
            self._threads.append(thread)
        thread.start()

    # life cycle

    def _on_accepted(self, event: Any) -> None:
        with self._lock:
            self.associations.append(_seen(event.assoc))

    def start(self) -> NServiceSCP:
        from pynetdicom import evt

        ae = n_ae(self.aet, self.timeout)
        for uid in self.sop_classes:
            ae.add_supported_context(uid, self.transfer_syntaxes)
        handlers: list[Any] = [
            (getattr(evt, "EVT_" + s.replace("-", "_")), self._serve, [s]) for s in N_SERVICES
        ]
        handlers += [
            (evt.EVT_DIMSE_RECV, self._commands.on_recv),
            (evt.EVT_DIMSE_SENT, self._on_dimse_sent),
            (evt.EVT_PDU_SENT, self._on_pdu_sent),
            (evt.EVT_ACCEPTED, self._on_accepted),
        ]
        self.port = _listen(ae, handlers)
        self._ae = ae
        return self

    def wait_requests(self, count: int, timeout: float = 10.0) -> bool:
        """True once ``count`` requests were recorded (bounded)."""
        return wait_until(lambda: len(self.requests) >= count, timeout, 0.02)

    def wait_reports(self, count: int = 1, timeout: float = 10.0) -> bool:
        """True once ``count`` commitment reports were sent or failed (bounded)."""
        return wait_until(lambda: len(self.reports) >= count, timeout, 0.02)

    def stop(self) -> None:
        """Abort live associations, close the server, join report threads (bounded)."""
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None
        for thread in self._threads:
            thread.join(self.timeout + 5)
        self._threads.clear()

    def __enter__(self) -> NServiceSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------
# pynetdicom as SCU


class NOutcome(NamedTuple):
    """What a pynetdicom ``send_n_*`` call got back.

    ``status`` is None without a valid response (timeout, abort); ``dataset`` is
    None when the response had no data set or a failure status (pynetdicom drops
    it then); ``affected_uid`` is the response's (0000,1000), if any.
    """

    status: int | None
    dataset: Dataset | None
    affected_uid: str | None


class NAssociationFailed(AssertionError):
    def __init__(self, rejected: bool, aborted: bool) -> None:
        super().__init__(f"association not established (rejected={rejected}, aborted={aborted})")
        self.rejected = rejected
        self.aborted = aborted


class NAssociation:
    """A pynetdicom requestor association with what it received recorded.

    ``received``: every command set received, in order. Incoming
    N-EVENT-REPORT-RQs go to ``reports`` and get ``report_status``, unless
    ``handle_reports`` was False (pynetdicom's default then answers 0x0110).
    """

    def __init__(self, report_status: int = 0x0000) -> None:
        self.assoc: Any = None
        self.report_status = report_status
        self.received: list[Dataset] = []
        self.reports: list[NRequest] = []
        self._commands = _Commands()
        self._lock = threading.Lock()
        self._msg_id = 0

    def _on_recv(self, event: Any) -> None:
        with self._lock:
            self.received.append(copy.deepcopy(event.message.command_set))
        self._commands.on_recv(event)

    def _on_report(self, event: Any) -> tuple[int, None]:
        msg_id = event.request.MessageID
        req = _request(
            event, "N-EVENT-REPORT", self._commands.take(event.assoc, "N-EVENT-REPORT", msg_id)
        )
        with self._lock:
            self.reports.append(req)
        return self.report_status, None

    def handlers(self, handle_reports: bool = True) -> list[Any]:
        from pynetdicom import evt

        out: list[Any] = [(evt.EVT_DIMSE_RECV, self._on_recv)]
        if handle_reports:
            out.append((evt.EVT_N_EVENT_REPORT, self._on_report))
        return out

    def _next(self, msg_id: int | None) -> int:
        if msg_id is not None:
            return msg_id
        self._msg_id = self._msg_id % 0xFFFF + 1
        return self._msg_id

    def response(self, msg_id: int) -> Dataset | None:
        """The last received response command set answering ``msg_id``."""
        with self._lock:
            for cs in reversed(self.received):
                if int(cs.CommandField) & 0x8000 and cs.get("MessageIDBeingRespondedTo") == msg_id:
                    return cs
        return None

    def _call(self, msg_id: int, send: Callable[[], Any]) -> NOutcome:
        if not self.assoc.is_established:
            return NOutcome(None, None, None)
        _quiesce(self.assoc)
        try:
            result = send()
        finally:
            self.assoc._reactor_checkpoint.set()
        status_ds, dataset = result if isinstance(result, tuple) else (result, None)
        cs = self.response(msg_id)
        if cs is not None and int(cs.get("CommandDataSetType", NO_DATASET)) == NO_DATASET:
            dataset = None
        status = int(status_ds.Status) if "Status" in status_ds else None
        uid = _uid(cs.get("AffectedSOPInstanceUID")) if cs is not None else None
        return NOutcome(status, dataset, uid)

    def get(
        self,
        sop_class: str,
        instance: str,
        tags: Sequence[int] | None = None,
        msg_id: int | None = None,
    ) -> NOutcome:
        """N-GET; ``tags`` None: no (0000,1005); ``[]``: pynetdicom sends it with length 0."""
        m = self._next(msg_id)
        ids = None if tags is None else list(tags)
        return self._call(m, lambda: self.assoc.send_n_get(ids, sop_class, instance, m))

    def set(
        self, sop_class: str, instance: str, modification: Dataset, msg_id: int | None = None
    ) -> NOutcome:
        """N-SET; pynetdicom cannot send one without a (non-empty) Modification List."""
        if not len(modification):
            raise ValueError("an empty Modification List would be announced but not sent")
        m = self._next(msg_id)
        return self._call(m, lambda: self.assoc.send_n_set(modification, sop_class, instance, m))

    def action(
        self,
        sop_class: str,
        instance: str,
        action_type: int,
        info: Dataset | None = None,
        msg_id: int | None = None,
    ) -> NOutcome:
        m = self._next(msg_id)
        return self._call(
            m, lambda: self.assoc.send_n_action(_data(info), action_type, sop_class, instance, m)
        )

    def create(
        self,
        sop_class: str,
        attributes: Dataset | None = None,
        instance: str | None = None,
        msg_id: int | None = None,
    ) -> NOutcome:
        """N-CREATE; without ``instance`` pynetdicom sends no (0000,1000)."""
        m = self._next(msg_id)
        return self._call(
            m, lambda: self.assoc.send_n_create(_data(attributes), sop_class, instance, m)
        )

    def delete(self, sop_class: str, instance: str, msg_id: int | None = None) -> NOutcome:
        m = self._next(msg_id)
        return self._call(m, lambda: self.assoc.send_n_delete(sop_class, instance, m))

    def event_report(
        self,
        sop_class: str,
        instance: str,
        event_type: int,
        info: Dataset | None = None,
        msg_id: int | None = None,
    ) -> NOutcome:
        m = self._next(msg_id)
        return self._call(
            m,
            lambda: self.assoc.send_n_event_report(_data(info), event_type, sop_class, instance, m),
        )


@contextlib.contextmanager
def n_association(
    port: int,
    sop_classes: Sequence[str] = N_CLASSES,
    *,
    host: str = HOST,
    aet: str = "PYNETSCU",
    aec: str = "ANY-SCP",
    transfer_syntaxes: Sequence[str] | None = None,
    roles: dict[str, tuple[bool, bool]] | None = None,
    handle_reports: bool = True,
    report_status: int = 0x0000,
    timeout: float = N_TIMEOUT,
) -> Iterator[NAssociation]:
    """An established pynetdicom association proposing ``sop_classes``, released at exit.

    ``roles`` proposes SCP/SCU Role Selection items: uid -> (SCU-role, SCP-role).
    Raises NAssociationFailed when not established.
    """
    from pynetdicom import build_role

    ae = n_ae(aet, timeout)
    for uid in sop_classes:
        ae.add_requested_context(uid, transfer_syntaxes)
    ext = [build_role(u, scu_role=r[0], scp_role=r[1]) for u, r in (roles or {}).items()]
    n = NAssociation(report_status)
    assoc = ae.associate(
        host, port, ae_title=aec, ext_neg=ext or None, evt_handlers=n.handlers(handle_reports)
    )
    if not assoc.is_established:
        raise NAssociationFailed(assoc.is_rejected, assoc.is_aborted)
    _ours_first(assoc)
    n.assoc = assoc
    try:
        yield n
    finally:
        if assoc.is_established:
            assoc.release()


def n_get(
    port: int, sop_class: str, instance: str, tags: Sequence[int] | None = None, **kw: Any
) -> NOutcome:
    """One N-GET on its own association (``kw``: n_association's keywords)."""
    with n_association(port, [sop_class], **kw) as n:
        return n.get(sop_class, instance, tags)


def n_set(port: int, sop_class: str, instance: str, modification: Dataset, **kw: Any) -> NOutcome:
    with n_association(port, [sop_class], **kw) as n:
        return n.set(sop_class, instance, modification)


def n_action(
    port: int,
    sop_class: str,
    instance: str,
    action_type: int,
    info: Dataset | None = None,
    **kw: Any,
) -> NOutcome:
    with n_association(port, [sop_class], **kw) as n:
        return n.action(sop_class, instance, action_type, info)


def n_create(
    port: int,
    sop_class: str,
    attributes: Dataset | None = None,
    instance: str | None = None,
    **kw: Any,
) -> NOutcome:
    with n_association(port, [sop_class], **kw) as n:
        return n.create(sop_class, attributes, instance)


def n_delete(port: int, sop_class: str, instance: str, **kw: Any) -> NOutcome:
    with n_association(port, [sop_class], **kw) as n:
        return n.delete(sop_class, instance)


def n_event_report(
    port: int,
    sop_class: str,
    instance: str,
    event_type: int,
    info: Dataset | None = None,
    **kw: Any,
) -> NOutcome:
    with n_association(port, [sop_class], **kw) as n:
        return n.event_report(sop_class, instance, event_type, info)


# --------------------------------------------------------------------------
# Storage Commitment as SCU


@dataclass
class CommitmentListener:
    """The SCU's own listener for reports on a new association (PS3.4 J.3.3.1.3).

    Accepts Storage Commitment Push Model with ``add_supported_context(...,
    scu_role, scp_role)``: whether to accept the requestor's proposal of the SCU
    and of the SCP role (None, None: ignore role items, default roles). Each
    N-EVENT-REPORT is answered with ``status``; ``associations`` keeps the role
    items of every accepted association.
    """

    aet: str = "PYNETSCU"
    scu_role: bool | None = False
    scp_role: bool | None = True
    status: int = 0x0000
    timeout: float = N_TIMEOUT
    port: int = 0
    reports: list[CommitmentReport] = field(default_factory=list)
    associations: list[AssociationSeen] = field(default_factory=list)
    _ae: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _commands: _Commands = field(default_factory=_Commands)

    def _on_accepted(self, event: Any) -> None:
        with self._lock:
            self.associations.append(_seen(event.assoc))

    def _on_report(self, event: Any) -> tuple[int, None]:
        msg_id = event.request.MessageID
        cs = self._commands.take(event.assoc, "N-EVENT-REPORT", msg_id)
        req = _request(event, "N-EVENT-REPORT", cs)
        report = parse_commitment_report(req, "new", _seen(event.assoc))
        with self._lock:
            self.reports.append(report)
        return self.status, None

    def start(self) -> CommitmentListener:
        from pynetdicom import evt

        ae = n_ae(self.aet, self.timeout)
        ae.add_supported_context(STORAGE_COMMITMENT, scu_role=self.scu_role, scp_role=self.scp_role)
        handlers = [
            (evt.EVT_N_EVENT_REPORT, self._on_report),
            (evt.EVT_DIMSE_RECV, self._commands.on_recv),
            (evt.EVT_ACCEPTED, self._on_accepted),
        ]
        self.port = _listen(ae, handlers)
        self._ae = ae
        return self

    def stop(self) -> None:
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None

    def __enter__(self) -> CommitmentListener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class CommitmentOutcome:
    transaction_uid: str
    action: NOutcome  # the N-ACTION-RSP
    report: CommitmentReport | None  # the first report for this transaction, if any
    reports: list[CommitmentReport]  # every report seen for it (same association + listener)
    received: list[Dataset]  # command sets received on the requesting association


def storage_commitment_scu(
    port: int,
    references: Sequence[tuple[str, str]],
    *,
    transaction_uid: str | None = None,
    listener: CommitmentListener | None = None,
    release_after_rsp: bool = False,
    wait: float = 10.0,
    **kw: Any,
) -> CommitmentOutcome:
    """N-ACTION (type 1) for ``references`` [(class, instance)], then wait for the report.

    The association stays open up to ``wait`` seconds for a report on it, unless
    ``release_after_rsp`` (then only ``listener`` can get one). ``kw``:
    n_association's keywords; use the listener's AE title as ``aet``.
    """
    uid = transaction_uid or generate_uid()
    info = commitment_action_info(references, uid)

    def mine() -> list[CommitmentReport]:
        found = [parse_commitment_report(r, "same") for r in n.reports]
        found += listener.reports if listener is not None else []
        return [r for r in found if r.transaction_uid == uid]

    with n_association(port, [STORAGE_COMMITMENT], **kw) as n:
        action = n.action(STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, 1, info)
        if action.status == 0x0000 and not release_after_rsp:
            wait_until(mine, wait, 0.02)
    if action.status == 0x0000 and release_after_rsp and listener is not None:
        wait_until(mine, wait, 0.02)
    reports = mine()
    return CommitmentOutcome(uid, action, reports[0] if reports else None, reports, n.received)


# --------------------------------------------------------------------------
# MPPS as SCU (PS3.4 F.7)


def mpps_in_progress(**overrides: Any) -> Dataset:
    """A minimal N-CREATE Attribute List of an IN PROGRESS MPPS (Table F.7.2-1)."""
    sched = Dataset()
    sched.StudyInstanceUID = generate_uid()
    sched.ReferencedStudySequence = DicomSequence()
    sched.AccessionNumber = "ACC0001"
    sched.RequestedProcedureID = "RP0001"
    sched.RequestedProcedureDescription = "CT HEAD"
    sched.ScheduledProcedureStepID = "SPS0001"
    sched.ScheduledProcedureStepDescription = "CT HEAD"
    sched.ScheduledProtocolCodeSequence = DicomSequence()
    ds = Dataset()
    ds.ScheduledStepAttributesSequence = DicomSequence([sched])
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PAT0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.ReferencedPatientSequence = DicomSequence()
    ds.PerformedProcedureStepID = "PPS0001"
    ds.PerformedStationAETitle = "PYNETSCU"
    ds.PerformedStationName = "STATION1"
    ds.PerformedLocation = "ROOM1"
    ds.PerformedProcedureStepStartDate = "20240101"
    ds.PerformedProcedureStepStartTime = "120000"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription = "CT HEAD"
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = DicomSequence()
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.Modality = "CT"
    ds.StudyID = "STUDY1"
    ds.PerformedProtocolCodeSequence = DicomSequence()
    ds.PerformedSeriesSequence = DicomSequence()
    for keyword, value in overrides.items():
        setattr(ds, keyword, value)
    return ds


def mpps_final(status: str = "COMPLETED", **overrides: Any) -> Dataset:
    """An N-SET Modification List ending the step (COMPLETED or DISCONTINUED)."""
    image = Dataset()
    image.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    image.ReferencedSOPInstanceUID = generate_uid()
    series = Dataset()
    series.PerformingPhysicianName = ""
    series.ProtocolName = "HEAD"
    series.OperatorsName = ""
    series.SeriesInstanceUID = generate_uid()
    series.SeriesDescription = ""
    series.RetrieveAETitle = ""
    series.ReferencedImageSequence = DicomSequence([image])
    series.ReferencedNonImageCompositeSOPInstanceSequence = DicomSequence()
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20240101"
    ds.PerformedProcedureStepEndTime = "121500"
    ds.PerformedSeriesSequence = DicomSequence([series])
    for keyword, value in overrides.items():
        setattr(ds, keyword, value)
    return ds


@dataclass
class MPPSOutcome:
    create: NOutcome
    instance_uid: str | None  # the one sent, else the one the SCP assigned
    updates: list[NOutcome]  # one per N-SET sent (none after a failed N-CREATE)
    received: list[Dataset]  # every command set received


def mpps_lifecycle(
    port: int,
    *,
    create: Dataset | None = None,
    updates: Sequence[Dataset] | None = None,
    instance_uid: str | None = None,
    **kw: Any,
) -> MPPSOutcome:
    """N-CREATE ``create`` (default IN PROGRESS), then each N-SET of ``updates``
    (default: COMPLETED), on one association. ``instance_uid`` None: the SCP assigns it.
    """
    attrs = create if create is not None else mpps_in_progress()
    sets = list(updates) if updates is not None else [mpps_final()]
    with n_association(port, [MPPS], **kw) as n:
        created = n.create(MPPS, attrs, instance_uid)
        uid = instance_uid or created.affected_uid
        results: list[NOutcome] = []
        status = created.status
        if uid is not None and status is not None and (status < 2 or 0xB000 <= status < 0xC000):
            results = [n.set(MPPS, uid, mod) for mod in sets]
    return MPPSOutcome(created, uid, results, n.received)
