"""The index at scale, SQLite against PostgreSQL: ingest rate and C-FIND latency.

Builds an index of N generated instances (patients of 2 studies of 3 series of 20
instances; names from 200 family names, study dates over ten years, 4 modalities) in
each database, through `Index.add_many` (the path `serve`'s indexer takes, the files
not read: every instance names one small file), then times C-FIND queries with typical
keys at each level, each one 30 times with random values, and prints p50 / p99.

    python -m benchmarks.index_scale --instances 100000 [--instances 1000000] [--json F]

PostgreSQL: a private server is started as the tests do (tests/postgres.py; Debian's
`postgresql` package), or give `--postgresql URL`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomnet.pacs.index import Index

ROOT = "1.2.826.0.1.3680043.10.1452.77"
CT = "1.2.840.10008.5.1.4.1.1.2"
FAMILY = [f"{a}{b}" for a in ("SMITH", "JONES", "BROWN", "MILLER", "DAVIS") for b in range(40)]
GIVEN = ["ANN", "JOHN", "MARIA", "WEI", "OMAR", "EVA", "LUCA", "NINA"]
MODALITIES = ["CT", "MR", "US", "CR"]
PER_SERIES, SERIES, STUDIES = 20, 3, 2
PER_PATIENT = PER_SERIES * SERIES * STUDIES
BATCH = 1000


def _date(rng: random.Random) -> str:
    day = 16436 + rng.randrange(3650)  # 2015-01-01 + up to ten years, in days
    return time.strftime("%Y%m%d", time.gmtime(day * 86400))


def instances(
    count: int, file_meta: FileMetaDataset, part: tuple[int, int] = (0, 1)
) -> Iterator[Dataset]:
    """The first `count` instances; `part` (k, n): only those of every n-th patient from
    the k-th (what node k of n receives)."""
    rng = random.Random(1452)
    for p in range(count // PER_PATIENT + 1):
        name = f"{rng.choice(FAMILY)}^{rng.choice(GIVEN)}"
        birth = f"19{rng.randrange(30, 99)}0101"
        for s in range(STUDIES):
            study, day, accession = f"{ROOT}.{p}.{s}", _date(rng), f"A{p:07d}{s}"
            for e in range(SERIES):
                modality = rng.choice(MODALITIES)
                for i in range(PER_SERIES):
                    if count <= 0:
                        return
                    count -= 1
                    if p % part[1] != part[0]:
                        continue
                    ds = Dataset()
                    ds.file_meta = file_meta
                    ds.PatientID, ds.PatientName, ds.PatientBirthDate = f"P{p:07d}", name, birth
                    ds.StudyInstanceUID, ds.StudyDate, ds.AccessionNumber = study, day, accession
                    ds.StudyTime = "120000"
                    ds.SeriesInstanceUID, ds.Modality = f"{study}.{e}", modality
                    ds.SeriesNumber = e + 1
                    ds.SOPClassUID, ds.SOPInstanceUID = CT, f"{study}.{e}.{i}"
                    ds.InstanceNumber = i + 1
                    yield ds


def ingest(
    index: Index, count: int, path: str, file_meta: FileMetaDataset, part: tuple[int, int] = (0, 1)
) -> float:
    """Instances indexed per second (transactions of BATCH)."""
    start = time.perf_counter()
    batch: list[tuple[str, Dataset]] = []
    added = 0
    for ds in instances(count, file_meta, part):
        batch.append((path, ds))
        if len(batch) == BATCH:
            added += index.add_many(batch)
            batch = []
    if batch:
        added += index.add_many(batch)
    return added / (time.perf_counter() - start)


def _node(location: str, root: str, count: int, part: tuple[int, int], go: Any) -> None:
    """One node of `ingest_nodes`, in a process of its own."""
    with Index(location, root=root) as index:
        go.wait()
        ingest(index, count, str(Path(root) / "one.dcm"), _file_meta(), part)


def ingest_nodes(location: str, root: Path, count: int, nodes: int) -> float:
    """Instances indexed per second by `nodes` processes at once, each its share of the
    patients, into one database (what several `serve` nodes do)."""
    Index(location, root=root).close()  # the schema made before they start
    context = multiprocessing.get_context("fork")
    go = context.Event()
    workers = [
        context.Process(target=_node, args=(location, str(root), count, (k, nodes), go))
        for k in range(nodes)
    ]
    for worker in workers:
        worker.start()
    time.sleep(1.0)  # each has connected and is waiting
    start = time.perf_counter()
    go.set()
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0, worker.exitcode
    elapsed = time.perf_counter() - start
    with Index(location, root=root) as index:
        assert index.counts().instances == count, index.counts()
    return count / elapsed


def _query(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def queries(count: int) -> dict[str, Callable[[random.Random], tuple[str, str, Dataset]]]:
    patients = count // PER_PATIENT

    def some_patient(rng: random.Random) -> int:
        return rng.randrange(max(patients, 1))

    return {
        "PATIENT by PatientID": lambda r: (
            "patient", "PATIENT", _query("PATIENT", PatientID=f"P{some_patient(r):07d}",
                                         PatientName="")),
        "PATIENT by PatientName wildcard (SMITH1*)": lambda r: (
            "patient", "PATIENT", _query("PATIENT", PatientID="",
                                         PatientName=f"{r.choice(FAMILY)[:6]}*")),
        "STUDY by StudyDate range (one month)": lambda r: (
            "study", "STUDY", _query("STUDY", StudyInstanceUID="",
                                     StudyDate=_one_month(r))),
        "STUDY by AccessionNumber": lambda r: (
            "study", "STUDY", _query("STUDY", StudyInstanceUID="",
                                     AccessionNumber=f"A{some_patient(r):07d}1")),
        "STUDY by PatientName, ModalitiesInStudy returned": lambda r: (
            "study", "STUDY", _query("STUDY", StudyInstanceUID="", ModalitiesInStudy="",
                                     PatientName=f"{r.choice(FAMILY)}^*")),
        "SERIES of a study": lambda r: (
            "study", "SERIES", _query("SERIES", StudyInstanceUID=f"{ROOT}.{some_patient(r)}.0",
                                      SeriesInstanceUID="", Modality="")),
        "IMAGE of a series": lambda r: _image_of_a_series(some_patient(r)),
    }  # fmt: skip


def _image_of_a_series(patient: int) -> tuple[str, str, Dataset]:
    study = f"{ROOT}.{patient}.1"
    query = _query("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=f"{study}.2")
    query.SOPInstanceUID = ""
    return "study", "IMAGE", query


def _one_month(rng: random.Random) -> str:
    """A DA range over the first 28 days of a month in the ten years of the data."""
    month = f"{2015 + rng.randrange(10)}{1 + rng.randrange(12):02d}"
    return f"{month}01-{month}28"


def latencies(index: Index, count: int, repeat: int = 30) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, make in queries(count).items():
        rng = random.Random(name)
        times, matches = [], []
        for _ in range(repeat):
            model, level, query = make(rng)
            start = time.perf_counter()
            found = sum(1 for _ in index.query(model, level, query))  # type: ignore[arg-type]
            times.append((time.perf_counter() - start) * 1000)
            matches.append(found)
        out[name] = summary(times, matches)
    return out


def summary(times: list[float], matches: list[int]) -> dict[str, float]:
    """p50 and p99 of `times` (ms) and the median of `matches`."""
    times = sorted(times)
    return {
        "p50_ms": statistics.median(times),
        "p99_ms": times[min(len(times) - 1, round(0.99 * (len(times) - 1)))],
        "matches_median": statistics.median(matches),
    }


def _file_meta() -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = f"{ROOT}.0"
    return meta


def run(count: int, location: str, root: Path) -> dict[str, Any]:
    meta = _file_meta()
    dummy = root / "one.dcm"
    if not dummy.exists():
        ds = next(instances(1, meta))
        ds.save_as(dummy, enforce_file_format=True)
    with Index(location, root=root) as index:
        rate = ingest(index, count, str(dummy), meta)
        assert index.counts().instances == count, index.counts()
        return {"instances": count, "ingest_per_s": rate, "find": latencies(index, count)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, action="append", default=[])
    parser.add_argument("--postgresql", metavar="URL", help="else a private server is started")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    counts = args.instances or [100_000]
    results: list[dict[str, Any]] = []
    server = None
    if args.postgresql is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import postgres  # the tests' private server

        server = postgres.Server()
        server.start()
    try:
        with tempfile.TemporaryDirectory(prefix="index-scale-") as folder:
            root = Path(folder)
            for count in counts:
                url = args.postgresql or postgres.fresh_schema(server)
                for backend, location in (("sqlite", str(root / f"{count}.sqlite")),
                                          ("postgresql", url)):  # fmt: skip
                    result = {"backend": backend, **run(count, location, root)}
                    # Two nodes at once, into a second, empty database (with a URL
                    # given, there is none to make: PostgreSQL's is left out).
                    two = None if backend == "postgresql" else str(root / f"{count}-2.sqlite")
                    if backend == "postgresql" and server is not None:
                        two = postgres.fresh_schema(server)
                    if two is not None:
                        result["ingest_per_s_2_nodes"] = ingest_nodes(two, root, count, 2)
                    results.append(result)
                    print(json.dumps(result), flush=True)
    finally:
        if server is not None:
            server.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
