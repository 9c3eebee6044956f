"""The worklist of `dicomnet serve --worklist DIR`: each file in a folder is one item.

A file is a DICOM Part-10 file, or a DICOM JSON object (PS3.18 §F.2; an array holding
one object is taken too), told apart by their first bytes. Files whose names start
with ``.`` (the temporary files of editors and atomic writers) and folders are passed
over. The folder is looked at again on each query: one `os.scandir` and one `stat` a
file; a file is read again only when its modification time, size or inode changed (or
it changed in the last 2 s), so an item added, changed or removed is seen by the next
query without a restart. A file that cannot be read is left out with a warning (once,
until it changes); a folder that cannot be listed gives an empty worklist, with a warning.

Matching is `dicomnet.pacs.worklist_matching` (PS3.4 Annex K).
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from dicomnet.pacs.matching import copy_dataset
from dicomnet.pacs.worklist_matching import WorklistQuery

__all__ = ["WorklistFolder", "read_item"]

log = logging.getLogger("dicomnet")

UNDEFINED_LENGTH = 0xFFFFFFFF
Stamp = tuple[int, int, int]  # st_mtime_ns, st_size, st_ino

# A file changed less than this long ago is read again even if its stamp is the same:
# a second change within the file system's time stamp granularity would not show in it
# (git's "racy" entries).
RACY_NS = 2_000_000_000
MATCH_BATCH = 64  # worklist items matched per trip to a worker thread


@dataclass(frozen=True, slots=True)
class _Entry:
    stamp: Stamp
    item: Dataset | None  # None: the file could not be read


def read_item(path: str | os.PathLike[str]) -> Dataset:
    """One worklist item from a Part-10 or DICOM JSON file, every value decoded.

    Raises `ValueError` (or `OSError`) when the file is neither, or its values do not
    decode."""
    with open(path, "rb") as f:
        head = f.read(512).removeprefix(codecs.BOM_UTF8).lstrip()
    if head[:1] in (b"{", b"["):
        dataset = _from_json(Path(path).read_bytes())
    else:
        dataset = dcmread(path)  # a Part-10 file: preamble and "DICM"
        _check_whole(dataset)
    try:
        # Decoded now, in the worker thread: a value that does not decode fails here,
        # not in the middle of a query.
        return copy_dataset(dataset)
    except Exception as exc:  # pydicom raises many kinds on a bad value
        raise ValueError(f"a value cannot be decoded: {exc}") from exc


def _check_whole(dataset: Dataset) -> None:
    """pydicom reads a truncated file without a word: an empty data set, or an element
    shorter than its length says, is refused (a file being written is read again when it
    is complete, its stamp having changed)."""
    if len(dataset) == 0:
        raise ValueError("no data set")
    for elem in dataset.elements():
        if isinstance(elem, RawDataElement) and elem.length != UNDEFINED_LENGTH:
            if elem.value is not None and len(elem.value) < elem.length:
                raise ValueError(f"{elem.tag} is cut short: the file is truncated")


def _from_json(data: bytes) -> Dataset:
    value = json.loads(data.decode("utf-8-sig"))
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"a JSON array of {len(value)} objects, not one item")
        value = value[0]
    if not isinstance(value, dict):
        raise ValueError("not a DICOM JSON object")
    return Dataset.from_json(value)


def _match_all(query: WorklistQuery, items: list[Dataset]) -> list[Dataset]:
    return [r for r in map(query.match, items) if r is not None]


class WorklistFolder:
    """The items of a folder, cached and read again when their files change."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._entries: dict[str, _Entry] = {}
        self._folder_problem: str | None = None

    def refresh(self) -> list[Dataset]:
        """Read what changed since the last call (blocking); the items, by file name."""
        self._entries = self._scan(self._entries)
        return [entry.item for _, entry in sorted(self._entries.items()) if entry.item is not None]

    async def items(self) -> list[Dataset]:
        """`refresh()` in a worker thread."""
        return await anyio.to_thread.run_sync(self.refresh)

    async def find(self, identifier: Dataset) -> AsyncIterator[Dataset]:
        """The response identifiers of the items that match (PS3.4 §K.4.1). It
        matches `MATCH_BATCH` items at a time in a worker thread, so the event loop
        is never held and a C-CANCEL stops it after the batch."""
        query = WorklistQuery.parse(identifier)
        items = await self.items()
        for start in range(0, len(items), MATCH_BATCH):
            batch = items[start : start + MATCH_BATCH]
            # Matched in a worker thread: a big folder never holds the event loop.
            responses = await anyio.to_thread.run_sync(_match_all, query, batch)
            for response in responses:
                yield response

    def _scan(self, known: Mapping[str, _Entry]) -> dict[str, _Entry]:
        entries: dict[str, _Entry] = {}
        try:
            with os.scandir(self.folder) as listing:
                for file in listing:
                    if not file.name.startswith(".") and file.is_file():
                        entries[file.name] = self._entry(file, known.get(file.name))
        except OSError as exc:
            self._warn_folder(str(exc))
            return {}
        self._warn_folder(None)
        return entries

    def _entry(self, file: os.DirEntry[str], known: _Entry | None) -> _Entry:
        try:
            info = file.stat()
        except OSError as exc:  # removed meanwhile
            log.warning("worklist: cannot read %s: %s", file.path, exc)
            return _Entry((0, 0, 0), None)
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        said = False  # this file's failure at this stamp was logged already
        if known is not None and known.stamp == stamp:
            if time.time_ns() - stamp[0] > RACY_NS:
                return known
            said = known.item is None
        try:
            return _Entry(stamp, read_item(file.path))
        except Exception as exc:  # never a crash: the file is left out until it changes
            if not said:
                log.warning("worklist: %s is left out: %s", file.path, exc)
            return _Entry(stamp, None)

    def _warn_folder(self, problem: str | None) -> None:
        if problem is not None and problem != self._folder_problem:
            log.warning("worklist: cannot list %s (no items): %s", self.folder, problem)
        self._folder_problem = problem
