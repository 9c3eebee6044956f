"""`dicomnet bench`: load-test a peer with C-ECHO or C-STORE over concurrent associations.

N workers share one budget (a count of operations or a deadline). Each opens an
association, runs operations until the budget is spent (or `--per-association`
of them, then releases and opens another), and records per-operation latency,
status and bytes. The result is a table, or one JSON object with `--json`.

Generated store instances are Secondary Capture, Explicit VR Little Endian,
8-bit MONOCHROME2, of one patient (Patient ID DICOMNET-BENCH, name DICOMNET^BENCH) and
one study and series per run, so that they can be found and removed from the target
PACS afterwards (the report says how), written once with pydicom as one Part-10 file per
worker;
before each operation the worker rewrites the SOP Instance UID in place (same
length, in the file meta and in the data set), so every operation sends a new
instance and is streamed from disk like any other file. `--files` sends the
given files as they are, cycling through them (their UIDs then repeat).

Latency covers every answered operation, failure statuses included; throughput
(ops/s, MB/s) counts the operations that succeeded or warned, and their data set
bytes. Failures are keyed by status (`A700`) or by kind (`connection-failed`,
`rejected`, `aborted`, `dimse-timeout`, ..., and `not-attempted` for what was left
when every worker gave up after 10 association failures in a row).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from dicomnet.cli.common import add_identity, add_tls, identity_from_args
from dicomnet.cli.delete import BENCH_PATIENT_ID
from dicomnet.client import connect
from dicomnet.errors import (
    ARTIMTimeout,
    AssociationAborted,
    AssociationRejected,
    ConnectionFailed,
    ConnectTimeout,
    DicomNetError,
    DicomTimeoutError,
    DimseError,
    DimseTimeout,
    IdleTimeout,
    NotNegotiatedError,
    ProtocolError,
)
from dicomnet.proto.contexts import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    VERIFICATION,
    ContextCount,
    PresentationContext,
    contexts_for_instances,
)
from dicomnet.services import Association
from dicomnet.status import Status
from dicomnet.storage import Part10File

__all__ = ["add_parser", "parse_size", "run"]

log = logging.getLogger("dicomnet")

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: The patient of every generated instance, so that they can be found and removed.
BENCH_PATIENT_NAME = "DICOMNET^BENCH"
MAX_CONSECUTIVE_ASSOCIATION_FAILURES = 10
RETRY_DELAY = 0.01  # seconds between a failed association and the next attempt
PROGRESS_INTERVAL = 0.1
MAX_SIZE = 3 << 30  # pixel data must stay under the 32-bit element length
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([KMG]?)(?:I?B)?\s*", re.IGNORECASE)

# How failures that are not a DIMSE status are keyed (first match wins).
_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (AssociationRejected, "rejected"),
    (AssociationAborted, "aborted"),
    (ConnectTimeout, "connect-timeout"),
    (ConnectionFailed, "connection-failed"),
    (ARTIMTimeout, "artim-timeout"),
    (DimseTimeout, "dimse-timeout"),
    (IdleTimeout, "idle-timeout"),
    (DicomTimeoutError, "timeout"),
    (NotNegotiatedError, "not-negotiated"),
    (ProtocolError, "protocol-error"),
    (OSError, "os-error"),
)
NOT_ATTEMPTED = "not-attempted"


# --- command line -----------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes from `2048`, `512K`, `1M`, `1.5MiB`, `1G` (binary multiples)."""
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 2048, 512K, 1M)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if not 1 <= size <= MAX_SIZE:
        raise argparse.ArgumentTypeError(f"size must be between 1 byte and 3G, not {text!r}")
    return size


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add the `bench` sub-command to `subparsers` and return its parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="load test: throughput and latency percentiles of C-ECHO or C-STORE",
        description="Load-test a DICOM peer: N concurrent associations doing C-ECHO or "
        "C-STORE until --count operations are done or --duration has passed; prints "
        "throughput, latency percentiles and failures by status. --op store stores test "
        f"instances in the target PACS: every generated one belongs to the patient "
        f"{BENCH_PATIENT_ID} ({BENCH_PATIENT_NAME}) and to a new study per run; the report "
        "says how to remove them (`dicomnet delete --bench` for a dicomnet serve).",
    )
    parser.add_argument("host", help="the peer's host name or address")
    parser.add_argument("port", type=int, help="the peer's TCP port")
    parser.add_argument("--aet", default="DICOMNET", help="our AE title (default: DICOMNET)")
    parser.add_argument("--aec", default="ANY-SCP", help="the peer's AE title (default: ANY-SCP)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log associations")
    parser.add_argument(
        "--debug", action="store_true", help="log association and DIMSE traffic in detail"
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="connect/ARTIM timeout, seconds (default 30)"
    )
    parser.add_argument(
        "--dimse-timeout", type=float, default=60.0, help="DIMSE response timeout (default 60)"
    )
    parser.add_argument(
        "--op",
        required=True,
        choices=("echo", "store"),
        help="the operation: echo, or store (which leaves test instances in the target "
        f"PACS, patient {BENCH_PATIENT_ID})",
    )
    add_identity(parser)
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=1,
        metavar="N",
        help="associations in parallel (default 1)",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--count",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="total operations (default 1000)",
    )
    budget.add_argument(
        "--duration",
        type=_positive_float,
        default=None,
        metavar="S",
        help="run for S seconds instead of a count",
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default=None,
        metavar="BYTES",
        help="store: pixel data size of the generated instances, e.g. 2048, 512K, 1M "
        "(default 2048)",
    )
    parser.add_argument(
        "--files",
        nargs="+",
        default=None,
        metavar="PATH",
        help="store: send these files and folders (recursive) instead, cycling through them",
    )
    parser.add_argument(
        "--per-association",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="operations per association before releasing and re-associating "
        "(default 0: one association per worker for the whole run)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object with the results"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no live progress line even on a terminal"
    )
    add_tls(parser)
    parser.set_defaults(run=run)
    return parser


# --- results ----------------------------------------------------------------------------------


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty sequence."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _megabytes(nbytes: int) -> str:
    mb = nbytes / 1e6
    return f"{mb:.1f} MB" if mb >= 10 else f"{mb:.3f} MB"


def failure_kind(exc: BaseException) -> str:
    """How a failure is keyed: the DIMSE status in hex (`A700`), else a kind of error."""
    if isinstance(exc, DimseError):
        return f"{int(exc.status):04X}"
    for cls, kind in _KINDS:
        if isinstance(exc, cls):
            return kind
    return type(exc).__name__


@dataclass
class Results:
    """What the run measured so far."""

    op: str
    concurrency: int
    succeeded: int = 0
    warnings: int = 0
    failed: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    warning_statuses: Counter[str] = field(default_factory=Counter)
    latencies: array[float] = field(default_factory=lambda: array("d"))
    bytes_sent: int = 0
    associations: int = 0
    association_failures: int = 0
    started: float = 0.0
    finished: float | None = None
    interrupted: bool = False

    @property
    def operations(self) -> int:
        return self.succeeded + self.warnings + self.failed

    @property
    def elapsed(self) -> float:
        end = self.finished if self.finished is not None else time.perf_counter()
        return max(end - self.started, 1e-9)

    def success(self, status: Status, latency: float, nbytes: int) -> None:
        self.latencies.append(latency)
        self.bytes_sent += nbytes
        if status.is_warning:
            self.warnings += 1
            self.warning_statuses[f"{int(status):04X}"] += 1
        else:
            self.succeeded += 1

    def failure(self, kind: str, latency: float | None = None, count: int = 1) -> None:
        if latency is not None:
            self.latencies.append(latency)
        self.failed += count
        self.failures[kind] += count

    def summary(self) -> dict[str, Any]:
        """The results as the JSON object of `--json`."""
        elapsed = self.elapsed
        good = self.succeeded + self.warnings
        latency: dict[str, float | None] = dict.fromkeys(("p50", "p90", "p99", "max", "mean"))
        if self.latencies:
            ordered = sorted(self.latencies)
            latency = {
                "p50": _percentile(ordered, 0.50) * 1000,
                "p90": _percentile(ordered, 0.90) * 1000,
                "p99": _percentile(ordered, 0.99) * 1000,
                "max": ordered[-1] * 1000,
                "mean": sum(ordered) / len(ordered) * 1000,
            }
        return {
            "op": self.op,
            "concurrency": self.concurrency,
            "operations": self.operations,
            "succeeded": self.succeeded,
            "warnings": self.warnings,
            "failed": self.failed,
            "failures": dict(sorted(self.failures.items())),
            "warning_statuses": dict(sorted(self.warning_statuses.items())),
            "elapsed_s": elapsed,
            "ops_per_s": good / elapsed,
            "mb_per_s": self.bytes_sent / 1e6 / elapsed if self.op == "store" else None,
            "bytes": self.bytes_sent,
            "latency_ms": latency,
            "associations": self.associations,
            "association_failures": self.association_failures,
            "interrupted": self.interrupted,
        }

    def table(self, target: str, source: str | None) -> str:
        """The results as the human-readable report."""
        s = self.summary()
        lat = s["latency_ms"]
        lines = [f"dicomnet bench: {self.op} to {target}, concurrency {self.concurrency}"]
        if source:
            lines.append(f"  instances     {source}")
        lines += [
            f"  operations    {s['operations']} (succeeded {s['succeeded']}, "
            f"warnings {s['warnings']}, failed {s['failed']})"
            + ("  [interrupted]" if self.interrupted else ""),
            f"  elapsed       {s['elapsed_s']:.3f} s",
            f"  throughput    {s['ops_per_s']:.1f} ops/s"
            + (
                f", {s['mb_per_s']:.2f} MB/s ({_megabytes(self.bytes_sent)})"
                if s["mb_per_s"] is not None
                else ""
            ),
        ]
        if lat["p50"] is None:
            lines.append("  latency ms    -")
        else:
            lines.append(
                f"  latency ms    p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  "
                f"p99 {lat['p99']:.2f}  max {lat['max']:.2f}  mean {lat['mean']:.2f}"
            )
        lines.append(
            f"  associations  {self.associations}"
            + (f" ({self.association_failures} failed)" if self.association_failures else "")
        )
        if s["warning_statuses"]:
            text = ", ".join(f"{k}: {v}" for k, v in s["warning_statuses"].items())
            lines.append(f"  warnings      {text}")
        failures = ", ".join(f"{k}: {v}" for k, v in s["failures"].items()) or "none"
        lines.append(f"  failures      {failures}")
        return "\n".join(lines)


# --- what to send -----------------------------------------------------------------------------


class _Budget:
    """Tickets for operations: a count, or until a deadline. Ticket numbers are 0, 1, 2..."""

    def __init__(self, count: int | None, deadline: float | None) -> None:
        self.count = count
        self.deadline = deadline
        self.issued = 0

    def take(self) -> int | None:
        if self.count is not None and self.issued >= self.count:
            return None
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            return None
        self.issued += 1
        return self.issued - 1

    def close(self) -> int:
        """Stop issuing tickets; return how many of the count were never issued."""
        left = self.count - self.issued if self.count is not None else 0
        self.count = self.issued
        return max(left, 0)


class _Source:
    """Instances to store: `prepare(worker, ticket)` gives the file and its data set size."""

    contexts: list[PresentationContext]
    description: str

    def prepare(self, worker: int, ticket: int) -> tuple[Path, int]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the source holds (temp files)."""


class _Generated(_Source):
    """One Secondary Capture file per worker whose SOP Instance UID is rewritten per ticket."""

    def __init__(self, size: int, workers: int) -> None:
        from pydicom.uid import generate_uid

        self.size = size
        self.folder = Path(tempfile.mkdtemp(prefix="dicomnet-bench-"))
        # "2.25.<uuid>" is at most 44 characters; ".1" + 9 digits keeps every UID one length.
        self.root = generate_uid(prefix=None)
        # One study (and series) per run, of the bench patient.
        self.study_instance_uid = generate_uid()
        self.series_instance_uid = generate_uid()
        self.paths: list[Path] = []
        self.handles: list[BinaryIO] = []
        self.offsets: list[int] = []
        self.dataset_length = 0
        self.workers = workers
        self.contexts = [PresentationContext(SECONDARY_CAPTURE, (EXPLICIT_VR_LITTLE_ENDIAN,))]
        rows, columns, frames = _dimensions(size)
        self.description = (
            f"generated Secondary Capture {columns}x{rows}"
            + (f"x{frames}" if frames > 1 else "")
            + f" 8-bit ({rows * columns * frames} B pixel data), a new SOP Instance UID "
            f"per operation, patient {BENCH_PATIENT_ID}"
        )

    def uid(self, ticket: int) -> str:
        return f"{self.root}.{1_000_000_000 + ticket % 1_000_000_000}"

    def build(self) -> None:
        """Write the template with pydicom, then one copy per worker (blocking)."""
        template = self.folder / "template.dcm"
        placeholder = self.uid(0)
        _write_instance(
            template, self.size, placeholder, self.study_instance_uid, self.series_instance_uid
        )
        with open(template, "rb") as f:
            head = f.read(1 << 16)
        needle = placeholder.encode("ascii")
        start = 0
        while (found := head.find(needle, start)) >= 0:
            self.offsets.append(found)
            start = found + 1
        if len(self.offsets) != 2:  # pragma: no cover - pydicom wrote something unexpected
            raise RuntimeError(f"SOP Instance UID found {len(self.offsets)} times, not twice")
        self.dataset_length = Part10File.open(template).dataset_length
        for worker in range(self.workers):
            path = self.folder / f"worker-{worker}.dcm"
            shutil.copyfile(template, path)
            self.paths.append(path)
            self.handles.append(open(path, "r+b", buffering=0))
        template.unlink()

    def prepare(self, worker: int, ticket: int) -> tuple[Path, int]:
        uid = self.uid(ticket).encode("ascii")
        handle = self.handles[worker]
        for offset in self.offsets:
            handle.seek(offset)
            handle.write(uid)
        return self.paths[worker], self.dataset_length

    def close(self) -> None:
        for handle in self.handles:
            handle.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class _Files(_Source):
    """Given Part-10 files, sent as they are, cycling through them."""

    def __init__(self, files: list[Part10File], skipped: int) -> None:
        self.files = files
        self.contexts = _contexts_for(files)
        total = sum(f.dataset_length for f in files)
        self.description = f"{len(files)} file(s), {_megabytes(total)}, cycled through" + (
            f" ({skipped} skipped)" if skipped else ""
        )

    def prepare(self, worker: int, ticket: int) -> tuple[Path, int]:
        info = self.files[ticket % len(self.files)]
        return info.path, info.dataset_length


def _dimensions(size: int) -> tuple[int, int, int]:
    """Rows, columns, frames of an 8-bit image of about `size` bytes (not more)."""
    columns = 1 << min((size.bit_length() - 1) // 2, 15)
    rows = size // columns
    frames = 1
    if rows > 0xFFFF:
        frames = math.ceil(rows / 0x8000)
        rows //= frames
    return rows, columns, frames


def _write_instance(
    path: Path, size: int, sop_instance_uid: str, study_uid: str, series_uid: str
) -> None:
    """A Secondary Capture Part-10 file (Explicit VR LE, 8-bit MONOCHROME2) of the bench
    patient, written by pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import UID

    rows, columns, frames = _dimensions(size)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = BENCH_PATIENT_NAME
    ds.PatientID = BENCH_PATIENT_ID
    ds.StudyDescription = "dicomnet bench"
    ds.SeriesDescription = "dicomnet bench"
    ds.StudyDate = time.strftime("%Y%m%d")
    ds.StudyTime = time.strftime("%H%M%S")
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    length = rows * columns * frames
    ds.PixelData = (bytes(range(256)) * (length // 256 + 1))[:length]
    dcmwrite(path, ds, enforce_file_format=True)


def _contexts_for(files: Sequence[Part10File]) -> list[PresentationContext]:
    return contexts_for_instances((f.sop_class_uid, f.transfer_syntax) for f in files)


def _load_files(paths: Sequence[str]) -> tuple[list[Part10File], int, list[str]]:
    """Part-10 files under `paths` that fit in 128 contexts; skipped count; errors (blocking)."""
    found: list[Path] = []
    errors: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs.sort()
                found.extend(Path(root) / name for name in sorted(names))
        elif path.is_file():
            found.append(path)
        else:
            errors.append(f"{raw}: no such file or folder")
    files: list[Part10File] = []
    skipped = 0
    count = ContextCount()
    for path in found:
        try:
            info = Part10File.open(path)
        except Exception as exc:
            skipped += 1
            log.info("skipping %s: %s", path, exc)
            continue
        if count.with_(info.sop_class_uid, info.transfer_syntax) > 128:
            skipped += 1
            log.warning("skipping %s: more than 128 presentation contexts needed", path)
            continue
        files.append(info)
        count.add(info.sop_class_uid, info.transfer_syntax)
    return files, skipped, errors


# --- the run ----------------------------------------------------------------------------------


@dataclass
class _Run:
    args: argparse.Namespace
    contexts: list[PresentationContext]
    budget: _Budget
    results: Results
    source: _Source | None

    async def operation(self, association: Association, worker: int, ticket: int) -> bool:
        """One operation; False when the association cannot go on."""
        path, nbytes = (None, 0) if self.source is None else self.source.prepare(worker, ticket)
        start = time.perf_counter()
        try:
            status = await (association.echo() if path is None else association.store(path))
        except DimseError as exc:
            self.results.failure(failure_kind(exc), time.perf_counter() - start)
            log.debug("operation %d failed: %s", ticket, exc)
            return True
        except NotNegotiatedError as exc:
            self.results.failure(failure_kind(exc))
            log.debug("operation %d failed: %s", ticket, exc)
            await anyio.lowlevel.checkpoint()  # failed without I/O: let other tasks run
            return True
        except (DicomNetError, OSError) as exc:
            self.results.failure(failure_kind(exc))
            log.info("operation %d failed, association lost: %s", ticket, exc)
            return False
        self.results.success(status, time.perf_counter() - start, nbytes)
        return True

    async def worker(self, index: int) -> None:
        """Open associations and run operations until the budget is spent."""
        args, results = self.args, self.results
        consecutive_failures = 0
        ticket = self.budget.take()
        while ticket is not None:
            opened = lost = False
            try:
                async with connect(
                    args.host,
                    args.port,
                    aet=args.aet,
                    aec=args.aec,
                    contexts=self.contexts,
                    connect_timeout=args.timeout,
                    artim_timeout=args.timeout,
                    dimse_timeout=args.dimse_timeout,
                    user_identity=identity_from_args(args),
                    tls=getattr(args, "tls_context", None),
                ) as association:
                    opened = True
                    results.associations += 1
                    done = 0
                    while ticket is not None:
                        if association.is_closed:  # died between operations: retry elsewhere
                            lost = True
                            break
                        ok = await self.operation(association, index, ticket)
                        ticket = None
                        done += 1
                        if not ok:
                            lost = True
                            await association.abort()
                            break
                        consecutive_failures = 0
                        if args.per_association and done >= args.per_association:
                            break
                        ticket = self.budget.take()
            except (DicomNetError, OSError) as exc:
                if opened:
                    log.info("association ended with an error: %s", exc)
                else:
                    lost = True
                    if ticket is not None:
                        results.failure(failure_kind(exc))
                        ticket = None
                    log.info("association failed: %s", exc)
            if lost:
                results.association_failures += 1
                consecutive_failures += 1
                if consecutive_failures >= MAX_CONSECUTIVE_ASSOCIATION_FAILURES:
                    log.warning(
                        "worker %d stops after %d association failures in a row",
                        index,
                        consecutive_failures,
                    )
                    if ticket is not None:
                        results.failure(NOT_ATTEMPTED)
                    return
                await anyio.sleep(RETRY_DELAY)
            if ticket is None:
                ticket = self.budget.take()

    async def progress(self) -> None:
        """Redraw one status line on stderr, at most 10 times a second."""
        try:
            while True:
                await anyio.sleep(PROGRESS_INTERVAL)
                self.draw()
        finally:
            self.draw()
            sys.stderr.write("\n")
            sys.stderr.flush()

    def draw(self) -> None:
        results = self.results
        elapsed = results.elapsed
        if self.args.duration is not None:
            where = f"{min(elapsed, self.args.duration):.1f}/{self.args.duration:g} s"
        else:
            where = f"{results.operations}/{self.budget.count} ops"
        rate = (results.succeeded + results.warnings) / elapsed
        sys.stderr.write(f"\r{where}  {rate:.0f} ops/s  failed {results.failed}   ")
        sys.stderr.flush()


async def _watch_interrupt(scope: anyio.CancelScope, results: Results) -> None:
    """On Ctrl-C, stop the workers so that what was measured gets printed."""
    try:
        with anyio.open_signal_receiver(signal.SIGINT) as signals:
            async for _ in signals:
                results.interrupted = True
                scope.cancel()
                return
    except (NotImplementedError, ValueError, RuntimeError):  # pragma: no cover
        return  # no signal handling here (not the main thread, or no support)


async def _make_source(args: argparse.Namespace) -> _Source:
    if args.files:
        if args.size is not None:
            log.warning("--size is ignored with --files")
        files, skipped, errors = await anyio.to_thread.run_sync(_load_files, args.files)
        if errors or not files:
            raise ValueError("; ".join(errors) or "no DICOM Part-10 file to send")
        return _Files(files, skipped)
    count = args.count if args.duration is None else None
    workers = min(args.concurrency, count) if count is not None else args.concurrency
    generated = _Generated(args.size if args.size is not None else 2048, workers)
    try:
        await anyio.to_thread.run_sync(generated.build)
    except BaseException:
        generated.close()
        raise
    return generated


def removal_note(source: _Generated) -> str:
    """What a run stored, and how to remove it."""
    study = source.study_instance_uid
    return (
        f"  stored        test instances: patient {BENCH_PATIENT_ID} ({BENCH_PATIENT_NAME}), "
        f"study {study}\n"
        f"  to remove     dicomnet delete --storage DIR --study-uid {study}\n"
        f"                (a dicomnet serve storing to DIR; --bench instead of --study-uid: "
        f"every run's);\n"
        f"                another PACS: delete patient {BENCH_PATIENT_ID} with its own tools"
    )


async def run(args: argparse.Namespace) -> int:
    """Run the load test described by `args`; 0 if no operation failed, 1 if any did.

    An interrupted run (Ctrl-C) prints what was measured and returns 130.
    """
    identity_from_args(args)  # a bad combination of identity options stops here
    results = Results(args.op, args.concurrency)
    source: _Source | None = None
    contexts = [PresentationContext(VERIFICATION)]
    if args.op == "store":
        try:
            source = await _make_source(args)
        except ValueError as exc:
            print(f"dicomnet bench: {exc}", file=sys.stderr)
            return 2
        contexts = source.contexts
    try:
        count = args.count if args.duration is None else None
        workers = min(args.concurrency, count) if count is not None else args.concurrency
        results.started = time.perf_counter()
        deadline = results.started + args.duration if args.duration is not None else None
        budget = _Budget(count, deadline)
        bench = _Run(args, contexts, budget, results, source)
        show = sys.stderr.isatty() and not args.no_progress
        async with anyio.create_task_group() as outer:
            outer.start_soon(_watch_interrupt, outer.cancel_scope, results)
            if show:
                outer.start_soon(bench.progress)
            async with anyio.create_task_group() as tg:
                for index in range(workers):
                    tg.start_soon(bench.worker, index)
            outer.cancel_scope.cancel()
        results.finished = time.perf_counter()
        left = budget.close()
        if left and not results.interrupted:
            results.failure(NOT_ATTEMPTED, count=left)  # every worker gave up
    finally:
        if source is not None:
            source.close()
    if args.json:
        print(json.dumps(results.summary()), flush=True)
    else:
        target = f"{args.aec}@{args.host}:{args.port}"
        print(results.table(target, source.description if source else None), flush=True)
    if isinstance(source, _Generated) and results.succeeded + results.warnings:
        # Beside the JSON object, not in it: standard output stays one object.
        print(removal_note(source), file=sys.stderr if args.json else sys.stdout, flush=True)
    if results.interrupted:
        return 130
    return 1 if results.failed else 0
