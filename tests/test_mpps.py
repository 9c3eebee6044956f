"""MPPS (PS3.4 Annex F) between dicomnet's SCU and `MPPSSCP` in memory: the life cycle
and every refusal, with the statuses and Attribute Identifier Lists of Table F.7.2-1;
and the instances kept in the index database."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import index_location
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom_n import mpps_final, mpps_in_progress

import dicomnet
from dicomnet.pacs.index import INDEX_FILE_NAME, Index
from dicomnet.pacs.mpps import MPPSRecords
from dicomnet.proto.contexts import PresentationContext
from dicomnet.services.mpps import MPPS, MPPSSCP
from dicomnet.testing import FakeClock, MemoryNetwork

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

HOST, PORT = "ris.test", 104


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def new_step() -> Dataset:
    """An N-CREATE data set with every type 1 and type 2 attribute of Table F.7.2-1."""
    return mpps_in_progress(PatientName="Doe^Jane", PatientID="P1", PerformedStationAETitle="CT1")


class Steps:
    """An `MPPSStore` in memory."""

    def __init__(self) -> None:
        self.steps: dict[str, Dataset] = {}

    def create(self, uid: str, dataset: Dataset) -> bool:
        if uid in self.steps:
            return False
        self.steps[uid] = dataset
        return True

    def get(self, uid: str) -> Dataset | None:
        return self.steps.get(uid)

    def replace(self, uid: str, dataset: Dataset, status_was: str) -> bool:
        if self.steps[uid].PerformedProcedureStepStatus != status_was:
            return False
        self.steps[uid] = dataset
        return True


async def refused(call: object) -> dicomnet.DimseError:
    with pytest.raises(dicomnet.DimseError) as raised:
        await call  # type: ignore[misc]
    return raised.value


async def test_the_life_cycle_and_every_refusal() -> None:
    net = MemoryNetwork(FakeClock())
    store = Steps()
    ae = dicomnet.AE("RIS")
    MPPSSCP(store).install(ae.handlers)
    async with ae.serve(HOST, PORT, backend=net):
        async with dicomnet.connect(
            HOST, PORT, contexts=[PresentationContext(MPPS)], backend=net
        ) as assoc:
            created = await assoc.n_create(MPPS, new_step(), instance="1.2.3.4")
            assert created.status == 0 and created.sop_instance_uid == "1.2.3.4"
            error = await refused(assoc.n_create(MPPS, new_step(), instance="1.2.3.4"))
            assert error.status == 0x0111  # duplicate SOP instance

            given = await assoc.n_create(MPPS, new_step())  # the SCP assigns the UID
            assert given.sop_instance_uid and given.sop_instance_uid.startswith("2.25.")
            assert given.sop_instance_uid in store.steps

            change = Dataset()
            change.PerformedProcedureStepDescription = "head without contrast"
            assert (await assoc.n_set(MPPS, "1.2.3.4", change)).status == 0
            forbidden = Dataset()
            forbidden.PatientID = "P2"
            forbidden.Modality = "MR"
            error = await refused(assoc.n_set(MPPS, "1.2.3.4", forbidden))
            assert error.status == 0x0106
            assert error.response.attribute_identifiers == (0x00100020, 0x00080060)
            early = Dataset()
            early.PerformedProcedureStepStatus = "COMPLETED"
            error = await refused(assoc.n_set(MPPS, "1.2.3.4", early))
            assert error.status == 0x0121  # the final state needs its end and series
            strange = Dataset()
            strange.PerformedProcedureStepStatus = "PAUSED"
            assert (await refused(assoc.n_set(MPPS, "1.2.3.4", strange))).status == 0x0106

            assert (await assoc.n_set(MPPS, "1.2.3.4", mpps_final())).status == 0
            error = await refused(assoc.n_set(MPPS, "1.2.3.4", change))
            assert error.status == 0x0110
            assert error.error_comment == "Performed Procedure Step Object may no longer be updated"
            assert (await refused(assoc.n_set(MPPS, "9.9.9", change))).status == 0x0112

            assert (
                await assoc.n_set(MPPS, given.sop_instance_uid, mpps_final("DISCONTINUED"))
            ).status == 0
            assert (await refused(assoc.n_delete(MPPS, "1.2.3.4"))).status == 0x0211
    final = store.steps["1.2.3.4"]
    assert final.PerformedProcedureStepStatus == "COMPLETED"
    assert final.PerformedProcedureStepDescription == "head without contrast"
    assert final.PatientID == "P1" and final.SOPInstanceUID == "1.2.3.4"


@pytest.mark.parametrize(
    ("change", "status", "attributes"),
    [
        (lambda ds: delattr(ds, "Modality"), 0x0120, (0x00080060,)),
        (lambda ds: delattr(ds, "PatientName"), 0x0120, (0x00100010,)),
        (lambda ds: setattr(ds, "PerformedStationAETitle", ""), 0x0121, (0x00400241,)),
        (
            lambda ds: setattr(ds, "PerformedProcedureStepStatus", "COMPLETED"),
            0x0106,
            (0x00400252,),
        ),
        (
            lambda ds: delattr(ds.ScheduledStepAttributesSequence[0], "StudyInstanceUID"),
            0x0120,
            (0x0020000D,),
        ),
        (
            lambda ds: setattr(ds, "ScheduledStepAttributesSequence", Sequence()),
            0x0121,
            (0x00400270,),
        ),
    ],
)
async def test_an_incomplete_create_is_refused(
    change: object, status: int, attributes: tuple[int, ...]
) -> None:
    net = MemoryNetwork(FakeClock())
    store = Steps()
    ae = dicomnet.AE("RIS")
    MPPSSCP(store).install(ae.handlers)
    step = new_step()
    change(step)  # type: ignore[operator]
    async with ae.serve(HOST, PORT, backend=net):
        async with dicomnet.connect(
            HOST, PORT, contexts=[PresentationContext(MPPS)], backend=net
        ) as assoc:
            error = await refused(assoc.n_create(MPPS, step, instance="1.2.3"))
    assert error.status == status
    assert error.response.attribute_identifiers == attributes
    assert store.steps == {}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_mpps_records_share_the_index_database(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    database = index_location(request, backend, tmp_path / INDEX_FILE_NAME)
    with Index(database, root=tmp_path):
        records = MPPSRecords(database)
        step = new_step()
        step.SOPInstanceUID = "1.2.3"
        study = step.ScheduledStepAttributesSequence[0].StudyInstanceUID
        assert records.create("1.2.3", step)
        assert not records.create("1.2.3", step)
        done = Dataset()
        done.update(step)
        done.update(mpps_final())
        done.SOPInstanceUID = "1.2.3"
        assert records.replace("1.2.3", done, "IN PROGRESS")
        assert not records.replace("1.2.3", done, "IN PROGRESS")  # no longer IN PROGRESS
        records.close()
    with Index(database, root=tmp_path) as index:  # the index opens it again, as is
        assert not index.created
    again = MPPSRecords(database)
    kept = again.get("1.2.3")
    assert kept is not None and kept.PerformedProcedureStepStatus == "COMPLETED"
    assert [d.SOPInstanceUID for d in again.find(status="COMPLETED", patient_id="P1")] == ["1.2.3"]
    assert again.find(status="IN PROGRESS") == []
    assert again.find(study_instance_uid=study)[0].PerformedSeriesSequence[0].ProtocolName == "HEAD"
    assert again.get("9.9") is None
    again.close()
