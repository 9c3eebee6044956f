"""A generated Query/Retrieve data set and an independent model of C-FIND matching.

``generate(root)`` writes a few hundred small, uncompressed (explicit VR little
endian) Part-10 instances under ``root``: several patients, each with a few
studies, each with a few series, each with 10-20 instances. Everything is
derived from a fixed seed, so two runs write the same bytes. Patient names vary
in case and carets (``Doe^John``, ``Doe^Johnny``, ``DOE^JANE``, ...), study
dates spread over two years, times over the day.

``expected_matches(data, keys, level=..., model=...)`` computes the answer to a
C-FIND straight from the generated values, following PS3.4 C.2.2.2 (single value,
universal, wildcard ``*`` / ``?``, range on DA/TM, list of UIDs), without any
code of the implementation under test. ``expected_instances`` does the same for
C-MOVE / C-GET (every instance below the matching entities).

``query_cases(data)`` and ``retrieve_cases(data)`` name the queries the tests
ask, built from the data (so each one has a non-trivial answer).

Nothing here imports dicomnet.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_ROOT_UID, ExplicitVRLittleEndian, generate_uid

SEED = 20240611

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")

#: The attributes the generated data carries at each level (and the tests query).
LEVEL_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"),
    "STUDY": (
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "StudyDescription",
    ),
    "SERIES": ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription"),
    "IMAGE": ("SOPInstanceUID", "SOPClassUID", "InstanceNumber"),
}

#: The unique key of each level (PS3.4 C.6).
UNIQUE_KEY: dict[str, str] = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}

MODEL_LEVELS: dict[str, tuple[str, ...]] = {
    "patient": LEVELS,
    "study": LEVELS[1:],
}

SOP_CLASS_OF_MODALITY = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "OT": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
}

# (PatientName, PatientID, PatientBirthDate, PatientSex)
PATIENTS: tuple[tuple[str, str, str, str], ...] = (
    ("Doe^John", "PID-0001", "19650412", "M"),
    ("Doe^Johnny^^Mr", "PID-0002", "19880130", "M"),
    ("DOE^JANE", "PID-0003", "19720830", "F"),
    ("Smith^Anna^Maria", "PID-00014", "19541103", "F"),
    ("van der Berg^Jan", "XR-5531", "20010219", "O"),
)

# (StudyDescription, modalities of its series)
STUDY_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("CT CHEST W/O CONTRAST", ("CT",)),
    ("CT ABDOMEN PELVIS", ("CT", "OT")),
    ("MR BRAIN", ("MR",)),
    ("MR KNEE LEFT", ("MR", "OT")),
    ("Chest X-ray PA/LAT", ("CR",)),
)

SERIES_NAMES = {
    "CT": ("AX 5mm", "COR 3mm", "SAG 3mm", "Scout"),
    "MR": ("T1 AX", "T2 SAG", "FLAIR COR", "DWI"),
    "CR": ("PA", "LAT", "PA/LAT"),
    "OT": ("Key images", "Dose report"),
}


@dataclass(frozen=True)
class Instance:
    """One generated instance: where it is and the values of its attributes."""

    path: Path
    attrs: Mapping[str, str]  # keyword -> value as a string ("" when empty)

    @property
    def uid(self) -> str:
        return self.attrs["SOPInstanceUID"]

    @property
    def sop_class_uid(self) -> str:
        return self.attrs["SOPClassUID"]

    @property
    def transfer_syntax_uid(self) -> str:
        return ExplicitVRLittleEndian

    def entity_key(self, level: str) -> str:
        return self.attrs[UNIQUE_KEY[level]]


@dataclass
class QRData:
    root: Path
    instances: list[Instance] = field(default_factory=list)

    def by_uid(self) -> dict[str, Instance]:
        return {i.uid: i for i in self.instances}

    def entities(self, level: str) -> dict[str, Instance]:
        """Unique key -> a representative instance, for every entity at ``level``."""
        out: dict[str, Instance] = {}
        for inst in self.instances:
            out.setdefault(inst.entity_key(level), inst)
        return out

    def children(self, level: str, key: str, child_level: str) -> list[str]:
        """Unique keys at ``child_level`` below the entity ``key`` at ``level``."""
        out: dict[str, None] = {}
        for inst in self.instances:
            if inst.entity_key(level) == key:
                out[inst.entity_key(child_level)] = None
        return list(out)

    def summary(self) -> str:
        counts = ", ".join(f"{len(self.entities(level))} {level.lower()}" for level in LEVELS)
        return f"Q/R data at {self.root}: {counts} (image = instances)"


# --------------------------------------------------------------------------
# generation


def _uid(*parts: object) -> str:
    return generate_uid(PYDICOM_ROOT_UID, entropy_srcs=[str(SEED), *map(str, parts)])


def _write_instance(path: Path, attrs: Mapping[str, str], rng: np.random.Generator) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = attrs["SOPClassUID"]
    meta.MediaStorageSOPInstanceUID = attrs["SOPInstanceUID"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = attrs["SOPClassUID"]
    ds.SOPInstanceUID = attrs["SOPInstanceUID"]
    ds.StudyDate = attrs["StudyDate"]
    ds.SeriesDate = attrs["StudyDate"]
    ds.ContentDate = attrs["StudyDate"]
    ds.StudyTime = attrs["StudyTime"]
    ds.ContentTime = attrs["StudyTime"]
    ds.AccessionNumber = attrs["AccessionNumber"]
    ds.Modality = attrs["Modality"]
    ds.Manufacturer = "dicomnet tests"
    ds.ReferringPhysicianName = "Welby^Marcus"
    ds.StudyDescription = attrs["StudyDescription"]
    ds.SeriesDescription = attrs["SeriesDescription"]
    ds.PatientName = attrs["PatientName"]
    ds.PatientID = attrs["PatientID"]
    ds.PatientBirthDate = attrs["PatientBirthDate"]
    ds.PatientSex = attrs["PatientSex"]
    ds.StudyInstanceUID = attrs["StudyInstanceUID"]
    ds.SeriesInstanceUID = attrs["SeriesInstanceUID"]
    ds.StudyID = attrs["StudyID"]
    ds.SeriesNumber = attrs["SeriesNumber"]
    ds.InstanceNumber = attrs["InstanceNumber"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    size = int(rng.integers(4, 17))
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = rng.integers(0, 4096, size=(size, size), dtype=np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def generate(root: Path, seed: int = SEED) -> QRData:
    """Write the data set under ``root`` and describe it."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    data = QRData(root=root)
    accession = 0
    day0 = np.datetime64("2023-01-02")
    for p_index, (name, pid, birth, sex) in enumerate(PATIENTS):
        n_studies = int(rng.integers(2, 4))
        for s_index in range(n_studies):
            accession += 1
            study_date = day0 + np.timedelta64(int(rng.integers(0, 700)), "D")
            seconds = int(rng.integers(7 * 3600, 20 * 3600))
            kind, modalities = STUDY_KINDS[int(rng.integers(0, len(STUDY_KINDS)))]
            study = {
                "PatientName": name,
                "PatientID": pid,
                "PatientBirthDate": birth,
                "PatientSex": sex,
                "StudyInstanceUID": _uid("study", p_index, s_index),
                "StudyDate": str(study_date).replace("-", ""),
                "StudyTime": f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
                "AccessionNumber": f"A{int(rng.integers(10000, 99999))}{accession:02d}",
                "StudyID": str(s_index + 1),
                "StudyDescription": kind,
            }
            n_series = int(rng.integers(2, 4))
            for r_index in range(n_series):
                modality = modalities[0] if r_index == 0 else modalities[r_index % len(modalities)]
                names = SERIES_NAMES[modality]
                series = {
                    **study,
                    "SeriesInstanceUID": _uid("series", p_index, s_index, r_index),
                    "Modality": modality,
                    "SeriesNumber": str(r_index + 1),
                    "SeriesDescription": names[r_index % len(names)],
                }
                n_instances = int(rng.integers(10, 12))
                for i_index in range(n_instances):
                    attrs = {
                        **series,
                        "SOPInstanceUID": _uid("instance", p_index, s_index, r_index, i_index),
                        "SOPClassUID": SOP_CLASS_OF_MODALITY[modality],
                        "InstanceNumber": str(i_index + 1),
                    }
                    path = (
                        root / pid / f"study{s_index + 1}" / f"series{r_index + 1}"
                        / f"{i_index + 1:03d}.dcm"
                    )  # fmt: skip
                    _write_instance(path, attrs, rng)
                    data.instances.append(Instance(path=path, attrs=attrs))
    uids = [i.uid for i in data.instances]
    assert len(set(uids)) == len(uids), "duplicate SOP Instance UIDs"
    return data


_cache: dict[str, QRData] = {}
_cache_lock = threading.Lock()


def session_data(tmp_path_factory: Any) -> QRData:
    """The data set of this test session, generated on first use.

    Every test module's session fixture calls this; the data is generated once
    per pytest session (keyed by the session's base temp folder).
    """
    key = str(tmp_path_factory.getbasetemp())
    with _cache_lock:
        if key not in _cache:
            _cache[key] = generate(tmp_path_factory.mktemp("qr-data"))
        return _cache[key]


# --------------------------------------------------------------------------
# matching (PS3.4 C.2.2.2), independent of the implementation


def vr_of(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return str(dictionary_VR(tag))


def _wildcard_regex(pattern: str, case_sensitive: bool) -> re.Pattern[str]:
    out = []
    for ch in pattern:
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out), 0 if case_sensitive else re.IGNORECASE)


def _time_key(value: str) -> str:
    """HHMMSS[.ffffff] (colons allowed) as a comparable string, seconds etc. zero-filled."""
    value = value.replace(":", "").strip()
    whole, _, frac = value.partition(".")
    return whole.ljust(6, "0") + "." + frac.ljust(6, "0")


def _in_range(vr: str, pattern: str, value: str) -> bool:
    if not value:
        return False
    low, _, high = pattern.partition("-")
    norm = _time_key if vr == "TM" else (lambda v: v.strip())
    v = norm(value)
    if low and v < norm(low):
        return False
    return not (high and v > norm(high))


def matches_value(keyword: str, pattern: str, value: str, *, pn_case_sensitive: bool) -> bool:
    """Whether an entity whose ``keyword`` is ``value`` matches the query value ``pattern``."""
    vr = vr_of(keyword)
    pattern = pattern.strip() if vr != "PN" else pattern.rstrip()
    value = value.strip()
    if pattern == "" or pattern == "*":
        return True  # universal matching
    if vr == "UI":
        return value in pattern.split("\\")
    if vr in ("DA", "TM", "DT") and "-" in pattern:
        return _in_range(vr, pattern, value)
    case_sensitive = pn_case_sensitive or vr != "PN"
    if "*" in pattern or "?" in pattern:
        return _wildcard_regex(pattern, case_sensitive).fullmatch(value) is not None
    if vr in ("IS", "DS"):
        try:
            return float(pattern) == float(value)
        except ValueError:
            return False
    if vr == "TM":
        return _time_key(pattern) == _time_key(value)
    if not case_sensitive:
        return pattern.casefold() == value.casefold()
    return pattern == value


def allowed_keys(model: str, level: str) -> set[str]:
    """Keys a hierarchical query at ``level`` may carry (its level's and the levels above)."""
    levels = MODEL_LEVELS[model]
    if level not in levels:
        raise ValueError(f"level {level} is not in the {model} root model")
    upto = LEVELS[: LEVELS.index(level) + 1]
    return {k for lv in upto for k in LEVEL_KEYS[lv]}


def expected_matches(
    data: QRData,
    keys: Mapping[str, str],
    *,
    level: str,
    model: str = "study",
    pn_case_sensitive: bool = True,
) -> list[dict[str, str]]:
    """The identifiers a C-FIND at ``level`` with ``keys`` must return.

    Each is a dict of every key of the query with the matching entity's value,
    sorted by the level's unique key. ``pn_case_sensitive=False`` matches PN
    values case-insensitively (PS3.4 allows both).
    """
    allowed = allowed_keys(model, level)
    for key in keys:
        if key not in allowed:
            raise ValueError(f"{key} is not a key at {level} in the {model} root model")
    out: list[dict[str, str]] = []
    for unique, inst in data.entities(level).items():
        if all(
            matches_value(k, v, inst.attrs[k], pn_case_sensitive=pn_case_sensitive)
            for k, v in keys.items()
        ):
            out.append({k: inst.attrs[k] for k in keys} | {UNIQUE_KEY[level]: unique})
    out.sort(key=lambda m: m[UNIQUE_KEY[level]])
    return out


def expected_instances(
    data: QRData, keys: Mapping[str, str], *, level: str, model: str = "study"
) -> list[Instance]:
    """The instances a C-MOVE / C-GET with ``keys`` at ``level`` must send."""
    found = {m[UNIQUE_KEY[level]] for m in expected_matches(data, keys, level=level, model=model)}
    return [i for i in data.instances if i.entity_key(level) in found]


def normalise(keyword: str, value: Any) -> str:
    """A returned attribute value as the string the data holds ("" when empty/absent)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(normalise(keyword, v) for v in value)
    vr = vr_of(keyword)
    text = str(value)
    if vr in ("IS", "DS"):
        text = text.strip()
        if not text:
            return ""
        number = float(text)
        return str(int(number)) if number == int(number) else text
    if vr == "UI":
        return text.rstrip("\x00 ")
    return text.rstrip(" ").lstrip(" ") if vr != "PN" else text.rstrip(" ")


def identifier_row(ds: Dataset, keys: Iterable[str]) -> dict[str, str]:
    """The values of ``keys`` in a returned identifier, normalised."""
    return {k: normalise(k, ds[k].value if k in ds else None) for k in keys}


def rows_set(rows: Iterable[Mapping[str, str]]) -> set[tuple[tuple[str, str], ...]]:
    return {tuple(sorted(r.items())) for r in rows}


# --------------------------------------------------------------------------
# the queries the tests ask


@dataclass(frozen=True)
class QueryCase:
    name: str
    model: str  # "patient" | "study"
    level: str
    keys: dict[str, str]  # keyword -> value ("" = return key / universal)
    pn_case_sensitive: bool = True  # the expected answer assumes case-sensitive PN

    @property
    def return_keys(self) -> list[str]:
        return list(self.keys)

    def expected(self, data: QRData, *, pn_case_sensitive: bool | None = None) -> list[dict]:
        cs = self.pn_case_sensitive if pn_case_sensitive is None else pn_case_sensitive
        return expected_matches(
            data, self.keys, level=self.level, model=self.model, pn_case_sensitive=cs
        )


#: The names of ``query_cases()`` (known before the data exists, for parametrize).
QUERY_CASE_NAMES = (
    "patient-PATIENT-name-wildcard",
    "patient-PATIENT-id-qmark",
    "patient-PATIENT-birthdate-range",
    "patient-PATIENT-all",
    "patient-STUDY-date-range",
    "patient-SERIES-modality",
    "patient-IMAGE-uid-list",
    "study-STUDY-all",
    "study-STUDY-name-wildcard-open-date",
    "study-STUDY-date-range",
    "study-STUDY-date-upper-open",
    "study-STUDY-time-range",
    "study-STUDY-description-wildcard",
    "study-STUDY-accession-qmark",
    "study-STUDY-uid-list",
    "study-STUDY-sex-single",
    "study-SERIES-all-of-study",
    "study-SERIES-number-single",
    "study-IMAGE-all-of-series",
    "study-IMAGE-uid-list",
)

#: The names of ``retrieve_cases()``.
RETRIEVE_CASE_NAMES = (
    "patient-PATIENT",
    "patient-STUDY",
    "study-STUDY-all-studies",
    "study-SERIES",
    "study-IMAGE",
)


def _pick(data: QRData) -> dict[str, Any]:
    """Deterministic choices of entities the queries are about."""
    studies_of: dict[str, list[str]] = {}
    for pid in data.entities("PATIENT"):
        studies_of[pid] = data.children("PATIENT", pid, "STUDY")
    patient = max(sorted(studies_of), key=lambda p: len(studies_of[p]))
    study = max(studies_of[patient], key=lambda s: (len(data.children("STUDY", s, "SERIES")), s))
    series_list = data.children("STUDY", study, "SERIES")
    series = series_list[0]
    images = data.children("SERIES", series, "IMAGE")
    studies = data.entities("STUDY")
    dates = sorted(i.attrs["StudyDate"] for i in studies.values())
    p_dates = sorted(studies[s].attrs["StudyDate"] for s in studies_of[patient])
    return {
        "patient": patient,
        "study": study,
        "series": series,
        "series_list": series_list,
        "images": images,
        "studies": sorted(studies),
        "dates": dates,
        "patient_dates": p_dates,
        "modality": data.entities("SERIES")[series].attrs["Modality"],
    }


def query_cases(data: QRData) -> dict[str, QueryCase]:
    """The C-FIND cases: both models, every level, single / wildcard / range / UID list."""
    c = _pick(data)
    dates = c["dates"]
    mid_low, mid_high = dates[len(dates) // 4], dates[(3 * len(dates)) // 4]
    p_dates = c["patient_dates"]
    three_studies = c["studies"][1:4]
    three_images = c["images"][1:7:2]
    cases = [
        # Patient Root
        QueryCase("patient-PATIENT-name-wildcard", "patient", "PATIENT",
                  {"PatientName": "Doe^John*", "PatientID": "", "PatientBirthDate": "",
                   "PatientSex": ""}),
        QueryCase("patient-PATIENT-id-qmark", "patient", "PATIENT",
                  {"PatientID": "PID-000?", "PatientName": "", "PatientSex": ""}),
        QueryCase("patient-PATIENT-birthdate-range", "patient", "PATIENT",
                  {"PatientBirthDate": "19600101-19751231", "PatientID": "",
                   "PatientName": ""}),
        QueryCase("patient-PATIENT-all", "patient", "PATIENT",
                  {"PatientID": "", "PatientName": ""}),
        QueryCase("patient-STUDY-date-range", "patient", "STUDY",
                  {"PatientID": c["patient"], "StudyDate": f"{p_dates[0]}-{p_dates[-2]}",
                   "StudyInstanceUID": "", "StudyTime": "", "AccessionNumber": "",
                   "StudyID": "", "StudyDescription": ""}),
        QueryCase("patient-SERIES-modality", "patient", "SERIES",
                  {"PatientID": c["patient"], "StudyInstanceUID": c["study"],
                   "Modality": c["modality"], "SeriesInstanceUID": "", "SeriesNumber": "",
                   "SeriesDescription": ""}),
        QueryCase("patient-IMAGE-uid-list", "patient", "IMAGE",
                  {"PatientID": c["patient"], "StudyInstanceUID": c["study"],
                   "SeriesInstanceUID": c["series"], "SOPInstanceUID": "\\".join(three_images),
                   "SOPClassUID": "", "InstanceNumber": ""}),
        # Study Root
        QueryCase("study-STUDY-all", "study", "STUDY",
                  {"StudyInstanceUID": "", "PatientID": "", "StudyDate": ""}),
        QueryCase("study-STUDY-name-wildcard-open-date", "study", "STUDY",
                  {"PatientName": "Doe^Jo*", "StudyDate": f"{mid_low}-", "StudyInstanceUID": "",
                   "PatientID": "", "AccessionNumber": "", "StudyDescription": ""}),
        QueryCase("study-STUDY-date-range", "study", "STUDY",
                  {"StudyDate": f"{mid_low}-{mid_high}", "StudyInstanceUID": "",
                   "PatientName": "", "StudyTime": ""}),
        QueryCase("study-STUDY-date-upper-open", "study", "STUDY",
                  {"StudyDate": f"-{mid_low}", "StudyInstanceUID": "", "PatientID": ""}),
        QueryCase("study-STUDY-time-range", "study", "STUDY",
                  {"StudyTime": "080000-120000", "StudyInstanceUID": "", "StudyDate": ""}),
        QueryCase("study-STUDY-description-wildcard", "study", "STUDY",
                  {"StudyDescription": "*CT*", "StudyInstanceUID": "", "AccessionNumber": ""}),
        QueryCase("study-STUDY-accession-qmark", "study", "STUDY",
                  {"AccessionNumber": "A?????0?", "StudyInstanceUID": "", "PatientID": ""}),
        QueryCase("study-STUDY-uid-list", "study", "STUDY",
                  {"StudyInstanceUID": "\\".join(three_studies), "PatientName": "",
                   "StudyDate": "", "StudyID": ""}),
        QueryCase("study-STUDY-sex-single", "study", "STUDY",
                  {"PatientSex": "F", "StudyInstanceUID": "", "PatientName": ""}),
        QueryCase("study-SERIES-all-of-study", "study", "SERIES",
                  {"StudyInstanceUID": c["study"], "SeriesInstanceUID": "", "Modality": "",
                   "SeriesNumber": "", "SeriesDescription": ""}),
        QueryCase("study-SERIES-number-single", "study", "SERIES",
                  {"StudyInstanceUID": c["study"], "SeriesNumber": "2",
                   "SeriesInstanceUID": "", "Modality": ""}),
        QueryCase("study-IMAGE-all-of-series", "study", "IMAGE",
                  {"StudyInstanceUID": c["study"], "SeriesInstanceUID": c["series"],
                   "SOPInstanceUID": "", "InstanceNumber": "", "SOPClassUID": ""}),
        QueryCase("study-IMAGE-uid-list", "study", "IMAGE",
                  {"StudyInstanceUID": c["study"], "SeriesInstanceUID": c["series"],
                   "SOPInstanceUID": "\\".join(three_images), "InstanceNumber": ""}),
    ]  # fmt: skip
    assert tuple(case.name for case in cases) == QUERY_CASE_NAMES
    return {case.name: case for case in cases}


#: A PN query whose answer differs between case-sensitive and insensitive matching.
CASE_INSENSITIVE_PN = QueryCase(
    "study-STUDY-name-case-insensitive",
    "study",
    "STUDY",
    {"PatientName": "doe^j*", "StudyInstanceUID": "", "PatientID": ""},
    pn_case_sensitive=False,
)


@dataclass(frozen=True)
class RetrieveCase:
    name: str
    model: str
    level: str
    keys: dict[str, str]  # unique keys only (PS3.4 C.4.2.1.4)

    def expected(self, data: QRData) -> list[Instance]:
        return expected_instances(data, self.keys, level=self.level, model=self.model)


def retrieve_cases(data: QRData) -> dict[str, RetrieveCase]:
    """C-MOVE / C-GET cases: every level, both models, from 3 to all instances."""
    c = _pick(data)
    other_patient = sorted(data.entities("PATIENT"))[-1]
    cases = [
        RetrieveCase("patient-PATIENT", "patient", "PATIENT", {"PatientID": other_patient}),
        RetrieveCase("patient-STUDY", "patient", "STUDY",
                     {"PatientID": c["patient"], "StudyInstanceUID": c["study"]}),
        RetrieveCase("study-STUDY-all-studies", "study", "STUDY",
                     {"StudyInstanceUID": "\\".join(c["studies"])}),
        RetrieveCase("study-SERIES", "study", "SERIES",
                     {"StudyInstanceUID": c["study"],
                      "SeriesInstanceUID": "\\".join(c["series_list"][:2])}),
        RetrieveCase("study-IMAGE", "study", "IMAGE",
                     {"StudyInstanceUID": c["study"], "SeriesInstanceUID": c["series"],
                      "SOPInstanceUID": "\\".join(c["images"][:3])}),
    ]  # fmt: skip
    assert tuple(case.name for case in cases) == RETRIEVE_CASE_NAMES
    return {case.name: case for case in cases}


def tag_arg(keyword: str) -> str:
    """``gggg,eeee`` of a keyword (what both findscu and dicomnet accept)."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return f"{tag >> 16:04x},{tag & 0xFFFF:04x}"


def key_args(
    keys: Mapping[str, str], *, level: str | None = None, keywords: bool = False
) -> list[str]:
    """``-k gggg,eeee[=value]`` arguments (QueryRetrieveLevel first when given);
    ``keywords=True`` names the attributes by keyword instead."""
    out: list[str] = []
    if level is not None:
        out += ["-k", f"0008,0052={level}"]
    for keyword, value in keys.items():
        name = keyword if keywords else tag_arg(keyword)
        out += ["-k", f"{name}={value}" if value else name]
    return out


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys
    import tempfile

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    built = generate(target)
    print(built.summary())
    for case in query_cases(built).values():
        print(f"{case.name:45s} {len(case.expected(built)):4d} match(es)")
    for r in retrieve_cases(built).values():
        print(f"{r.name:45s} {len(r.expected(built)):4d} instance(s)")
