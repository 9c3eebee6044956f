"""DIMSE status codes as an int subclass (PS3.7 Annex C)."""

from __future__ import annotations

from enum import Enum

__all__ = ["Status", "StatusCategory"]


class StatusCategory(str, Enum):
    SUCCESS = "Success"
    WARNING = "Warning"
    FAILURE = "Failure"
    CANCEL = "Cancel"
    PENDING = "Pending"


_NAMES: dict[int, str] = {
    0x0000: "Success",
    0x0001: "Warning: requested optional attributes are not supported",
    0x0105: "No such attribute",
    0x0106: "Invalid attribute value",
    0x0107: "Attribute list error",
    0x0110: "Processing failure",
    0x0111: "Duplicate SOP Instance",
    0x0112: "No such SOP Instance",
    0x0113: "No such event type",
    0x0114: "No such argument",
    0x0115: "Invalid argument value",
    0x0116: "Attribute value out of range",
    0x0117: "Invalid object instance",
    0x0118: "No such SOP Class",
    0x0119: "Class-instance conflict",
    0x0120: "Missing attribute",
    0x0121: "Missing attribute value",
    0x0122: "SOP Class not supported",
    0x0123: "No such action",
    0x0124: "Not authorized",
    0x0210: "Duplicate invocation",
    0x0211: "Unrecognized operation",
    0x0212: "Mistyped argument",
    0x0213: "Resource limitation",
    0xA700: "Out of resources",
    0xA701: "Out of resources: unable to calculate number of matches",
    0xA702: "Out of resources: unable to perform sub-operations",
    0xA801: "Move destination unknown",
    0xA900: "Data set does not match SOP Class",
    0xB000: "Coercion of data elements / sub-operations complete with failures",
    0xB006: "Elements discarded",
    0xB007: "Data set does not match SOP Class (warning)",
    0xC000: "Cannot understand",
    0xFE00: "Cancel",
    0xFF00: "Pending",
    0xFF01: "Pending: optional keys not supported",
}


class Status(int):
    """A DIMSE Status (0000,0900) value; an `int` that knows its category (PS3.7 §C.1)."""

    __slots__ = ()

    def __new__(cls, value: int) -> Status:
        value = int(value)
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"status {value!r} is not a 16-bit value")
        return super().__new__(cls, value)

    @property
    def category(self) -> StatusCategory:
        v = int(self)
        if v == 0x0000:
            return StatusCategory.SUCCESS
        if v in (0xFF00, 0xFF01):
            return StatusCategory.PENDING
        if v == 0xFE00:
            return StatusCategory.CANCEL
        if v == 0x0001 or v == 0x0107 or v == 0x0116 or (v & 0xF000) == 0xB000:
            return StatusCategory.WARNING
        return StatusCategory.FAILURE

    @property
    def is_success(self) -> bool:
        return self.category is StatusCategory.SUCCESS

    @property
    def is_warning(self) -> bool:
        return self.category is StatusCategory.WARNING

    @property
    def is_failure(self) -> bool:
        return self.category is StatusCategory.FAILURE

    @property
    def is_pending(self) -> bool:
        return self.category is StatusCategory.PENDING

    @property
    def is_cancel(self) -> bool:
        return self.category is StatusCategory.CANCEL

    @property
    def description(self) -> str:
        v = int(self)
        if v in _NAMES:
            return _NAMES[v]
        if 0xA700 <= v <= 0xA7FF:
            return "Out of resources"
        if 0xA900 <= v <= 0xA9FF:
            return "Data set does not match SOP Class"
        if 0xC000 <= v <= 0xCFFF:
            return "Cannot understand"
        return self.category.value

    def __repr__(self) -> str:
        return f"Status(0x{int(self):04X} {self.description})"

    def __str__(self) -> str:
        return f"0x{int(self):04X}"
