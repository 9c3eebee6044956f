"""Three archives on the same instances, end to end over DICOM: `dicomnet serve` (its
embedded SQLite index), `dicomnet serve --index postgresql://...`, and Orthanc with its
default index (SQLite, no plugin).

The instances are index_scale's (patients of 2 studies of 3 series of 20 instances),
written as small Part-10 files (no pixel data), every other patient in a second
folder. Each archive receives them from two `dicomnet store --concurrency 2` at once,
a folder each (a C-STORE is answered once the instance is indexed by `serve --index
URL` and by Orthanc; `serve` on SQLite indexes in the background, so every rate is
taken once the archive finds them all). Two more archives take them on two processes:
two `serve` nodes on one storage folder and one PostgreSQL database (a sender each),
and `serve --workers 2` on SQLite. Then each answers index_scale's C-FIND queries, each
30 times with random values, from one association of our SCU: p50 / p99 in ms, with
the median number of matches.

    python -m benchmarks.index_archives --instances 10000 [--json F]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import anyio
from pydicom.dataset import Dataset

import dicomnet
from benchmarks.index_scale import _file_meta, instances, queries, summary
from benchmarks.peers import _base_env, _loop_env
from benchmarks.procs import HOST, ServerProcess, free_port

REPEAT = 30


def write_files(folder: Path, count: int) -> None:
    """The instances in `folder`/0 and `folder`/1, every other patient in each."""
    for part in (0, 1):
        (folder / str(part)).mkdir(parents=True)
        for ds in instances(count, _file_meta(), (part, 2)):
            ds.file_meta = _file_meta()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(folder / str(part) / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)


def _serve(workdir: Path, *args: str, node: str = "") -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "dicomnet", "serve", "--host", HOST, "--port", str(port)]
    argv += ["--aet", "ARCHIVE", "--storage", str(workdir / "storage"), "--no-fsync", *args]
    env = _loop_env(_base_env(nodelay=False), "uvloop")
    workers = int(args[args.index("--workers") + 1]) if "--workers" in args else 1
    log = workdir / f"serve{node}.log"
    return ServerProcess("dicomnet serve", argv, port, log, env=env, listeners=workers)


@contextmanager
def serve(workdir: Path, *args: str) -> Iterator[list[int]]:
    with _serve(workdir, *args) as server:
        yield [server.port]


@contextmanager
def two_nodes(workdir: Path, index: str) -> Iterator[list[int]]:
    """Two `serve` nodes on one storage folder and one database."""
    with ExitStack() as stack:
        nodes = [
            stack.enter_context(_serve(workdir, "--index", index, "--node", n, node=n))
            for n in ("a", "b")
        ]
        yield [node.port for node in nodes]


@contextmanager
def orthanc(workdir: Path) -> Iterator[list[int]]:
    """Orthanc's defaults but for private folders, free ports, no plugins, and C-FIND and
    C-STORE allowed from any AE title; storage area not fsynced, as `serve --no-fsync`."""
    port = free_port()
    config = {
        "Name": "bench-archive",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomAet": "ARCHIVE",
        "DicomPort": port,
        "HttpPort": free_port(),
        "RemoteAccessAllowed": False,
        "Plugins": [],
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "SyncStorageArea": False,
    }
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    env = _base_env(nodelay=True)  # DCMTK's network layer: Nagle off only when told
    with ServerProcess("Orthanc", ["Orthanc", str(path)], port, workdir / "o.log", env=env):
        yield [port]


async def _count(port: int) -> int:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.NumberOfStudyRelatedInstances = ""
    total = 0
    async with dicomnet.connect(HOST, port, aet="BENCHSCU", aec="ARCHIVE") as assoc:
        async for found in assoc.find(query, model="study"):
            total += int(found.get("NumberOfStudyRelatedInstances", 0) or 0)
    return total


def ingest(ports: list[int], files: Path, count: int) -> float:
    """Instances indexed per second: two senders at once (folder k to node k, or both
    to the one), and the wait until all are found."""
    senders = []
    start = time.perf_counter()
    for part in (0, 1):
        argv = [sys.executable, "-m", "dicomnet", "store", HOST, str(ports[part % len(ports)])]
        argv += [str(files / str(part)), "--aec", "ARCHIVE", "--concurrency", "2"]
        senders.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for sender in senders:
        _, err = sender.communicate(timeout=3600)
        assert sender.returncode == 0, err[-2000:]
    while anyio.run(_count, ports[-1]) < count:
        time.sleep(0.05)
    return count / (time.perf_counter() - start)


async def _latencies(port: int, count: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    async with dicomnet.connect(HOST, port, aet="BENCHSCU", aec="ARCHIVE") as assoc:
        for name, make in queries(count).items():
            rng = random.Random(name)
            times, matches = [], []
            for _ in range(REPEAT):
                model, _level, query = make(rng)
                start = time.perf_counter()
                found = [r async for r in assoc.find(query, model=model)]
                times.append((time.perf_counter() - start) * 1000)
                matches.append(len(found))
            out[name] = summary(times, matches)
    return out


def run(name: str, archive: Callable[[Path], Any], root: Path, count: int) -> dict[str, Any]:
    workdir = root / name
    workdir.mkdir()
    with archive(workdir) as ports:
        rate = ingest(ports, root / "files", count)
        return {"archive": name, "instances": count, "ingest_per_s": rate,
                "find": anyio.run(_latencies, ports[0], count)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import postgres  # the tests' private server

    results = []
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="archives-") as folder:
        root = Path(folder)
        write_files(root / "files", args.instances)
        server = postgres.Server()
        server.start()
        stack.callback(server.stop)
        archives: dict[str, Callable[[Path], Any]] = {
            "serve (SQLite)": serve,
            "serve (PostgreSQL)": lambda w: serve(w, "--index", postgres.fresh_schema(server)),
        }
        if shutil.which("Orthanc"):
            archives["Orthanc (SQLite)"] = orthanc
        archives["serve --workers 2 (SQLite)"] = lambda w: serve(w, "--workers", "2")
        archives["serve, 2 nodes (PostgreSQL)"] = lambda w: two_nodes(
            w, postgres.fresh_schema(server)
        )
        for name, archive in archives.items():
            result = run(name, archive, root, args.instances)
            results.append(result)
            print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
