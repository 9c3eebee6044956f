"""A small modality worklist for the worklist tests, built with pydicom.

Seven items, one Scheduled Procedure Step each except ACC7 (two: a CT step on CT2 and an
MR step on MR2). Every test states the items it expects by hand, from this table:

| item | patient       | SPS: modality, station AE, start date, time, performing physician |
|------|---------------|-------------------------------------------------------------------|
| ACC1 | Doe^John      | MR, MR1, 20261201, 0800, Smith^Anna                              |
| ACC2 | Doe^Jane      | CT, CT1, 20261201, 2300, Jones^Bob                               |
| ACC3 | Müller^Hans   | MR, MR2, 20261202, 0130, Smith^Carl   (ISO_IR 100)               |
| ACC4 | Roe^Richard   | US, US1, 20261203, 1200, Brown^Dan                               |
| ACC5 | Smith^Alice   | CT, CT1, 20261204, 0900, Smith^Anna                              |
| ACC6 | Dole^Bob      | MR, MR1, 20261130, 1000, Jones^Eve                               |
| ACC7 | Poe^Edgar     | CT, CT2, 20261202, 1000, Brown^Dan; MR, MR2, 20261205, 1400, -   |

Only ACC1 and ACC4 have a Patient's Birth Date; no item has a Scheduled Procedure Step
Location (0040,0011) or Patient's Weight. Nothing here imports dicomnet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"


@dataclass(frozen=True)
class Step:
    modality: str
    station: str
    date: str
    time: str
    physician: str | None
    step_id: str


@dataclass(frozen=True)
class Item:
    accession: str
    patient: str
    steps: tuple[Step, ...]
    birth_date: str | None = None
    charset: str | None = None


ITEMS = (
    Item(
        "ACC1", "Doe^John", (Step("MR", "MR1", "20261201", "0800", "Smith^Anna", "S1"),), "19700101"
    ),
    Item("ACC2", "Doe^Jane", (Step("CT", "CT1", "20261201", "2300", "Jones^Bob", "S2"),)),
    Item(
        "ACC3",
        "Müller^Hans",
        (Step("MR", "MR2", "20261202", "0130", "Smith^Carl", "S3"),),
        charset="ISO_IR 100",
    ),
    Item(
        "ACC4",
        "Roe^Richard",
        (Step("US", "US1", "20261203", "1200", "Brown^Dan", "S4"),),
        "19851231",
    ),
    Item("ACC5", "Smith^Alice", (Step("CT", "CT1", "20261204", "0900", "Smith^Anna", "S5"),)),
    Item("ACC6", "Dole^Bob", (Step("MR", "MR1", "20261130", "1000", "Jones^Eve", "S6"),)),
    Item(
        "ACC7",
        "Poe^Edgar",
        (
            Step("CT", "CT2", "20261202", "1000", "Brown^Dan", "S7a"),
            Step("MR", "MR2", "20261205", "1400", None, "S7b"),
        ),
    ),
)


def step_dataset(step: Step) -> Dataset:
    sps = Dataset()
    sps.Modality = step.modality
    sps.ScheduledStationAETitle = step.station
    sps.ScheduledProcedureStepStartDate = step.date
    sps.ScheduledProcedureStepStartTime = step.time
    if step.physician is not None:
        sps.ScheduledPerformingPhysicianName = step.physician
    sps.ScheduledProcedureStepID = step.step_id
    sps.ScheduledProcedureStepDescription = f"{step.modality} exam"
    return sps


def item_dataset(item: Item) -> Dataset:
    ds = Dataset()
    if item.charset is not None:
        ds.SpecificCharacterSet = item.charset
    ds.AccessionNumber = item.accession
    ds.PatientName = item.patient
    ds.PatientID = "P" + item.accession[3:]
    ds.PatientSex = "O"
    if item.birth_date is not None:
        ds.PatientBirthDate = item.birth_date
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.1452.99.{item.accession[3:]}"
    ds.RequestedProcedureID = "RP" + item.accession[3:]
    ds.ScheduledProcedureStepSequence = [step_dataset(step) for step in item.steps]
    return ds


def datasets() -> list[Dataset]:
    return [item_dataset(item) for item in ITEMS]


def write_part10(dataset: Dataset, path: Path) -> Path:
    """`dataset` as a Part-10 file (preamble, file meta, explicit VR little endian)."""
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = MODALITY_WORKLIST_FIND
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.StudyInstanceUID + ".1"
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.save_as(path, enforce_file_format=True)
    return path


def write_worklist(folder: Path) -> list[Path]:
    """Every item as `<accession>.wl` in `folder` (made if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [write_part10(item_dataset(item), folder / f"{item.accession}.wl") for item in ITEMS]
