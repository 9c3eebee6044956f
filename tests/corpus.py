"""A folder of varied, real DICOM Part-10 files for the end-to-end tests.

``build_corpus(root)`` copies pydicom's bundled test files (those shipped inside
the pydicom wheel, no download) into a tree of subfolders under ``root/small``
and, unless told otherwise, writes one generated multi-frame instance of more
than 100 MB under ``root/large``. Every instance gets a distinct SOP Instance
UID: several of pydicom's files are the same image in different transfer
syntaxes and share one; those copies get a new UID of the same length, patched
into the bytes (a same-length patch leaves every length field valid and every
other byte untouched).

The corpus covers implicit VR LE, explicit VR LE, explicit VR big endian,
deflated, JPEG baseline, JPEG extended, JPEG lossless, RLE, JPEG 2000 (lossless
and lossy) and JPEG-LS; single- and multi-frame images; images, structured
reports, an RT plan and dose, a segmentation and a waveform. Two of the files
have file meta whose Media Storage SOP Instance UID disagrees with the data
set's SOP Instance UID (real files like that exist).

Run ``python tests/corpus.py DIR`` to build one by hand and print its summary.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pydicom.filereader
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    PYDICOM_ROOT_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

log = logging.getLogger("dicomnet.tests.corpus")

#: The transfer syntaxes issue 2 requires the corpus to cover (name -> UID).
REQUIRED_TRANSFER_SYNTAXES: dict[str, str] = {
    "implicit VR little endian": ImplicitVRLittleEndian,
    "explicit VR little endian": ExplicitVRLittleEndian,
    "explicit VR big endian": ExplicitVRBigEndian,
    "deflated explicit VR little endian": DeflatedExplicitVRLittleEndian,
    "JPEG baseline": JPEGBaseline8Bit,
    "RLE lossless": RLELossless,
    "JPEG 2000 lossless": JPEG2000Lossless,
}

#: Further transfer syntaxes the corpus happens to cover (not required).
EXTRA_TRANSFER_SYNTAXES: dict[str, str] = {
    "JPEG extended": JPEGExtended12Bit,
    "JPEG lossless SV1": JPEGLosslessSV1,
    "JPEG 2000": JPEG2000,
    "JPEG-LS lossless": JPEGLSLossless,
}

#: (pydicom test file, destination relative to ``root/small``).
SOURCES: tuple[tuple[str, str], ...] = (
    ("CT_small.dcm", "uncompressed/explicit_le/CT_small.dcm"),
    ("MR_small.dcm", "uncompressed/explicit_le/MR_small.dcm"),
    ("examples_palette.dcm", "uncompressed/explicit_le/us/examples_palette.dcm"),
    ("liver_1frame.dcm", "uncompressed/explicit_le/seg/liver_1frame.dcm"),
    ("MR_small_implicit.dcm", "uncompressed/implicit_le/MR_small_implicit.dcm"),
    ("rtdose.dcm", "uncompressed/implicit_le/rt/rtdose.dcm"),
    ("rtplan.dcm", "uncompressed/implicit_le/rt/rtplan.dcm"),
    ("MR_small_bigendian.dcm", "uncompressed/big_endian/MR_small_bigendian.dcm"),
    ("ExplVR_BigEnd.dcm", "uncompressed/big_endian/ExplVR_BigEnd.dcm"),
    ("image_dfl.dcm", "uncompressed/deflated/image_dfl.dcm"),
    ("SC_rgb_jpeg_dcmtk.dcm", "compressed/jpeg/baseline/SC_rgb_jpeg_dcmtk.dcm"),
    ("examples_ybr_color.dcm", "compressed/jpeg/baseline/examples_ybr_color.dcm"),
    ("JPEG-lossy.dcm", "compressed/jpeg/extended/JPEG-lossy.dcm"),
    ("SC_rgb_jpeg_gdcm.dcm", "compressed/jpeg/lossless/SC_rgb_jpeg_gdcm.dcm"),
    ("MR_small_RLE.dcm", "compressed/rle/MR_small_RLE.dcm"),
    ("SC_rgb_rle_2frame.dcm", "compressed/rle/SC_rgb_rle_2frame.dcm"),
    ("MR_small_jp2klossless.dcm", "compressed/jpeg2000/MR_small_jp2klossless.dcm"),
    ("JPEG2000.dcm", "compressed/jpeg2000/JPEG2000.dcm"),
    ("MR_small_jpeg_ls_lossless.dcm", "compressed/jpeg_ls/MR_small_jpeg_ls_lossless.dcm"),
    ("reportsi.dcm", "other/sr/reportsi.dcm"),
    ("test-SR.dcm", "other/sr/nested/deeper/test-SR.dcm"),
    ("waveform_ecg.dcm", "other/waveform/waveform_ecg.dcm"),
)

LARGE_NAME = "large/multiframe_word_sc_100MB.dcm"
#: Multi-frame Grayscale Word Secondary Capture Image Storage.
LARGE_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.7.3")
LARGE_MIN_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class CorpusFile:
    """One Part-10 file of the corpus and what the tests need to know about it."""

    path: Path
    rel: str  # path relative to the corpus root, for messages
    source: str  # the pydicom test file it came from, or "generated"
    sop_class_uid: str  # (0008,0016) of the data set
    sop_instance_uid: str  # (0008,0018) of the data set
    transfer_syntax_uid: str  # (0002,0010)
    meta_sop_instance_uid: str  # (0002,0003), may disagree with the data set
    size: int
    frames: int

    @property
    def meta_agrees(self) -> bool:
        return self.meta_sop_instance_uid == self.sop_instance_uid

    @property
    def transfer_syntax_name(self) -> str:
        return UID(self.transfer_syntax_uid).name


@dataclass
class Corpus:
    root: Path  # everything, the large file included
    small_root: Path  # only the pydicom files (subfolders of root)
    files: list[CorpusFile] = field(default_factory=list)

    @property
    def small(self) -> list[CorpusFile]:
        return [f for f in self.files if f.source != "generated"]

    @property
    def large(self) -> CorpusFile | None:
        for f in self.files:
            if f.source == "generated":
                return f
        return None

    def by_uid(self) -> dict[str, CorpusFile]:
        return {f.sop_instance_uid: f for f in self.files}

    def by_source(self, source: str) -> CorpusFile:
        for f in self.files:
            if f.source == source:
                return f
        raise KeyError(source)

    def transfer_syntaxes(self) -> set[str]:
        return {f.transfer_syntax_uid for f in self.files}

    def missing_required(self) -> list[str]:
        have = self.transfer_syntaxes()
        return [name for name, uid in REQUIRED_TRANSFER_SYNTAXES.items() if uid not in have]

    def summary(self) -> str:
        lines = [f"corpus at {self.root}: {len(self.files)} files"]
        for f in sorted(self.files, key=lambda f: f.rel):
            lines.append(
                f"  {f.rel:60s} {f.size:>11,d} B  {f.transfer_syntax_name:40s} "
                f"{UID(f.sop_class_uid).name} frames={f.frames}"
            )
        known = {**REQUIRED_TRANSFER_SYNTAXES, **EXTRA_TRANSFER_SYNTAXES}
        for name, uid in known.items():
            n = sum(1 for f in self.files if f.transfer_syntax_uid == uid)
            lines.append(f"  transfer syntax {name:36s} {uid:24s} files={n}")
        return "\n".join(lines)


def _same_length_uid(old: str, salt: str) -> str:
    """A valid UID, different from ``old``, exactly ``len(old)`` characters long."""
    digest = int.from_bytes(hashlib.sha256(f"{salt}|{old}".encode()).digest(), "big")
    for root in (PYDICOM_ROOT_UID, "2.25."):
        width = len(old) - len(root)
        if width >= 1:
            digits = str(digest).rjust(width, "0")[:width]
            # No leading zero in a UID component (unless it is just "0").
            if width > 1 and digits[0] == "0":
                digits = "1" + digits[1:]
            new = root + digits
            if new != old:
                return new
    raise ValueError(f"cannot make a same-length replacement for UID {old!r}")


def _patch_uid(path: Path, old: str, new: str) -> None:
    assert len(old) == len(new), (old, new)
    data = path.read_bytes()
    count = data.count(old.encode("ascii"))
    if count == 0:
        raise ValueError(f"{path}: UID {old} not found in the file bytes")
    path.write_bytes(data.replace(old.encode("ascii"), new.encode("ascii")))


def _pad_odd_deflated(path: Path) -> bool:
    """Pad a deflated data set of odd length with a trailing NUL byte.

    PS3.5 A.5 wants the deflated stream padded to an even length; pydicom's
    image_dfl.dcm is not (4303 bytes), and DCMTK refuses odd-length data set
    fragments on the network ("DIMSE: Odd Fragment Length"), so sent as-is it
    could not reach storescp at all.
    """
    meta = pydicom.filereader.read_file_meta_info(path)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return False
    if 0x00020000 not in meta:
        return False
    data = path.read_bytes()
    ds_start = 132 + 12 + int(meta[0x00020000].value)
    if (len(data) - ds_start) % 2 == 0:
        return False
    path.write_bytes(data + b"\x00")
    return True


def _describe(path: Path, root: Path, source: str) -> CorpusFile:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta = ds.file_meta
    return CorpusFile(
        path=path,
        rel=path.relative_to(root).as_posix(),
        source=source,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=str(meta.TransferSyntaxUID),
        meta_sop_instance_uid=str(meta.get("MediaStorageSOPInstanceUID", "")),
        size=path.stat().st_size,
        frames=int(ds.get("NumberOfFrames", 1) or 1),
    )


def copy_pydicom_files(
    dest: Path, root: Path, sources: Iterable[tuple[str, str]]
) -> list[CorpusFile]:
    """Copy pydicom's bundled test files into ``dest``, making SOP Instance UIDs unique."""
    out: list[CorpusFile] = []
    seen: set[str] = set()
    for name, rel in sources:
        src = get_testdata_file(name)
        if src is None:  # only files shipped inside the pydicom wheel are used
            raise FileNotFoundError(f"pydicom test file {name} is not installed")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        if _pad_odd_deflated(target):
            log.info("%s: padded its odd-length deflated data set with one NUL byte", name)
        info = _describe(target, root, name)
        if not info.transfer_syntax_uid:
            raise ValueError(f"{name}: no transfer syntax in its file meta")
        if info.sop_instance_uid in seen:
            new = _same_length_uid(info.sop_instance_uid, name)
            _patch_uid(target, info.sop_instance_uid, new)
            if info.meta_sop_instance_uid not in (info.sop_instance_uid, "") and (
                info.meta_sop_instance_uid in seen
            ):
                _patch_uid(
                    target,
                    info.meta_sop_instance_uid,
                    _same_length_uid(info.meta_sop_instance_uid, name),
                )
            info = _describe(target, root, name)
            assert info.sop_instance_uid == new, (name, info.sop_instance_uid, new)
        seen.add(info.sop_instance_uid)
        out.append(info)
    return out


def write_large_instance(path: Path, min_bytes: int = LARGE_MIN_BYTES, seed: int = 1234) -> None:
    """Write an uncompressed multi-frame 16-bit image of at least ``min_bytes``."""
    import numpy as np

    rows = cols = 512
    frame_bytes = rows * cols * 2
    frames = -(-min_bytes // frame_bytes) + 1  # strictly more than min_bytes
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 4096, size=(frames, rows, cols), dtype=np.uint16)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = LARGE_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = LARGE_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate = "20240101"
    ds.ContentDate = "20240101"
    ds.ContentTime = "120000"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.PatientName = "Large^Transfer"
    ds.PatientID = "DICOMNET-LARGE"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 40.0
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def build_corpus(root: Path, *, large: bool = True, large_file: Path | None = None) -> Corpus:
    """Build the corpus under ``root`` (``root/small/...`` and ``root/large/...``).

    ``large_file``: an already generated large instance to copy (or hard-link)
    instead of generating a new one.
    """
    root = Path(root)
    small_root = root / "small"
    corpus = Corpus(root=root, small_root=small_root)
    corpus.files.extend(copy_pydicom_files(small_root, root, SOURCES))
    if large:
        target = root / LARGE_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        if large_file is not None:
            try:
                target.hardlink_to(large_file)
            except OSError:
                shutil.copyfile(large_file, target)
        else:
            write_large_instance(target)
        info = _describe(target, root, "generated")
        if info.size < LARGE_MIN_BYTES:
            raise AssertionError(f"large instance is only {info.size} bytes")
        corpus.files.append(info)
    uids = [f.sop_instance_uid for f in corpus.files]
    if len(set(uids)) != len(uids):
        raise AssertionError(f"duplicate SOP Instance UIDs in corpus: {sorted(uids)}")
    missing = corpus.missing_required()
    if missing:
        raise AssertionError(f"corpus lacks transfer syntaxes: {missing}")
    log.info("%s", corpus.summary())
    return corpus


if __name__ == "__main__":  # pragma: no cover - manual use
    logging.basicConfig(level=logging.INFO)
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/corpus.py DIR")
    print(build_corpus(Path(sys.argv[1])).summary())
