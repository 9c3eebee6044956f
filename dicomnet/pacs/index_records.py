"""The rows the index writes for one instance, read from its file (quickly from the
file's first bytes when its head allows, else through pydicom) or from its data set.
See `dicomnet.pacs.index`."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info

from dicomnet.pacs.index_files import (
    META_KEYWORDS,
    NeedsPydicom,
    RawTexts,
    quick_values,
    stored_text,
)
from dicomnet.pacs.index_schema import (
    INDEXED_TAGS,
    RECORD_PLAN,
    SOP_CLASS,
    STORED_TAG_SET,
    UNIQUE_KEY,
)
from dicomnet.pacs.matching import normalize

__all__ = ["Record", "RecordReader"]


@dataclass(frozen=True, slots=True)
class Record:
    """The rows `Index.add` writes for one instance (table name -> values, in upsert
    order)."""

    rows: dict[str, list[str | int | None]]
    sop_instance_uid: str


class RecordReader:
    """Reads `Record`s; `relative` gives the path stored for a file."""

    def __init__(self, relative: Callable[[str], str]) -> None:
        self._relative = relative
        self._raw_texts = RawTexts()
        # Per parent table, the raw values of the last instance read and the row made of
        # them: the instances of a series come in a row and share the patient, study
        # and series attributes.
        self._parent_rows: dict[str, tuple[tuple[bytes | None, ...], list[str | int | None]]] = {}

    def read(self, path: str, dataset: Dataset | None) -> Record:
        """The rows of the instance in file `path` (read from `dataset` when given)."""
        if dataset is None:
            quick = quick_values(path)
            if quick is not None:
                values, meta, size = quick
                # A partial, not a lambda: no Python frame per attribute.
                text_of = functools.partial(self._raw_texts.text, values)
                try:
                    return self._build(path, size, text_of, meta.get, values)
                except NeedsPydicom:
                    pass
            dataset = dcmread(path, stop_before_pixels=True, specific_tags=INDEXED_TAGS)
        file_meta = getattr(dataset, "file_meta", None)
        if file_meta is None or "TransferSyntaxUID" not in file_meta:
            file_meta = read_file_meta_info(path)
        present = STORED_TAG_SET.intersection(dataset.keys())
        meta = {
            keyword: normalize("UI", str(file_meta.get(keyword, ""))) for keyword in META_KEYWORDS
        }
        return self._build(
            path,
            os.stat(path).st_size,
            lambda tag, vr: stored_text(dataset, tag, vr, present),
            meta.get,
        )

    def _build(
        self,
        path: str,
        size: int,
        text_of: Callable[[int, str], tuple[str | None, str | None]],
        meta: Callable[[str], str | None],
        raw_values: dict[int, bytes] | None = None,
    ) -> Record:
        """The rows of one instance; `raw_values` (the raw values `text_of` reads) lets a
        patient, study or series row read from the same bytes before be reused."""
        rows: dict[str, list[str | int | None]] = {}
        for table, tags, plan in RECORD_PLAN:
            raw: tuple[bytes | None, ...] | None = None
            if raw_values is not None and table != "instance":
                raw = tuple(map(raw_values.get, tags))
                last = self._parent_rows.get(table)
                if last is not None and last[0] == raw:
                    rows[table] = last[1]
                    continue
            values: list[str | int | None] = []
            for tag, vr, keyword, role, keyed in plan:
                text, key = text_of(tag, vr)
                if text and "\x00" in text:  # no NUL in a text value (PostgreSQL refuses it)
                    text = text.replace("\x00", "")
                    key = key.replace("\x00", "") if key else key
                if role == UNIQUE_KEY:
                    if not text and keyword == "SOPInstanceUID":
                        text = meta("MediaStorageSOPInstanceUID") or ""
                    if not text and keyword != "PatientID":
                        raise ValueError(f"{keyword} is missing")
                    values.append(text or "")
                    continue
                if role == SOP_CLASS and not text:
                    text = meta("MediaStorageSOPClassUID") or None
                    key = text
                values.append(text)
                if keyed:
                    values.append(key)
            rows[table] = values
            if raw is not None:
                self._parent_rows[table] = (raw, values)
        transfer_syntax = meta("TransferSyntaxUID")
        rows["instance"] += [self._relative(path), transfer_syntax or None, size]
        return Record(rows, cast(str, rows["instance"][0]))
