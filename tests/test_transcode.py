"""Transfer syntaxes end to end: retrieving compressed instances as stored, and converting
for a peer that accepts only other syntaxes (DCMTK storescp, dcmqrscp, `dicomnet serve`).

The study: pydicom's compressed test files (JPEG Baseline, Extended and Lossless, JPEG-LS,
JPEG 2000 both kinds, RLE, deflate) and two uncompressed ones, rewritten under one patient
and study with fresh UIDs; encapsulated pixel data stays as it was.
"""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from peers import (
    HOST,
    DicomnetServer,
    StoreSCP,
    dataset_bytes,
    describe_cli,
    index_part10_tree,
    run_dicomnet,
)
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import UID, generate_uid

from dicomnet.proto.contexts import UNCOMPRESSED_TRANSFER_SYNTAXES, receiving_contexts
from dicomnet.transcode import (
    ConversionError,
    can_convert,
    conversion_target,
    convert,
    named_transfer_syntax,
)

TEST_FILES = pathlib.Path(pydicom.__file__).parent / "data" / "test_files"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
RLE = "1.2.840.10008.1.2.5"
MPEG2 = "1.2.840.10008.1.2.4.100"
SOURCES = (
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline, Secondary Capture
    "JPGExtended.dcm",  # JPEG Extended
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless, MR
    "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
    "JPEG2000.dcm",  # JPEG 2000
    "examples_jpeg2k.dcm",  # JPEG 2000 Lossless, Ultrasound
    "MR_small_RLE.dcm",  # RLE Lossless
    "image_dfl.dcm",  # Deflated Explicit VR Little Endian
    "CT_small.dcm",  # Explicit VR Little Endian
    "MR_small.dcm",
)


def _study(folder: Path, names: tuple[str, ...] = SOURCES) -> dict[str, Path]:
    """The test study in `folder`: SOP Instance UID -> file."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    out: dict[str, Path] = {}
    for n, name in enumerate(names):
        ds = dcmread(TEST_FILES / name)
        uid = generate_uid()
        ds.PatientID, ds.PatientName = "TRANSCODE-1", "TRANSCODE^STUDY"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = n + 1
        ds.StudyDate = "20260101"
        path = folder / f"{n:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out[uid] = path
    return out


def _mpeg2_instance(folder: Path) -> tuple[str, Path]:
    """An instance in a syntax no decoder exists for (MPEG2): pixel data that cannot be
    converted, in the same study's patient."""
    ds = dcmread(TEST_FILES / "CT_small.dcm")
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = MPEG2
    ds.PatientID, ds.PatientName = "TRANSCODE-1", "TRANSCODE^STUDY"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = folder / "mpeg2.dcm"
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID), path


def _syntax(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


# --- sans-IO: what converts to what ---------------------------------------------------


def test_conversion_targets_prefer_the_stored_syntax_then_explicit_little_endian() -> None:
    jpeg = "1.2.840.10008.1.2.4.50"
    assert conversion_target(jpeg, [IMPLICIT, jpeg, EXPLICIT]) == jpeg
    assert conversion_target(jpeg, [IMPLICIT, EXPLICIT]) == EXPLICIT
    assert conversion_target(jpeg, [IMPLICIT]) == IMPLICIT
    # Never compressed lossily on the way.
    assert conversion_target(EXPLICIT, ["1.2.840.10008.1.2.4.91"]) is None
    assert not can_convert(MPEG2, EXPLICIT)
    assert conversion_target(MPEG2, [EXPLICIT, IMPLICIT]) is None


def test_names_and_dcmtk_letters_name_transfer_syntaxes() -> None:
    assert named_transfer_syntax("e") == named_transfer_syntax("explicit") == EXPLICIT
    assert named_transfer_syntax("r") == RLE
    assert named_transfer_syntax("1.2.840.10008.1.2.4.80") == "1.2.840.10008.1.2.4.80"
    with pytest.raises(ValueError, match="explicit, implicit"):
        named_transfer_syntax("lzw")


@pytest.mark.parametrize("name", SOURCES[:9])
def test_decompressed_pixels_are_what_pydicom_decodes(name: str) -> None:
    ds = dcmread(TEST_FILES / name)
    source = str(ds.file_meta.TransferSyntaxUID)
    expected = dcmread(TEST_FILES / name).pixel_array
    converted = convert(ds, source, EXPLICIT)
    assert str(converted.file_meta.TransferSyntaxUID) == EXPLICIT
    assert not converted["PixelData"].is_undefined_length
    # Decoded again from the native pixel data: the same image (colour as pydicom's
    # decoder returns it: RGB after a YCbCr JPEG).
    np.testing.assert_array_equal(converted.pixel_array, expected)


def test_compressing_to_rle_is_lossless() -> None:
    ds = dcmread(TEST_FILES / "CT_small.dcm")
    expected = ds.pixel_array.copy()
    converted = convert(copy.deepcopy(ds), EXPLICIT, RLE)
    assert str(converted.file_meta.TransferSyntaxUID) == RLE
    assert converted["PixelData"].is_undefined_length
    np.testing.assert_array_equal(converted.pixel_array, expected)


def test_no_decoder_is_a_conversion_error_with_the_reason(tmp_path: Path) -> None:
    _, path = _mpeg2_instance(tmp_path)
    with pytest.raises(ConversionError, match="no decoder exists for MPEG2"):
        convert(dcmread(path), MPEG2, EXPLICIT)


def test_c_get_contexts_ask_for_each_compressed_syntax_of_the_image_classes() -> None:
    contexts = receiving_contexts()
    assert len(contexts) == 127
    mr = [c.transfer_syntaxes for c in contexts if c.abstract_syntax == "1.2.840.10008.5.1.4.1.1.4"]
    assert UNCOMPRESSED_TRANSFER_SYNTAXES in mr
    for ts in (RLE, "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1.99"):
        assert (ts,) in mr
    assert all(c.scp_role and not c.scu_role for c in contexts)


# --- end to end -------------------------------------------------------------------------


def _store(port: int, paths: list[Path], aec: str, *extra: str) -> None:
    r = run_dicomnet(["store", HOST, port, "--aec", aec, *extra, *map(str, paths)])
    assert r.returncode == 0, describe_cli(r)


def _bytes_as_stored(study: dict[str, Path], folder: Path) -> list[str]:
    received = index_part10_tree(folder)
    problems = [f"{uid} ({study[uid].name}) did not arrive" for uid in study.keys() - received]
    for uid, path in received.items():
        if uid not in study:
            problems.append(f"unexpected {uid}")
        elif _syntax(path) != _syntax(study[uid]):
            problems.append(f"{study[uid].name}: arrived in {UID(_syntax(path)).name}")
        elif dataset_bytes(path) != dataset_bytes(study[uid]):
            problems.append(f"{study[uid].name}: data set bytes differ")
    return problems


@pytest.mark.dcmtk
@pytest.mark.timeout(180)
def test_get_from_serve_receives_every_syntax_as_stored(
    tmp_path: Path, dicomnet_server: Callable[..., DicomnetServer]
) -> None:
    study = _study(tmp_path / "study")
    server = dicomnet_server(aet="ARCHIVE")
    _store(server.port, list(study.values()), "ARCHIVE")
    out = tmp_path / "got"
    r = run_dicomnet(
        ["get", HOST, server.port, "--aec", "ARCHIVE", "--out", out, "--model", "patient",
         "--level", "PATIENT", "-k", "PatientID=TRANSCODE-1"]
    )  # fmt: skip
    assert r.returncode == 0, describe_cli(r)
    assert _bytes_as_stored(study, out) == [], describe_cli(r)


# dcmqrscp accepts only uncompressed syntaxes unless an association profile (DCMTK's
# `-xf` file) lists others: this one accepts the study's classes in every syntax of it.
DCMQRSCP_PROFILE = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LittleEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[Any]
{syntaxes}
[[PresentationContexts]]
[Incoming]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = FINDStudyRootQueryRetrieveInformationModel\\Uncompressed
PresentationContext3 = GETStudyRootQueryRetrieveInformationModel\\Uncompressed
PresentationContext4 = FINDPatientRootQueryRetrieveInformationModel\\Uncompressed
PresentationContext5 = GETPatientRootQueryRetrieveInformationModel\\Uncompressed
{storage}
[Outgoing]
PresentationContext1 = VerificationSOPClass\\Uncompressed
[[SCPSCURoleSelection]]
[Roles]
{roles}
[[Profiles]]
[In]
PresentationContexts = Incoming
SCPSCURoleSelection = Roles
[Out]
PresentationContexts = Outgoing
"""


def _dcmqrscp_profile(path: Path, study: dict[str, Path]) -> Path:
    classes = sorted({str(dcmread(p, stop_before_pixels=True).SOPClassUID) for p in study.values()})
    syntaxes = sorted({_syntax(p) for p in study.values()})
    path.write_text(
        DCMQRSCP_PROFILE.format(
            syntaxes="\n".join(f"TransferSyntax{n} = {ts}" for n, ts in enumerate(syntaxes, 1)),
            storage="\n".join(
                f"PresentationContext{n} = {uid}\\Any" for n, uid in enumerate(classes, 6)
            ),
            roles="\n".join(f"Role{n} = {uid}\\SCP" for n, uid in enumerate(classes, 1)),
        )
    )
    return path


def _pixel_data(path: Path) -> bytes:
    ds = dcmread(path)
    return bytes(ds.PixelData) if "PixelData" in ds else b""


@pytest.mark.dcmtk
@pytest.mark.timeout(180)
def test_get_from_dcmqrscp_receives_every_syntax(tmp_path: Path) -> None:
    """dcmqrscp sends all instances of a class on the first context accepted for it, so
    `dicomnet get` asks again offering one compressed syntax at a time for what failed.
    What dcmqrscp sends is its own re-encoding of the file (it drops Data Set Trailing
    Padding and empty sequences, and inflates a deflated data set when an uncompressed
    context comes first): compressed instances arrive in their syntax with the pixel data
    bytes as stored, the others with the same pixel data."""
    from qr_peers import start_dcmqrscp

    study = _study(tmp_path / "study")
    profile = _dcmqrscp_profile(tmp_path / "profile.cfg", study)
    scp = start_dcmqrscp(
        tmp_path / "dcmqrscp",
        study.values(),
        aet="QRSCP",
        extra_args=["-xf", str(profile), "In", "Out"],
    )
    try:
        out = tmp_path / "got"
        uid = dcmread(next(iter(study.values()))).StudyInstanceUID
        r = run_dicomnet(
            ["get", HOST, scp.port, "--aec", "QRSCP", "--out", out, "--level", "STUDY",
             "-k", f"StudyInstanceUID={uid}"]
        )  # fmt: skip
        assert r.returncode == 0, describe_cli(r) + scp.log_text()
        assert "completed 11, failed 0" in r.stderr, describe_cli(r)
    finally:
        scp.stop()
    received = index_part10_tree(out)
    assert received.keys() == study.keys()
    for uid, path in received.items():
        stored = _syntax(study[uid])
        if UID(stored).is_compressed:
            assert _syntax(path) == stored, study[uid].name
        assert _pixel_data(path) == _pixel_data(study[uid]), study[uid].name


@pytest.mark.dcmtk
@pytest.mark.timeout(180)
def test_move_to_an_uncompressed_only_storescp_converts_or_names_the_failure(
    tmp_path: Path,
    dicomnet_server: Callable[..., DicomnetServer],
    storescp: Callable[..., StoreSCP],
) -> None:
    study = _study(tmp_path / "study")
    mpeg_uid, mpeg = _mpeg2_instance(tmp_path)
    destination = storescp(aet="PLAIN", accept_all=False)
    server = dicomnet_server(
        aet="ARCHIVE", extra_args=["--peer", f"PLAIN={HOST}:{destination.port}"]
    )
    _store(server.port, [*study.values(), mpeg], "ARCHIVE")
    r = run_dicomnet(
        ["move", HOST, server.port, "--aec", "ARCHIVE", "--dest", "PLAIN", "--model", "patient",
         "--level", "PATIENT", "-k", "PatientID=TRANSCODE-1"]
    )  # fmt: skip
    assert r.returncode != 0, describe_cli(r)  # one sub-operation failed
    received = destination.wait_received(len(study))
    assert received.keys() == study.keys(), describe_cli(r)
    for uid, path in received.items():
        assert _syntax(path) in UNCOMPRESSED_TRANSFER_SYNTAXES, study[uid].name
        original = dcmread(study[uid])
        np.testing.assert_array_equal(dcmread(path).pixel_array, original.pixel_array)
    # The final response names the instance and why.
    assert mpeg_uid in r.stdout + r.stderr, describe_cli(r)
    assert "no decoder exists for MPEG2" in r.stdout + r.stderr, describe_cli(r)
    assert mpeg_uid not in received


@pytest.mark.dcmtk
@pytest.mark.timeout(120)
def test_store_converts_for_storescp_and_prefers_the_asked_syntax(
    tmp_path: Path,
    storescp: Callable[..., StoreSCP],
    dicomnet_server: Callable[..., DicomnetServer],
) -> None:
    study = _study(tmp_path / "study", SOURCES[3:9])
    plain = storescp(aet="PLAIN", accept_all=False)
    _store(plain.port, list(study.values()), "PLAIN")
    received = plain.wait_received(len(study))
    assert received.keys() == study.keys()
    assert {_syntax(p) for p in received.values()} <= set(UNCOMPRESSED_TRANSFER_SYNTAXES)

    # -x rle: RLE where the peer accepts it, converted losslessly.
    server = dicomnet_server(aet="ARCHIVE")
    lossless = _study(tmp_path / "lossless", ("CT_small.dcm", "MR_small_jp2klossless.dcm"))
    _store(server.port, list(lossless.values()), "ARCHIVE", "-x", "rle")
    stored = server.wait_stored(lossless)
    for uid, path in lossless.items():
        assert _syntax(stored[uid]) == RLE
        np.testing.assert_array_equal(dcmread(stored[uid]).pixel_array, dcmread(path).pixel_array)
