"""Storage commitment (PS3.4 Annex J) between dicomnet's SCU and SCP, in memory: the
report on the same association and on a new one (with role selection), failures with
their reasons, retries, reports that survive a restart, malformed requests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import postgres
import pytest
from pydicom.dataset import Dataset

import dicomnet
from dicomnet.pacs.commitments import DatabaseReportStore, FolderReportStore, check_stored
from dicomnet.services.commitment import (
    STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    CommitmentListener,
    CommitmentResult,
    PendingReport,
    Reference,
    report_contexts,
)
from dicomnet.testing import FakeClock, MemoryNetwork

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
HOST, PORT = "pacs.test", 104
MODALITY_HOST, MODALITY_PORT = "modality.test", 11113


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def net() -> MemoryNetwork:
    return MemoryNetwork(FakeClock())


class Reports:
    """A `ReportStore` in memory, recording what it was given."""

    def __init__(self, pending: Sequence[PendingReport] = ()) -> None:
        self.pending = {p.transaction_uid: p for p in pending}
        self.saved = 0
        self.deleted: list[str] = []

    def save(self, pending: PendingReport) -> None:
        self.pending[pending.transaction_uid] = pending
        self.saved += 1

    def delete(self, transaction_uid: str) -> None:
        self.pending.pop(transaction_uid, None)
        self.deleted.append(transaction_uid)

    def load(self) -> list[PendingReport]:
        return list(self.pending.values())


STORED = {("1.2.3.1", CT), ("1.2.3.2", CT), ("1.2.3.3", MR)}


async def check(references: Sequence[Reference]) -> tuple[list[Reference], list]:
    committed, failed = [], []
    for sop_class, uid in references:
        if (uid, sop_class) in STORED:
            committed.append((sop_class, uid))
        elif any(uid == s for s, _ in STORED):
            failed.append((sop_class, uid, 0x0119))
        else:
            failed.append((sop_class, uid, 0x0112))
    return committed, failed


def pacs(
    net: MemoryNetwork, store: Reports, *, retry: float = 10.0
) -> tuple[dicomnet.AE, dicomnet.CommitmentSCP]:
    ae = dicomnet.AE("PACS", peers={"MODALITY": (MODALITY_HOST, MODALITY_PORT)})

    def connect(aet: str) -> object | None:
        address = ae.peers.get(aet)
        if address is None:
            return None
        return dicomnet.connect(
            *address, aet="PACS", aec=aet, contexts=report_contexts(), backend=net
        )

    scp = dicomnet.CommitmentSCP(check, store, ae_title="PACS", connect=connect, retry=retry)
    scp.install(ae.handlers)
    return ae, scp


async def test_the_report_comes_on_the_same_association(net: MemoryNetwork) -> None:
    store = Reports()
    ae, scp = pacs(net, store)
    asked = [(CT, "1.2.3.1"), (CT, "1.2.3.2"), (CT, "1.2.3.3"), (CT, "9.9.9")]
    async with anyio.create_task_group() as tg:
        await tg.start(scp.run)
        async with ae.serve(HOST, PORT, backend=net):
            async with dicomnet.connect(HOST, PORT, aet="MODALITY", backend=net) as assoc:
                result = await assoc.request_commitment(asked, timeout=10)
        tg.cancel_scope.cancel()
    assert result.committed == ((CT, "1.2.3.1"), (CT, "1.2.3.2"))
    assert result.failed == ((CT, "1.2.3.3", 0x0119), (CT, "9.9.9", 0x0112))
    assert not result.all_committed and result.retrieve_ae_title == "PACS"
    assert result.transaction_uid.startswith("2.25.")
    assert store.pending == {} and store.deleted == [result.transaction_uid]


async def test_the_report_comes_on_a_new_association_with_role_selection(
    net: MemoryNetwork,
) -> None:
    """The requestor releases right after the N-ACTION: the SCP opens an association to
    it, proposing the SCP role for itself (PS3.4 §J.3.3, PS3.7 §D.3.3.4)."""
    store = Reports()
    ae, scp = pacs(net, store)
    listener = CommitmentListener("MODALITY")
    modality = dicomnet.AE("MODALITY")
    listener.install(modality.handlers)
    seen: list[dicomnet.AssociationRequest] = []

    @modality.on_association
    async def admit(request: dicomnet.AssociationRequest) -> None:
        seen.append(request)

    async with anyio.create_task_group() as tg:
        await tg.start(scp.run)
        async with (
            ae.serve(HOST, PORT, backend=net),
            modality.serve(MODALITY_HOST, MODALITY_PORT, backend=net),
        ):
            async with dicomnet.connect(HOST, PORT, aet="MODALITY", backend=net) as assoc:
                pending = await assoc.send_commitment_request(
                    [(CT, "1.2.3.1"), (MR, "1.2.3.3")], listener=listener
                )
            result = await pending.result(timeout=10)
            pending.close()
        tg.cancel_scope.cancel()
    assert result.all_committed and len(result.committed) == 2
    (request,) = seen
    assert request.calling_ae_title == "PACS" and request.called_ae_title == "MODALITY"
    roles = request.pdu.user_information.role_selections
    assert [(r.sop_class_uid, r.scu_role, r.scp_role) for r in roles] == [
        (STORAGE_COMMITMENT, False, True)
    ]


async def test_an_undeliverable_report_is_retried_until_it_goes(net: MemoryNetwork) -> None:
    store = Reports()
    ae, scp = pacs(net, store, retry=0.01)
    listener = CommitmentListener("MODALITY")
    modality = dicomnet.AE("MODALITY")
    listener.install(modality.handlers)
    async with anyio.create_task_group() as tg:
        await tg.start(scp.run)
        async with ae.serve(HOST, PORT, backend=net):
            async with dicomnet.connect(HOST, PORT, aet="MODALITY", backend=net) as assoc:
                pending = await assoc.send_commitment_request([(CT, "1.2.3.1")], listener=listener)
            with anyio.fail_after(5):  # the modality is not listening yet: retries
                while not any(p.attempts >= 2 for p in store.pending.values()):
                    await anyio.sleep(0.01)
            async with modality.serve(MODALITY_HOST, MODALITY_PORT, backend=net):
                result = await pending.result(timeout=10)
                with anyio.fail_after(5):  # forgotten once its association is released
                    while store.pending:
                        await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert result.committed == ((CT, "1.2.3.1"),)


async def test_reports_left_from_before_are_sent_at_start(net: MemoryNetwork) -> None:
    store = Reports([PendingReport("2.25.77", "MODALITY", [(CT, "1.2.3.2"), (CT, "4.5")], 0.0)])
    _, scp = pacs(net, store)
    listener = CommitmentListener("MODALITY")
    modality = dicomnet.AE("MODALITY")
    listener.install(modality.handlers)
    arrived = listener.waiters.expect("2.25.77")
    async with modality.serve(MODALITY_HOST, MODALITY_PORT, backend=net):
        async with anyio.create_task_group() as tg:
            scp.keep = 1e12  # received at time 0: still worth sending
            await tg.start(scp.run)
            with anyio.fail_after(5):
                await arrived.wait()
                while store.pending:  # forgotten once its association is released
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    result = listener.waiters.results["2.25.77"]
    assert result.committed == ((CT, "1.2.3.2"),) and result.failed == ((CT, "4.5", 0x0112),)
    assert store.pending == {}


async def test_a_malformed_request_is_refused_and_nothing_is_kept(net: MemoryNetwork) -> None:
    store = Reports()
    ae, scp = pacs(net, store)
    async with anyio.create_task_group() as tg:
        await tg.start(scp.run)
        async with ae.serve(HOST, PORT, backend=net):
            async with dicomnet.connect(HOST, PORT, backend=net) as assoc:
                with pytest.raises(dicomnet.DimseError) as raised:
                    await assoc.n_action(STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, 1)
                assert raised.value.status == 0x0120  # no Transaction UID
                info = Dataset()
                info.TransactionUID = "2.25.1"
                with pytest.raises(dicomnet.DimseError) as raised:
                    await assoc.n_action(STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, 1, info)
                assert raised.value.status == 0x0120  # no Referenced SOP Sequence
                with pytest.raises(dicomnet.DimseError) as raised:
                    await assoc.n_action(STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, 7, info)
                assert raised.value.status == 0x0123  # no such action
                assert await assoc.echo() == 0
        tg.cancel_scope.cancel()
    assert store.saved == 0


async def test_no_report_in_time_is_a_timeout(net: MemoryNetwork) -> None:
    ae = dicomnet.AE("PACS")

    @ae.on_n_action(STORAGE_COMMITMENT)
    async def silent(request: dicomnet.NRequest) -> int:
        return 0  # accepts, never reports

    async with ae.serve(HOST, PORT, backend=net):
        async with dicomnet.connect(HOST, PORT, backend=net) as assoc:
            with pytest.raises(dicomnet.DicomTimeoutError):
                await assoc.request_commitment([(CT, "1.2.3.1")], timeout=0.05)


def test_the_folder_store_round_trips_and_checks_files(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    from dicomnet.pacs.commitments import check_stored_sync
    from dicomnet.services.commitment import CommitmentResult
    from dicomnet.storage import Part10File

    source = Part10File.open(get_testdata_file("CT_small.dcm"))
    (tmp_path / f"{source.sop_instance_uid}.dcm").write_bytes(source.path.read_bytes())
    (tmp_path / "1.2.3.dcm").write_bytes(b"not DICOM")
    committed, failed = check_stored_sync(
        tmp_path,
        [(CT, source.sop_instance_uid), (MR, source.sop_instance_uid), (CT, "1.2.3"), (CT, "7")],
    )
    assert committed == [(CT, source.sop_instance_uid)]
    assert failed == [
        (MR, source.sop_instance_uid, 0x0119),
        (CT, "1.2.3", 0x0110),
        (CT, "7", 0x0112),
    ]
    store = FolderReportStore(tmp_path / ".commitments")
    pending = PendingReport("2.25.5", "MOD", [(CT, "1.2")], 12.5)
    store.save(pending)
    pending.result = CommitmentResult("2.25.5", ((CT, "1.2"),), ((MR, "3", 0x0112),), "PACS")
    pending.attempts = 3
    store.save(pending)
    assert store.load() == [pending]
    (tmp_path / ".commitments" / "2.25.6.json").write_text("{broken")
    assert store.load() == [pending]  # an unreadable file is skipped, with an error logged
    store.delete("2.25.5")
    store.delete("2.25.5")
    assert [p.transaction_uid for p in store.load()] == []
    assert check_stored is not None


def test_reports_kept_in_the_database_are_each_node_s_own(postgresql_server: Any) -> None:
    """With an index in PostgreSQL, a node's undelivered reports are rows marked with
    the node: it finds its own again after a restart, and only its own."""
    url = postgres.fresh_schema(postgresql_server)
    node_a = DatabaseReportStore(url, "a")
    pending = PendingReport("2.25.5", "MOD", [(CT, "1.2")], 12.5)
    node_a.save(pending)
    pending.result = CommitmentResult("2.25.5", ((CT, "1.2"),), ((MR, "3", 0x0112),), "PACS")
    pending.attempts = 3
    node_a.save(pending)
    node_b = DatabaseReportStore(url, "b")
    node_b.save(PendingReport("2.25.6", "MOD", [(CT, "1.3")], 13.0))
    node_a.close()
    again = DatabaseReportStore(url, "a")  # a restarted
    assert again.load() == [pending]
    assert [p.transaction_uid for p in node_b.load()] == ["2.25.6"]
    again.delete("2.25.5")
    again.delete("2.25.5")
    assert again.load() == []
    again.close()
    node_b.close()


def test_a_report_store_out_of_reach_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="storage commitment reports"):
        DatabaseReportStore("postgresql://nobody@127.0.0.1:1/none", "a")
