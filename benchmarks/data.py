"""Synthetic instances for the store scenarios, written with pydicom (Explicit VR LE)."""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

__all__ = [
    "InstanceSet",
    "dataset_length",
    "make_big",
    "make_ct_512k",
    "make_sc_2k",
    "split",
    "subset",
]


@dataclass(frozen=True, slots=True)
class InstanceSet:
    """Part-10 files in one folder, and the total size of their data sets (meta excluded)."""

    folder: Path
    files: tuple[Path, ...]
    dataset_bytes: int
    sop_class_uid: str

    @property
    def mean_dataset_bytes(self) -> float:
        return self.dataset_bytes / len(self.files) if self.files else 0.0


def dataset_length(path: Path) -> int:
    """Bytes after the file meta information of a Part-10 file (what C-STORE carries)."""
    with open(path, "rb") as f:
        head = f.read(144)
    if head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise ValueError(f"{path}: not a Part-10 file with a meta group length first")
    group_length: int = struct.unpack("<I", head[140:144])[0]
    return path.stat().st_size - 144 - group_length


def _common(ds: Dataset, sop_class: str, study: str, series: str, number: int) -> None:
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientName = "BENCH^DICOMNET"
    ds.PatientID = "BENCH0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "BENCH"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"


class _Builder:
    sop_class_uid = ""

    def __init__(self) -> None:
        self.study = generate_uid()
        self.series = generate_uid()

    def dataset(self, number: int) -> Dataset:
        raise NotImplementedError


class _SecondaryCapture2K(_Builder):
    """~2 KB data set: 8-bit 48 x 32 MONOCHROME2 Secondary Capture."""

    sop_class_uid = SecondaryCaptureImageStorage

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(2)
        self.pixels = rng.integers(0, 256, size=(32, 48), dtype=np.uint8).tobytes()

    def dataset(self, number: int) -> Dataset:
        ds = Dataset()
        _common(ds, SecondaryCaptureImageStorage, self.study, self.series, number)
        ds.Modality = "OT"
        ds.ConversionType = "WSD"
        ds.Rows, ds.Columns = 32, 48
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelRepresentation = 0
        ds.PixelData = self.pixels
        return ds


class _CT512K(_Builder):
    """~512 KB data set: 16-bit 512 x 512 CT slice (signed, 12 bits stored)."""

    sop_class_uid = CTImageStorage

    def __init__(self) -> None:
        super().__init__()
        self.frame = generate_uid()
        rng = np.random.default_rng(5)
        self.pixels = rng.integers(-1024, 3071, size=(512, 512), dtype=np.int16).tobytes()

    def dataset(self, number: int) -> Dataset:
        ds = Dataset()
        _common(ds, CTImageStorage, self.study, self.series, number)
        ds.Modality = "CT"
        ds.FrameOfReferenceUID = self.frame
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "120"
        ds.SliceThickness = "1.0"
        ds.ImagePositionPatient = ["-250.0", "-250.0", f"{-number:.1f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = ["0.9765625", "0.9765625"]
        ds.Rows, ds.Columns = 512, 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = self.pixels
        return ds


def _write(folder: Path, count: int, build: type[_Builder]) -> InstanceSet:
    folder.mkdir(parents=True, exist_ok=True)
    builder = build()
    files: list[Path] = []
    total = 0
    for number in range(1, count + 1):
        ds = builder.dataset(number)
        path = folder / f"{number:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        total += dataset_length(path)
    return InstanceSet(folder, tuple(files), total, builder.sop_class_uid)


def subset(instances: InstanceSet, folder: Path, count: int) -> InstanceSet:
    """The first `count` files of `instances`, hard-linked (or copied) into their own folder."""
    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    total = 0
    for source in instances.files[:count]:
        target = folder / source.name
        if not target.exists():
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        files.append(target)
        total += dataset_length(target)
    return InstanceSet(folder, tuple(files), total, instances.sop_class_uid)


def make_sc_2k(folder: Path, count: int) -> InstanceSet:
    """`count` Secondary Capture instances of about 2 KB, each with its own SOP Instance UID."""
    return _write(folder, count, _SecondaryCapture2K)


def make_ct_512k(folder: Path, count: int) -> InstanceSet:
    """`count` CT Image instances of about 512 KB, each with its own SOP Instance UID."""
    return _write(folder, count, _CT512K)


MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC Image Storage
_FRAME_BYTES = 512 * 512 * 2


def make_big(folder: Path, mib: int) -> InstanceSet:
    """One uncompressed multi-frame instance with `mib` MiB of pixel data (16-bit 512 x 512
    frames, Multi-frame Grayscale Word Secondary Capture, Explicit VR LE).

    The header is written with pydicom, the Pixel Data element is appended in 1 MiB chunks
    so that a 2 GiB instance never sits in memory. Written once, reused by every run.
    """
    folder.mkdir(parents=True, exist_ok=True)
    frames = mib * 1024 * 1024 // _FRAME_BYTES
    ds = Dataset()
    _common(ds, MULTIFRAME_WORD_SC, generate_uid(), generate_uid(), 1)
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = 512, 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    path = folder / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    chunk = np.random.default_rng(7).integers(0, 4096, size=512 * 1024, dtype=np.uint16)
    block = chunk.tobytes()  # 1 MiB
    total = frames * _FRAME_BYTES
    with open(path, "ab") as f:
        # (7FE0,0010) OW, 2 reserved bytes, 32-bit length: the last element of the data set.
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, total))
        left = total
        while left > 0:
            piece = block[: min(left, len(block))]
            f.write(piece)
            left -= len(piece)
    return InstanceSet(folder, (path,), dataset_length(path), MULTIFRAME_WORD_SC)


def split(instances: InstanceSet, folder: Path, parts: int) -> list[InstanceSet]:
    """`instances` dealt into `parts` folders of consecutive files (hard links), for S6's
    concurrent DCMTK `storescu` processes, one folder each."""
    per = -(-len(instances.files) // parts)
    out: list[InstanceSet] = []
    for i in range(parts):
        chunk = instances.files[i * per : (i + 1) * per]
        if not chunk:
            break
        part = InstanceSet(
            instances.folder, chunk, sum(dataset_length(f) for f in chunk), instances.sop_class_uid
        )
        out.append(subset(part, folder / f"part{i:03d}", len(chunk)))
    return out
