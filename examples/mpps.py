"""A modality reports a procedure step to a RIS: N-CREATE when it starts, N-SET when it
is done (Modality Performed Procedure Step, PS3.4 Annex F); the RIS refuses what the
standard does not allow, and keeps the steps where an application can look them up.

Everything runs in this process: the RIS is the embedded SCP of `dicomnet serve`.

Run: python examples/mpps.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import anyio
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

import dicomnet
from dicomnet.pacs.scp import StorageSCP
from dicomnet.services.mpps import MPPS


def started(study_uid: str) -> Dataset:
    """What a modality sends when it starts (PS3.4 Table F.7.2-1, N-CREATE)."""
    step = Dataset()
    step.StudyInstanceUID = study_uid
    step.ReferencedStudySequence = Sequence()
    step.AccessionNumber = "A1001"
    step.RequestedProcedureID = "RP1"
    step.RequestedProcedureDescription = "CT head"
    step.ScheduledProcedureStepID = "SPS1"
    step.ScheduledProcedureStepDescription = "CT head without contrast"
    step.ScheduledProtocolCodeSequence = Sequence()
    ds = Dataset()
    ds.ScheduledStepAttributesSequence = Sequence([step])
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^J", "P1", "", "O"
    ds.ReferencedPatientSequence = Sequence()
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "CT1"
    ds.PerformedStationName = ds.PerformedLocation = ""
    ds.PerformedProcedureStepStartDate, ds.PerformedProcedureStepStartTime = "20261205", "0930"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription = ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = Sequence()
    ds.PerformedProcedureStepEndDate = ds.PerformedProcedureStepEndTime = ""
    ds.Modality = "CT"
    ds.StudyID = ""
    ds.PerformedProtocolCodeSequence = Sequence()
    ds.PerformedSeriesSequence = Sequence()
    return ds


def completed() -> Dataset:
    """What it sends when it is done (N-SET to COMPLETED, with the series made)."""
    series = Dataset()
    series.SeriesInstanceUID = generate_uid()
    series.ProtocolName = "HEAD"
    series.PerformingPhysicianName = series.OperatorsName = ""
    series.SeriesDescription = series.RetrieveAETitle = ""
    series.ReferencedImageSequence = Sequence()
    series.ReferencedNonImageCompositeSOPInstanceSequence = Sequence()
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.PerformedProcedureStepEndDate, ds.PerformedProcedureStepEndTime = "20261205", "0955"
    ds.PerformedSeriesSequence = Sequence([series])
    return ds


async def main(storage: Path) -> None:
    ris = StorageSCP(storage, ae_title="RIS")
    async with ris.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port, aet="CT1", aec="RIS") as assoc:
            created = await assoc.n_create(MPPS, started(generate_uid()))
            uid = created.sop_instance_uid
            assert uid is not None
            print(f"N-CREATE: {created.status.description}, step {uid[-12:]} IN PROGRESS")
            done = await assoc.n_set(MPPS, uid, completed())
            print(f"N-SET COMPLETED: {done.status.description}")
            try:
                await assoc.n_set(MPPS, uid, completed())
            except dicomnet.DimseError as error:  # PS3.4 F.7.2.2.3: no change after that
                print(f"N-SET again: refused {error.status} ({error.error_comment})")
    for step in ris.mpps.find(status="COMPLETED"):
        print(f"RIS: {step.PatientID} {step.Modality} step {step.PerformedProcedureStepID} done")
    ris.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        anyio.run(main, Path(folder))
