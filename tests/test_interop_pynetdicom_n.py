"""DIMSE-N, storage commitment and MPPS with pynetdicom as the other side.

pynetdicom as SCU of all six N-services against a dicomnet `AE`, and as SCP of all six
against dicomnet's SCU (statuses, reply data sets, Attribute Identifier Lists, Requested
vs Affected UIDs, SCP-assigned instance UIDs, unknown instances); storage commitment
from pynetdicom to `dicomnet serve` with the report on the same association and on a
new one (the role selection checked as pynetdicom received it), and from dicomnet to a
pynetdicom SCP; the MPPS life cycle from pynetdicom against `serve`, refusals included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio.from_thread
import pytest
from peers import DicomnetServer, describe_cli, free_port, run_dicomnet
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom_n import (
    BASIC_FILM_SESSION,
    MPPS,
    PRINTER,
    PRINTER_INSTANCE,
    STORAGE_COMMITMENT,
    CommitmentListener,
    NServiceSCP,
    RoleItem,
    mpps_final,
    mpps_in_progress,
    mpps_lifecycle,
    n_association,
    storage_commitment_scu,
)

import dicomnet
from dicomnet.proto.contexts import PresentationContext

pytestmark = pytest.mark.timeout(120)

CT_FILE = Path(get_testdata_file("CT_small.dcm"))
CT = (str(dcmread(CT_FILE).SOPClassUID), str(dcmread(CT_FILE).SOPInstanceUID))
NEVER_STORED = (CT[0], "1.2.826.0.1.3680043.8.498.4243")


@contextmanager
def serving(ae: dicomnet.AE) -> Iterator[tuple[anyio.from_thread.BlockingPortal, int]]:
    """`ae` served on loopback from an event loop in a thread of its own."""
    with anyio.from_thread.start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(ae.serve("127.0.0.1", 0)) as server:
            yield portal, server.port


# --- pynetdicom as SCU of the six N-services -------------------------------------------------


class FilmSessions:
    """N-service handlers of the Basic Film Session class over a dict, recording what
    each handler was given."""

    def __init__(self) -> None:
        self.sessions: dict[str, Dataset] = {}
        self.seen: list[tuple[str, int | None, tuple[int, ...] | None]] = []

    def install(self, ae: dicomnet.AE) -> None:
        ae.on_n_create(BASIC_FILM_SESSION)(self.create)
        ae.on_n_get(BASIC_FILM_SESSION)(self.get)
        ae.on_n_set(BASIC_FILM_SESSION)(self.set)
        ae.on_n_action(BASIC_FILM_SESSION)(self.action)
        ae.on_n_delete(BASIC_FILM_SESSION)(self.delete)
        ae.on_n_event_report(BASIC_FILM_SESSION)(self.report)

    def _note(self, request: dicomnet.NRequest, number: int | None = None) -> None:
        self.seen.append((request.operation, number, request.attributes))

    def _session(self, request: dicomnet.NRequest) -> Dataset:
        session = self.sessions.get(request.sop_instance_uid)
        if session is None:
            raise dicomnet.DimseError(0x0112, "no such film session")
        return session

    async def create(self, request: dicomnet.NRequest) -> int:
        self._note(request)
        if request.sop_instance_uid in self.sessions:
            raise dicomnet.DimseError(0x0111, "exists")
        self.sessions[request.sop_instance_uid] = request.dataset or Dataset()
        return 0

    async def get(self, request: dicomnet.NRequest) -> tuple[int, Dataset]:
        self._note(request)
        session = self._session(request)
        reply = Dataset()
        for element in session:
            if not request.attributes or element.tag in request.attributes:
                reply.add(element)
        return 0, reply

    async def set(self, request: dicomnet.NRequest) -> int:
        self._note(request)
        self._session(request).update(request.dataset or Dataset())
        return 0

    async def action(self, request: dicomnet.NRequest) -> tuple[int, Dataset]:
        self._note(request, request.action_type)
        self._session(request)
        reply = Dataset()
        reply.ExecutionStatus = "DONE"
        return 0, reply

    async def delete(self, request: dicomnet.NRequest) -> int:
        self._note(request)
        self._session(request)
        del self.sessions[request.sop_instance_uid]
        return 0

    async def report(self, request: dicomnet.NRequest) -> int:
        self._note(request, request.event_type)
        return 0


def film_attributes(copies: str = "2") -> Dataset:
    ds = Dataset()
    ds.NumberOfCopies = copies
    ds.PrintPriority = "HIGH"
    return ds


def test_pynetdicom_scu_of_the_six_n_services() -> None:
    ae = dicomnet.AE("DICOMNET")
    films = FilmSessions()
    films.install(ae)

    @ae.on_n_get(PRINTER)
    async def printer(request: dicomnet.NRequest) -> tuple[int, Dataset]:
        status = Dataset()
        status.PrinterStatus = "NORMAL"
        return 0, status

    with serving(ae) as (_, port), n_association(port, [BASIC_FILM_SESSION, PRINTER]) as n:
        created = n.create(BASIC_FILM_SESSION, film_attributes())  # no instance UID sent
        assert created.status == 0 and created.affected_uid is not None
        uid = created.affected_uid
        assert uid.startswith("2.25.") and uid in films.sessions
        assert n.create(BASIC_FILM_SESSION, film_attributes(), uid).status == 0x0111
        some = n.get(BASIC_FILM_SESSION, uid, [0x20000010])  # Number of Copies
        assert some.status == 0 and some.dataset is not None
        assert [e.keyword for e in some.dataset] == ["NumberOfCopies"]
        assert some.affected_uid == uid
        changed = Dataset()
        changed.NumberOfCopies = "5"
        assert n.set(BASIC_FILM_SESSION, uid, changed).status == 0
        everything = n.get(BASIC_FILM_SESSION, uid)
        assert everything.dataset is not None and everything.dataset.NumberOfCopies == 5
        assert {e.keyword for e in everything.dataset} == {"NumberOfCopies", "PrintPriority"}
        acted = n.action(BASIC_FILM_SESSION, uid, 1)
        assert acted.status == 0 and acted.dataset is not None
        assert acted.dataset.ExecutionStatus == "DONE"
        assert n.event_report(BASIC_FILM_SESSION, uid, 2).status == 0
        assert n.delete(BASIC_FILM_SESSION, uid).status == 0
        assert n.get(BASIC_FILM_SESSION, uid).status == 0x0112  # unknown instance
        assert n.delete(BASIC_FILM_SESSION, "1.2.3.4").status == 0x0112
        assert n.get(PRINTER, PRINTER_INSTANCE).status == 0
        assert n.set(PRINTER, PRINTER_INSTANCE, changed).status == 0x0211  # no N-SET handler
        action_rsp = n.received[-1]
        assert action_rsp.Status == 0x0211 and action_rsp.AffectedSOPClassUID == PRINTER
    operations = [(op, number) for op, number, _ in films.seen]
    assert operations == [
        ("N-CREATE", None),
        ("N-CREATE", None),
        ("N-GET", None),
        ("N-SET", None),
        ("N-GET", None),
        ("N-ACTION", 1),
        ("N-EVENT-REPORT", 2),
        ("N-DELETE", None),
        ("N-GET", None),
        ("N-DELETE", None),
    ]
    assert films.seen[2][2] == (0x20000010,)  # the Attribute Identifier List as sent
    assert not films.seen[4][2]  # none, or empty: every attribute


# --- pynetdicom as SCP of the six N-services -------------------------------------------------


def test_dicomnet_scu_of_the_six_n_services() -> None:
    async def talk(port: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        contexts = [PresentationContext(BASIC_FILM_SESSION), PresentationContext(PRINTER)]
        async with dicomnet.connect("127.0.0.1", port, aec="PYNETNSCP", contexts=contexts) as a:
            created = await a.n_create(BASIC_FILM_SESSION, film_attributes())
            uid = created.sop_instance_uid
            assert uid is not None
            out["created"] = uid
            got = await a.n_get(BASIC_FILM_SESSION, uid, attributes=["NumberOfCopies"])
            out["got"] = got.dataset
            changed = Dataset()
            changed.NumberOfCopies = "7"
            out["set"] = (await a.n_set(BASIC_FILM_SESSION, uid, changed)).status
            out["action"] = (await a.n_action(BASIC_FILM_SESSION, uid, 1)).status
            out["report"] = (await a.n_event_report(BASIC_FILM_SESSION, uid, 3)).status
            out["deleted"] = (await a.n_delete(BASIC_FILM_SESSION, uid)).status
            with pytest.raises(dicomnet.DimseError) as raised:
                await a.n_get(BASIC_FILM_SESSION, uid)
            out["gone"] = raised.value.status
            out["gone_uid"] = raised.value.response.sop_instance_uid
            explicit = await a.n_create(BASIC_FILM_SESSION, film_attributes(), instance="1.2.3")
            out["explicit"] = explicit.sop_instance_uid
        return out

    with NServiceSCP(commitment_report=None) as scp:
        with anyio.from_thread.start_blocking_portal() as portal:
            out = portal.call(talk, scp.port)
        assert not scp.errors
        requests = scp.requests
    uid = out["created"]
    assert out["got"].NumberOfCopies == 2 and "PrintPriority" not in out["got"]
    assert (out["set"], out["action"], out["report"], out["deleted"]) == (0, 0, 0, 0)
    assert out["gone"] == 0x0112 and out["gone_uid"] == uid and out["explicit"] == "1.2.3"
    services = [r.service for r in requests]
    assert services == [
        "N-CREATE",
        "N-GET",
        "N-SET",
        "N-ACTION",
        "N-EVENT-REPORT",
        "N-DELETE",
        "N-GET",
        "N-CREATE",
    ]
    create, get, set_, action, report, delete = requests[:6]
    # PS3.7 §10.3: N-CREATE and N-EVENT-REPORT name the Affected instance, the others
    # the Requested one; an N-CREATE without an instance leaves the element out.
    assert create.affected_sop_instance_uid is None and create.requested_sop_class_uid is None
    assert create.affected_sop_class_uid == BASIC_FILM_SESSION
    assert report.affected_sop_instance_uid == uid and report.event_type_id == 3
    for request in (get, set_, action, delete):
        assert request.requested_sop_class_uid == BASIC_FILM_SESSION
        assert request.requested_sop_instance_uid == uid
        assert request.affected_sop_instance_uid is None
    assert get.attribute_identifier_list == [0x20000010]
    assert requests[6].attribute_identifier_list is None  # no list: every attribute
    assert action.action_type_id == 1 and action.dataset is None
    assert set_.dataset is not None and set_.dataset.NumberOfCopies == 7
    assert requests[7].affected_sop_instance_uid == "1.2.3"


# --- storage commitment ----------------------------------------------------------------------


def test_pynetdicom_asks_serve_for_commitment_on_the_same_association(
    dicomnet_server: Callable[..., DicomnetServer],
) -> None:
    server = dicomnet_server(aet="PACS")
    stored = run_dicomnet(["store", "127.0.0.1", server.port, "--aec", "PACS", CT_FILE])
    assert stored.returncode == 0, describe_cli(stored)
    out = storage_commitment_scu(server.port, [CT, NEVER_STORED], aec="PACS", wait=20)
    assert out.action.status == 0 and out.report is not None, out
    report = out.report
    assert report.on == "same" and report.event_type == 2
    assert report.referenced == [CT]
    assert report.failed == [(*NEVER_STORED, 0x0112)]


def test_pynetdicom_gets_the_report_on_a_new_association(
    dicomnet_server: Callable[..., DicomnetServer],
) -> None:
    with CommitmentListener(aet="MODALITY") as listener:
        peer = f"MODALITY=127.0.0.1:{listener.port}"
        server = dicomnet_server(aet="PACS", extra_args=["--peer", peer])
        stored = run_dicomnet(["store", "127.0.0.1", server.port, "--aec", "PACS", CT_FILE])
        assert stored.returncode == 0, describe_cli(stored)
        # pynetdicom releases right after the N-ACTION-RSP; a PACS faster than that finds
        # the association still open and reports on it (PS3.4 §J.3.3 allows both). The
        # path under test is the other one: asked again until the release came first.
        for _ in range(3):
            out = storage_commitment_scu(
                server.port,
                [CT],
                aet="MODALITY",
                aec="PACS",
                listener=listener,
                release_after_rsp=True,
                wait=30,
            )
            assert out.action.status == 0 and out.report is not None, out
            if out.report.on == "new":
                break
    report = out.report
    assert report.on == "new" and report.event_type == 1 and report.referenced == [CT]
    assert report.association is not None
    assert report.association.calling_aet == "PACS"
    # PS3.4 §J.3.3 / PS3.7 §D.3.3.4: the PACS proposes the SCP role for itself, only.
    assert report.association.proposed_roles == [RoleItem(STORAGE_COMMITMENT, False, True)]


def test_dicomnet_asks_pynetdicom_for_commitment_both_ways() -> None:
    listen_port = free_port()

    async def ask(port: int, listener: bool) -> dicomnet.CommitmentResult:
        contexts = [PresentationContext(STORAGE_COMMITMENT)]
        if not listener:
            async with dicomnet.connect("127.0.0.1", port, contexts=contexts) as assoc:
                return await assoc.request_commitment([CT, NEVER_STORED], timeout=30)
        async with dicomnet.commitment_listener("DICOMNET", "127.0.0.1", listen_port) as ear:
            async with dicomnet.connect("127.0.0.1", port, contexts=contexts) as assoc:
                return await assoc.request_commitment([CT], listener=ear, timeout=30)

    same = NServiceSCP(commitment_report="after", commit_failures={NEVER_STORED[1]: 0x0112})
    new = NServiceSCP(commitment_report="new", report_to=(listen_port, "DICOMNET"))
    with same, new, anyio.from_thread.start_blocking_portal() as portal:
        on_same = portal.call(ask, same.port, False)
        on_new = portal.call(ask, new.port, True)
        assert new.wait_reports(1)
        sent = new.reports[0]
    assert on_same.committed == (CT,) and on_same.failed == ((*NEVER_STORED, 0x0112),)
    assert on_new.committed == (CT,) and on_new.all_committed
    assert sent.on == "new" and sent.status == 0
    # We accepted the role pynetdicom asked for: it is the SCP, we the SCU (D.3.3.4).
    assert sent.replied_roles == [RoleItem(STORAGE_COMMITMENT, False, True)]


# --- MPPS ------------------------------------------------------------------------------------


def test_the_mpps_life_cycle_from_pynetdicom(
    dicomnet_server: Callable[..., DicomnetServer],
) -> None:
    server = dicomnet_server(aet="RIS")
    port = server.port
    described = Dataset()
    described.PerformedProcedureStepDescription = "CT HEAD, done"
    done = mpps_lifecycle(port, aec="RIS", updates=[described, mpps_final(), described])
    assert done.create.status == 0 and done.instance_uid is not None
    assert done.instance_uid.startswith("2.25.")  # assigned by serve
    assert [u.status for u in done.updates] == [0, 0, 0x0110]
    refusal = done.received[-1]
    assert refusal.ErrorID == 0xA710
    assert refusal.ErrorComment == "Performed Procedure Step Object may no longer be updated"
    stopped = mpps_lifecycle(
        port,
        aec="RIS",
        instance_uid="1.2.826.0.1.3680043.8.498.77",
        updates=[mpps_final("DISCONTINUED"), mpps_final()],
    )
    assert [u.status for u in stopped.updates] == [0, 0x0110]
    again = mpps_lifecycle(port, aec="RIS", instance_uid="1.2.826.0.1.3680043.8.498.77")
    assert again.create.status == 0x0111 and again.updates == []
    wrong = mpps_lifecycle(port, aec="RIS", create=mpps_in_progress(Modality=""))
    assert wrong.create.status == 0x0121
    completed = mpps_lifecycle(
        port, aec="RIS", create=mpps_in_progress(PerformedProcedureStepStatus="COMPLETED")
    )
    assert completed.create.status == 0x0106
    no_id = mpps_in_progress()
    del no_id.PerformedProcedureStepID
    assert mpps_lifecycle(port, aec="RIS", create=no_id).create.status == 0x0120
    forbidden = Dataset()
    forbidden.PatientID = "SOMEONE-ELSE"
    early = mpps_lifecycle(
        port, aec="RIS", updates=[forbidden, mpps_final(PerformedSeriesSequence=[])]
    )
    assert [u.status for u in early.updates] == [0x0106, 0x0121]
    with n_association(port, [MPPS], aec="RIS") as n:
        assert n.set(MPPS, "1.2.826.0.1.3680043.8.498.78", described).status == 0x0112
