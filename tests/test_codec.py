"""The fast codec for flat data sets gives exactly what pydicom gives, or hands over."""

from __future__ import annotations

import datetime
import io
import os
from pathlib import Path
from typing import Any

import pydicom.data
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomnet.proto.codec import decode_flat, encode_flat, scan_part10_head
from dicomnet.storage import Part10File, decode_dataset, encode_dataset

ascii_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\"))
dates = st.one_of(
    st.just(""), st.dates(min_value=datetime.date(1900, 1, 1)).map(lambda d: f"{d:%Y%m%d}")
)
times = st.one_of(st.just(""), st.times().map(lambda t: f"{t:%H%M%S}"))
uid = st.lists(st.integers(0, 99999), min_size=1, max_size=6).map(
    lambda parts: ".".join(str(p) for p in parts)
)
person_name = st.lists(
    st.text(st.sampled_from("ABCXYZabc ^"), max_size=10), min_size=1, max_size=3
).map("=".join)

# (keyword, strategy of values as a user would assign them)
ELEMENTS: list[tuple[str, st.SearchStrategy[Any]]] = [
    ("SpecificCharacterSet", st.sampled_from(["", "ISO_IR 100", "ISO_IR 192"])),
    ("QueryRetrieveLevel", st.sampled_from(["PATIENT", "STUDY", "SERIES", "IMAGE", ""])),
    ("RetrieveAETitle", ascii_text.map(lambda s: s[:16])),
    ("StudyDate", dates),
    ("StudyTime", times),
    ("AccessionNumber", ascii_text.map(lambda s: s[:16])),
    ("ModalitiesInStudy", st.lists(st.sampled_from(["CT", "MR", "US", "SR"]), max_size=3)),
    ("PatientName", person_name),
    ("OtherPatientNames", st.lists(person_name, max_size=3)),
    ("PatientID", ascii_text.map(lambda s: s[:64])),
    ("PatientComments", ascii_text),
    ("InstitutionAddress", ascii_text),
    ("StudyInstanceUID", uid),
    ("SOPClassesInStudy", st.lists(uid, max_size=3)),
    ("NumberOfStudyRelatedInstances", st.one_of(st.just(""), st.integers(0, 10**6))),
    ("SliceThickness", st.one_of(st.just(""), st.sampled_from(["1.5", "0.625", "10"]))),
    ("PixelSpacing", st.lists(st.sampled_from(["0.5", "0.7", "1"]), max_size=2)),
    ("Rows", st.integers(0, 0xFFFF)),
    ("SimpleFrameList", st.lists(st.integers(0, 2**32 - 1), max_size=4)),
    ("ReferencePixelX0", st.integers(-(2**31), 2**31 - 1)),
    ("PixelIntensityRelationshipSign", st.integers(-(2**15), 2**15 - 1)),
    ("EffectiveEchoTime", st.floats(allow_nan=False, width=64)),
    ("RecommendedDisplayFrameRateInFloat", st.floats(allow_nan=False, width=32)),
    ("ICCProfile", st.binary(max_size=20).map(lambda b: b[: len(b) // 2 * 2])),
]


@st.composite
def flat_datasets(draw: st.DrawFn) -> Dataset:
    ds = Dataset()
    chosen = draw(st.lists(st.sampled_from(range(len(ELEMENTS))), unique=True, max_size=12))
    for i in chosen:
        keyword, values = ELEMENTS[i]
        setattr(ds, keyword, draw(values))
    return ds


def pydicom_encode(ds: Dataset, implicit: bool) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


def pydicom_decode(data: bytes, implicit: bool) -> Dataset:
    return read_dataset(io.BytesIO(data), implicit, True)


@settings(max_examples=300, deadline=None)
@given(ds=flat_datasets(), implicit=st.booleans())
def test_encode_flat_is_what_pydicom_writes(ds: Dataset, implicit: bool) -> None:
    assert encode_flat(ds, implicit) == pydicom_encode(ds, implicit)


@settings(max_examples=300, deadline=None)
@given(ds=flat_datasets(), implicit=st.booleans())
def test_decode_flat_is_what_pydicom_reads(ds: Dataset, implicit: bool) -> None:
    data = pydicom_encode(ds, implicit)
    ours = decode_flat(data, implicit)
    assert ours is not None
    theirs = pydicom_decode(data, implicit)
    assert dict(ours.items()) == dict(theirs.items())
    assert ours.original_encoding == theirs.original_encoding
    assert ours.original_character_set == theirs.original_character_set
    # Raw elements are written back unchanged, in the same encoding.
    assert encode_flat(ours, implicit) == data
    # The values convert as pydicom's own do.
    for element in ds:
        assert ours[element.tag].value == theirs[element.tag].value


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64), implicit=st.booleans())
def test_decode_flat_never_raises(data: bytes, implicit: bool) -> None:
    result = decode_flat(data, implicit)
    if result is not None:
        # Whatever it accepted is well formed: it encodes back to the same bytes.
        assert encode_flat(result, implicit) == data


def test_sequences_are_left_to_pydicom() -> None:
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    ds = Dataset()
    ds.PatientID = "X"
    ds.ReferencedSOPSequence = Sequence([item])
    assert encode_flat(ds, True) is None
    for implicit in (True, False):
        data = pydicom_encode(ds, implicit)
        if not implicit:
            assert decode_flat(data, implicit) is None
        ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        decoded = decode_dataset(data, ts)
        assert decoded.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.3"
        assert encode_dataset(decoded, ts) == data


def test_undefined_length_is_left_to_pydicom() -> None:
    item = Dataset()
    item.CodeValue = "A"
    ds = Dataset()
    ds.ProcedureCodeSequence = Sequence([item])
    ds["ProcedureCodeSequence"].is_undefined_length = True
    data = pydicom_encode(ds, implicit=True)
    assert decode_flat(data, True) is None
    assert decode_dataset(data, ImplicitVRLittleEndian).ProcedureCodeSequence[0].CodeValue == "A"


@pytest.mark.parametrize("implicit", [True, False])
def test_text_that_is_not_ascii_is_left_to_pydicom(implicit: bool) -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jürgen"
    assert encode_flat(ds, implicit) is None
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    data = encode_dataset(ds, ts)
    assert data == pydicom_encode(ds, implicit)
    decoded = decode_dataset(data, ts)
    assert decoded.PatientName == "Müller^Jürgen"
    # A decoded data set keeps its raw bytes, and its character set, when sent on.
    assert encode_dataset(decoded, ts) == data


def test_ambiguous_vr_is_left_to_pydicom() -> None:
    ds = Dataset()
    ds.PixelRepresentation = 1
    ds.SmallestImagePixelValue = -5  # 'US or SS', resolved by Pixel Representation
    assert encode_flat(ds, False) is None
    data = encode_dataset(ds, ExplicitVRLittleEndian)
    assert decode_dataset(data, ExplicitVRLittleEndian).SmallestImagePixelValue == -5


def test_deflated_identifiers_round_trip() -> None:
    ds = Dataset()
    ds.PatientName = "DOE^JOHN"
    ds.PatientID = "123"
    data = encode_dataset(ds, DeflatedExplicitVRLittleEndian)
    assert len(data) % 2 == 0
    back = decode_dataset(data, DeflatedExplicitVRLittleEndian)
    assert back.PatientName == "DOE^JOHN"
    assert back.PatientID == "123"


def test_a_changed_character_set_makes_raw_text_go_through_pydicom() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller"
    data = pydicom_encode(ds, True)
    decoded = decode_dataset(data, ImplicitVRLittleEndian)
    decoded.SpecificCharacterSet = "ISO_IR 192"
    out = encode_dataset(decoded, ImplicitVRLittleEndian)
    assert decode_dataset(out, ImplicitVRLittleEndian).PatientName == "Müller"
    assert "Müller".encode() in out


def _pydicom_open(path: str) -> Part10File | str:
    with open(path, "rb") as f:
        head = f.read(132)
        if len(head) < 132 or head[128:132] != b"DICM":
            return _pydicom_open_bare(path)
        size = os.fstat(f.fileno()).st_size
        try:
            return Part10File._open_with_pydicom(Path(path), f, size)
        except Exception as exc:
            return "ValueError" if isinstance(exc, ValueError) else type(exc).__name__


_SYNTAXES = {
    (True, True): "1.2.840.10008.1.2",
    (False, True): "1.2.840.10008.1.2.1",
    (False, False): "1.2.840.10008.1.2.2",
}


def _pydicom_open_bare(path: str) -> Part10File | str:
    """A data set without preamble and file meta, as pydicom reads it."""
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception:
        return "not part 10"
    first = next(iter(ds.keys()), None)
    if first is None or first.group != 0x0008:
        return "not part 10"
    sop_class, sop_instance = ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
    if not sop_class or not sop_instance:
        return "ValueError"
    syntax = _SYNTAXES[ds.original_encoding]  # type: ignore[index]
    size = os.path.getsize(path)
    return Part10File(Path(path), syntax, str(sop_class), str(sop_instance), 0, size)


def _open(path: str) -> Part10File | str:
    try:
        return Part10File.open(path)
    except ValueError as exc:
        return "not part 10" if "DICM" in str(exc) else "ValueError"
    except Exception as exc:
        return type(exc).__name__


# pydicom's own test files (the local ones: nothing is downloaded).
TEST_FILES = sorted(
    str(p) for p in (Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm")
)


def test_the_quick_head_scan_agrees_with_pydicom_on_its_test_files() -> None:
    assert len(TEST_FILES) > 50
    scanned = 0
    for path in TEST_FILES:
        with open(path, "rb") as f:
            if scan_part10_head(f.read(8192)) is not None:
                scanned += 1
        assert _open(path) == _pydicom_open(path), path
    assert scanned > len(TEST_FILES) // 2  # the quick path is the common one


@settings(max_examples=300, deadline=None)
@given(
    index=st.integers(0, 10**6),
    cut=st.integers(0, 8192),
    flips=st.lists(st.tuples(st.integers(0, 8191), st.integers(0, 255)), max_size=4),
)
def test_the_head_scan_of_damaged_heads_never_raises(
    index: int, cut: int, flips: list[tuple[int, int]]
) -> None:
    with open(TEST_FILES[index % len(TEST_FILES)], "rb") as f:
        head = bytearray(f.read(8192))
    for position, value in flips:
        if position < len(head):
            head[position] = value
    result = scan_part10_head(bytes(head[:cut]))
    if result is not None:
        transfer_syntax, sop_class, sop_instance, offset = result
        assert transfer_syntax and sop_class and sop_instance
        assert 132 < offset <= cut
