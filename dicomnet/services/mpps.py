"""Modality Performed Procedure Step (PS3.4 Annex F): the SCP's rules, on DIMSE-N.

A modality N-CREATEs an instance IN PROGRESS and N-SETs it, finally to COMPLETED or
DISCONTINUED, after which it may no longer be changed (PS3.4 §F.7.2.2.3). `MPPSSCP`
checks each request against Table F.7.2-1 (what N-CREATE requires, what N-SET may
not touch, what the final state needs) and keeps the instances in an `MPPSStore`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import anyio.to_thread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from dicomnet.association import Handlers
from dicomnet.errors import DimseError
from dicomnet.proto.contexts import MODALITY_PERFORMED_PROCEDURE_STEP
from dicomnet.services.nservices import N_CREATE, N_SET, NRequest, handler_key

__all__ = [
    "COMPLETED",
    "DISCONTINUED",
    "IN_PROGRESS",
    "MPPS",
    "MPPSSCP",
    "MPPSStore",
    "check_create",
    "check_set",
]

log = logging.getLogger("dicomnet")

MPPS = MODALITY_PERFORMED_PROCEDURE_STEP
IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
STATUS = "PerformedProcedureStepStatus"
# PS3.4 §F.7.2.2.3: N-SET of an instance no longer IN PROGRESS.
NO_LONGER_UPDATABLE = (0x0110, 0xA710, "Performed Procedure Step Object may no longer be updated")

# PS3.4 Table F.7.2-1, N-CREATE column: type 1 (a value required) and type 2 (present).
_CREATE_TYPE_1 = (
    "ScheduledStepAttributesSequence",
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    STATUS,
    "Modality",
)
_CREATE_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "ReferencedPatientSequence",
    "PerformedStationName",
    "PerformedLocation",
    "PerformedProcedureStepDescription",
    "PerformedProcedureTypeDescription",
    "ProcedureCodeSequence",
    "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndTime",
    "StudyID",
    "PerformedProtocolCodeSequence",
    "PerformedSeriesSequence",
)
# In each Scheduled Step Attributes Sequence item.
_STEP_TYPE_1 = ("StudyInstanceUID",)
_STEP_TYPE_2 = (
    "ReferencedStudySequence",
    "AccessionNumber",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "ScheduledProcedureStepID",
    "ScheduledProcedureStepDescription",
    "ScheduledProtocolCodeSequence",
)
# N-SET column "Not allowed".
_SET_NOT_ALLOWED = (
    "ScheduledStepAttributesSequence",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate",
    "PatientSex",
    "ReferencedPatientSequence",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID",
    "IssuerOfServiceEpisodeIDSequence",
    "ServiceEpisodeDescription",
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedStationName",
    "PerformedLocation",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "Modality",
    "StudyID",
    "SOPInstanceUID",
    "SOPClassUID",
)
# What the final state (COMPLETED or DISCONTINUED) requires a value of.
_FINAL_TYPE_1 = ("PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime")


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return int(tag)


def _missing(dataset: Dataset, keywords: Iterable[str], *, need_value: bool) -> list[int]:
    return [
        _tag(k)
        for k in keywords
        if k not in dataset or (need_value and dataset[k].value in (None, "", []))
    ]


@dataclass(frozen=True, slots=True)
class _Refusal:
    status: int
    text: str
    attributes: tuple[int, ...] = ()

    def error(self) -> DimseError:
        return DimseError(self.status, self.text, attributes=self.attributes)


def _refuse_missing(dataset: Dataset, type_1: Iterable[str], type_2: Iterable[str]) -> None:
    absent = _missing(dataset, (*type_1, *type_2), need_value=False)
    if absent:
        raise _Refusal(0x0120, "missing attribute(s)", tuple(absent)).error()
    empty = _missing(dataset, type_1, need_value=True)
    if empty:
        raise _Refusal(0x0121, "missing attribute value(s)", tuple(empty)).error()


def check_create(dataset: Dataset, *, strict: bool = True) -> None:
    """Raise `DimseError` unless `dataset` may create an MPPS instance (PS3.4
    §F.7.2.1.3; Table F.7.2-1): 0x0120 missing attribute, 0x0121 missing value, 0x0106
    status other than IN PROGRESS. Without `strict`, absent type 2 attributes pass."""
    _refuse_missing(dataset, _CREATE_TYPE_1, _CREATE_TYPE_2 if strict else ())
    for item in dataset.ScheduledStepAttributesSequence:
        _refuse_missing(item, _STEP_TYPE_1, _STEP_TYPE_2 if strict else ())
    if str(dataset.get(STATUS, "")).strip() != IN_PROGRESS:
        raise _Refusal(
            0x0106, "the status of a new step must be IN PROGRESS", (_tag(STATUS),)
        ).error()


def check_set(current: Dataset, modifications: Dataset) -> Dataset:
    """The instance after `modifications` (PS3.4 §F.7.2.2), or `DimseError`: 0x0110 once
    COMPLETED or DISCONTINUED; 0x0106 for an attribute N-SET may not change or a bad
    status; 0x0121 when the final state lacks a value it requires."""
    if str(current.get(STATUS, "")).strip() != IN_PROGRESS:
        status, error_id, text = NO_LONGER_UPDATABLE
        raise DimseError(status, text, error_id=error_id)
    forbidden = [_tag(k) for k in _SET_NOT_ALLOWED if k in modifications]
    if forbidden:
        raise _Refusal(0x0106, "N-SET may not change these", tuple(forbidden)).error()
    updated = Dataset()
    updated.update(current)
    updated.update(modifications)
    new_status = str(updated.get(STATUS, "")).strip()
    if new_status not in (IN_PROGRESS, COMPLETED, DISCONTINUED):
        raise _Refusal(0x0106, f"no such status {new_status!r}", (_tag(STATUS),)).error()
    if new_status != IN_PROGRESS:
        empty = _missing(updated, _FINAL_TYPE_1, need_value=True)
        if not updated.get("PerformedSeriesSequence"):
            empty.append(_tag("PerformedSeriesSequence"))
        if empty:
            raise _Refusal(0x0121, f"{new_status} needs values", tuple(empty)).error()
    return updated


class MPPSStore(Protocol):
    """Where MPPS instances are kept (blocking calls, run in worker threads)."""

    def create(self, sop_instance_uid: str, dataset: Dataset) -> bool:
        """Keep a new instance; False if one of that UID exists."""
        ...

    def get(self, sop_instance_uid: str) -> Dataset | None: ...

    def replace(self, sop_instance_uid: str, dataset: Dataset, status_was: str) -> bool:
        """Replace an instance if its status is still `status_was`; False otherwise."""
        ...


class MPPSSCP:
    """The MPPS SCP (PS3.4 §F.7): N-CREATE and N-SET checked and kept in `store`.

    `strict`: refuse an N-CREATE that lacks a type 2 attribute (as the standard says);
    some modalities leave some out, so this can be relaxed."""

    def __init__(self, store: MPPSStore, *, strict: bool = True) -> None:
        self.store = store
        self.strict = strict

    def install(self, handlers: Handlers) -> None:
        """Answer N-CREATE and N-SET of the MPPS SOP class (an AE's handlers)."""
        handlers.set(handler_key(N_CREATE, MPPS), self.on_create)
        handlers.set(handler_key(N_SET, MPPS), self.on_set)

    async def on_create(self, request: NRequest) -> int:
        dataset = request.dataset if request.dataset is not None else Dataset()
        check_create(dataset, strict=self.strict)
        uid = request.sop_instance_uid
        dataset.SOPClassUID = MPPS
        dataset.SOPInstanceUID = uid
        if not await anyio.to_thread.run_sync(self.store.create, uid, dataset):
            raise DimseError(0x0111, "an MPPS instance of this UID exists")
        log.info("MPPS %s created IN PROGRESS by %r", uid, request.association.peer_ae_title)
        return 0x0000

    async def on_set(self, request: NRequest) -> int:
        uid = request.sop_instance_uid
        current = await anyio.to_thread.run_sync(self.store.get, uid)
        if current is None:
            raise DimseError(0x0112, "no such MPPS instance")
        updated = check_set(current, request.dataset or Dataset())
        if not await anyio.to_thread.run_sync(self.store.replace, uid, updated, IN_PROGRESS):
            status, error_id, text = NO_LONGER_UPDATABLE  # changed meanwhile
            raise DimseError(status, text, error_id=error_id)
        log.info("MPPS %s set, now %s", uid, updated.get(STATUS))
        return 0x0000
