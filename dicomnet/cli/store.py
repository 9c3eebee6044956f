"""`dicomnet store`: send files and folders with C-STORE over N associations."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from dicomnet.cli.common import (
    add_common,
    add_remote,
    open_association,
    reason_for,
    transfer_syntax_arg,
)
from dicomnet.cli.progress import ProgressBar
from dicomnet.errors import AssociationRejected, DicomNetError
from dicomnet.proto.contexts import (
    ContextCount,
    PresentationContext,
    contexts_for_instances,
)
from dicomnet.storage import Part10File

__all__ = ["add_parser", "run"]

log = logging.getLogger("dicomnet")


def add_parser(sub: Any) -> None:
    store = sub.add_parser("store", help="send files and folders (recursive) with C-STORE")
    add_remote(store)
    add_common(store)
    store.add_argument("paths", nargs="+", metavar="PATH", help="files or folders")
    store.add_argument(
        "--concurrency", type=int, default=1, help="associations in parallel (default 1)"
    )
    store.add_argument(
        "--no-progress", action="store_true", help="no progress bar even on a terminal"
    )
    store.add_argument(
        "-x",
        "--transfer-syntax",
        type=transfer_syntax_arg,
        metavar="TS",
        help="send in this transfer syntax where the peer accepts it (a UID, or explicit, "
        "implicit, deflated, rle, jpeg-ls, j2k-lossless, ...; DCMTK's -xe, -xi, -xr, ... "
        "read the same); files are converted to it when need be (compressing only "
        "losslessly). Without it, each file goes as stored, else converted to an "
        "uncompressed syntax the peer accepts",
    )
    store.set_defaults(run=run)


@dataclass
class _StoreTally(ProgressBar):
    """The store's counts and progress bar, and what failed (path: why)."""

    total_bytes: int = 0
    failures: list[str] = field(default_factory=list)


def _collect(paths: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Files to send (folders walked recursively, sorted) and errors for missing paths."""
    files: list[Path] = []
    errors: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs.sort()
                files.extend(Path(root) / name for name in sorted(names))
        elif path.is_file():
            files.append(path)
        else:
            errors.append(f"{raw}: no such file or folder")
    return files, errors


def _contexts_for(
    files: Sequence[Part10File], preferred: str | None = None
) -> list[PresentationContext]:
    return contexts_for_instances(((f.sop_class_uid, f.transfer_syntax) for f in files), preferred)


def _batches(
    files: list[Part10File], preferred: str | None = None
) -> list[tuple[list[PresentationContext], list[Part10File]]]:
    """Split the files so that each batch needs at most 128 presentation contexts."""
    batches: list[tuple[list[PresentationContext], list[Part10File]]] = []
    current: list[Part10File] = []
    count = ContextCount(preferred)
    for f in files:
        if current and count.with_(f.sop_class_uid, f.transfer_syntax) > 128:
            batches.append((_contexts_for(current, preferred), current))
            current, count = [], ContextCount(preferred)
        current.append(f)
        count.add(f.sop_class_uid, f.transfer_syntax)
    if current:
        batches.append((_contexts_for(current, preferred), current))
    return batches


# Media Storage Directory Storage: a DICOMDIR (the Basic Directory IOD, PS3.3 Annex F).
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

# An association refused or lost is tried again this many times in a row, after a pause
# of BACKOFF seconds doubling each time.
ATTEMPTS = 5
BACKOFF = 0.25


async def _send_queue(
    association: Any, queue: list[Part10File], tally: _StoreTally, preferred: str | None
) -> None:
    """Send files from the shared queue on one association while it lasts."""
    while queue and not association.is_closed:
        item = queue.pop()
        try:
            status = await association.store(item.path, transfer_syntax=preferred)
        except DicomNetError as exc:
            tally.failed += 1
            tally.failures.append(f"{item.path}: {exc}")
        else:
            if status.is_warning:
                tally.warning += 1
            else:
                tally.completed += 1
        tally.bytes_done += item.dataset_length
        tally.draw()


async def run(args: argparse.Namespace) -> int:
    paths, errors = _collect(args.paths)
    explicit = {Path(p) for p in args.paths if Path(p).is_file()}
    infos: list[Part10File] = []
    skipped = 0

    directories = 0

    def inspect() -> None:
        nonlocal skipped, directories
        for path in paths:
            try:
                info = Part10File.open(path)
                if info.sop_class_uid == MEDIA_STORAGE_DIRECTORY:
                    directories += 1  # an index of files, not an instance to store
                    log.info("skipping %s: a DICOMDIR", path)
                else:
                    infos.append(info)
            except Exception as exc:
                if path in explicit:
                    errors.append(f"{path}: {reason_for(path, exc)}")
                else:
                    skipped += 1
                    log.info("skipping %s: %s", path, reason_for(path, exc))

    await anyio.to_thread.run_sync(inspect)
    tally = _StoreTally(
        total=len(infos),
        total_bytes=sum(i.dataset_length for i in infos),
        show=sys.stderr.isatty() and not args.no_progress,
    )
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    tally.failed += len(errors)
    tally.total += len(errors)

    workers = [0]  # how many are still sending

    async def worker(contexts: list[PresentationContext], queue: list[Part10File]) -> None:
        """Send from the shared queue; an association refused or lost is tried again after
        a pause, and after `ATTEMPTS` in a row this worker leaves the queue to the others
        (e.g. a peer that allows fewer associations than --concurrency). The last worker
        to stop fails what is left, with the last reason."""
        workers[0] += 1
        refused = 0
        reason = "not sent"
        try:
            while queue and refused < ATTEMPTS:
                try:
                    async with open_association(args, contexts) as association:
                        refused = 0
                        await _send_queue(association, queue, tally, args.transfer_syntax)
                except DicomNetError as exc:
                    # A permanent rejection (a wrong AE title, PS3.8 Table 9-21) is final.
                    permanent = isinstance(exc, AssociationRejected) and exc.result == 1
                    refused = ATTEMPTS if permanent else refused + 1
                    reason = f"not sent: {exc}"
                    log.info("association: %s (attempt %d of %d)", exc, refused, ATTEMPTS)
                    if refused < ATTEMPTS and queue:
                        await anyio.sleep(BACKOFF * 2 ** (refused - 1))
        finally:
            workers[0] -= 1
            if workers[0] == 0:
                while queue:
                    item = queue.pop()
                    tally.failed += 1
                    tally.failures.append(f"{item.path}: {reason}")

    for contexts, batch in _batches(infos, args.transfer_syntax):
        queue = list(reversed(batch))
        async with anyio.create_task_group() as tg:
            for _ in range(max(1, min(args.concurrency, len(batch)))):
                tg.start_soon(worker, contexts, queue)
    tally.finish()
    elapsed = tally.elapsed
    for failure in tally.failures:
        print(f"failed: {failure}", file=sys.stderr)
    mb = tally.bytes_done / 1e6
    extra = f", skipped {skipped} non-DICOM" if skipped else ""
    extra += f", skipped {directories} DICOMDIR" if directories else ""
    print(
        f"sent {tally.completed}, warning {tally.warning}, failed {tally.failed}{extra}; "
        f"{mb:.1f} MB in {elapsed:.2f} s, {mb / elapsed:.1f} MB/s"
    )
    return 1 if tally.failed else 0
