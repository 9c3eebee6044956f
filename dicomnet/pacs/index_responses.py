"""C-FIND response identifiers of the index: each from a row of its plan's SQL (and the
stored file, for the keys the index does not hold), with the Specific Character Set its
values need. See `dicomnet.pacs.index`."""

from __future__ import annotations

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicomnet.pacs.index_files import encodable, from_text, has_non_ascii, pairs_match
from dicomnet.pacs.index_plan import FindPlan, Output
from dicomnet.pacs.index_schema import TRUSTED
from dicomnet.pacs.matching import match_sequence, matches

__all__ = ["find_response"]


def find_response(
    plan: FindPlan, row: tuple[str | None, ...], source: Dataset | None
) -> Dataset | None:
    """The response identifier of one row of `plan`'s SQL, or None when a key read
    from the stored file `source` does not match (PS3.4 §C.2.2.2)."""
    out = Dataset()
    for output in plan.outputs:
        if output.source == "column":
            value = from_text(output.vr, row[output.index])
            out.add(DataElement(output.tag, output.vr, value, validation_mode=TRUSTED))
        elif output.source == "level":
            out.add(DataElement(output.tag, "CS", plan.level))
        elif output.source == "online":
            out.add(DataElement(output.tag, "CS", "ONLINE"))
        elif output.source == "echo":
            assert output.key is not None
            out.add(DataElement(output.tag, output.key.VR, output.key.value))
        else:
            elem = _file_value(output, source)
            if elem is None:
                return None
            out.add(elem)
    if not pairs_match(plan.pairs, out):
        return None
    if has_non_ascii(out):
        if plan.charset is not None and encodable(out, plan.charset):
            out.SpecificCharacterSet = plan.charset[0]
        else:
            out.SpecificCharacterSet = "ISO_IR 192"
    elif plan.charset is not None:
        out.SpecificCharacterSet = plan.charset if len(plan.charset) > 1 else plan.charset[0]
    return out


def _file_value(output: Output, source: Dataset | None) -> DataElement | None:
    """The response element of a key read from the file, or None if it does not match."""
    key = output.key
    assert key is not None
    found = source.get(output.tag) if source is not None else None
    if key.VR == "SQ":
        candidate = found.value if found is not None and found.VR == "SQ" else None
        items = match_sequence(key.value, candidate)
        if items is None:
            return None
        return DataElement(output.tag, "SQ", DicomSequence(items))
    value = None if found is None else found.value
    if output.filter and not matches(key.value, key.VR, value):
        return None
    if found is None:
        return DataElement(output.tag, key.VR, None)
    return DataElement(output.tag, found.VR, value)
