"""Storage commitment in `dicomnet serve`: which stored instances are committed, and
the reports not yet delivered, kept on disk so that they survive a restart.

An instance is committed when its file `<storage>/<SOPInstanceUID>.dcm` is there
(its C-STORE was answered only once it was written, and fsynced unless `--no-fsync`),
readable, and of the SOP class the request names (PS3.4 §J.3.3.1.2 Failure Reasons:
0x0112 no such object instance, 0x0119 class/instance conflict, 0x0110 processing
failure). Pending reports are one JSON file each in `<storage>/.commitments/`,
written atomically; with an index in PostgreSQL, one row each in its database.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import anyio.to_thread

from dicomnet.database import SharedConnection
from dicomnet.pacs.index_db import SCHEMA_LOCK
from dicomnet.services.commitment import (
    CLASS_INSTANCE_CONFLICT,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    CommitmentResult,
    Failure,
    PendingReport,
    Reference,
)
from dicomnet.storage import Part10File, is_valid_uid, write_atomic

__all__ = ["COMMITMENTS_FOLDER", "DatabaseReportStore", "FolderReportStore", "check_stored"]

log = logging.getLogger("dicomnet")

COMMITMENTS_FOLDER = ".commitments"


def _check_one(storage: Path, sop_class: str, sop_instance: str) -> int | None:
    """None if committed, else the Failure Reason."""
    if not is_valid_uid(sop_instance):
        return NO_SUCH_OBJECT_INSTANCE
    path = storage / f"{sop_instance}.dcm"
    try:
        part10 = Part10File.open(path)
    except FileNotFoundError:
        return NO_SUCH_OBJECT_INSTANCE
    except (OSError, ValueError) as exc:
        log.warning("storage commitment: %s cannot be read: %s", path, exc)
        return PROCESSING_FAILURE
    if part10.sop_instance_uid != sop_instance:
        return PROCESSING_FAILURE
    if part10.sop_class_uid != sop_class:
        return CLASS_INSTANCE_CONFLICT
    return None


def check_stored_sync(
    storage: Path, references: Sequence[Reference]
) -> tuple[list[Reference], list[Failure]]:
    committed: list[Reference] = []
    failed: list[Failure] = []
    for sop_class, sop_instance in references:
        reason = _check_one(storage, sop_class, sop_instance)
        if reason is None:
            committed.append((sop_class, sop_instance))
        else:
            failed.append((sop_class, sop_instance, reason))
    return committed, failed


async def check_stored(
    storage: Path, references: Sequence[Reference]
) -> tuple[list[Reference], list[Failure]]:
    """Which of `references` are stored in `storage` (in a worker thread)."""
    return await anyio.to_thread.run_sync(check_stored_sync, storage, list(references))


def _to_json(pending: PendingReport) -> dict[str, object]:
    result = pending.result
    return {
        "transaction_uid": pending.transaction_uid,
        "requestor": pending.requestor,
        "references": [list(r) for r in pending.references],
        "received": pending.received,
        "attempts": pending.attempts,
        "result": None
        if result is None
        else {
            "committed": [list(r) for r in result.committed],
            "failed": [list(f) for f in result.failed],
            "retrieve_ae_title": result.retrieve_ae_title,
        },
    }


def _from_json(data: dict[str, object]) -> PendingReport:
    raw: dict[str, object] | None = data.get("result")  # type: ignore[assignment]
    result = None
    if raw is not None:
        result = CommitmentResult(
            str(data["transaction_uid"]),
            tuple((str(c), str(i)) for c, i in raw["committed"]),  # type: ignore[attr-defined]
            tuple((str(c), str(i), int(r)) for c, i, r in raw["failed"]),  # type: ignore[attr-defined]
            raw.get("retrieve_ae_title"),  # type: ignore[arg-type]
        )
    return PendingReport(
        str(data["transaction_uid"]),
        str(data["requestor"]),
        [(str(c), str(i)) for c, i in data["references"]],  # type: ignore[attr-defined]
        float(data["received"]),  # type: ignore[arg-type]
        result,
        int(data.get("attempts", 0)),  # type: ignore[call-overload]
    )


class FolderReportStore:
    """Pending storage commitment reports as JSON files in a folder."""

    def __init__(self, folder: Path, *, fsync: bool = True) -> None:
        self.folder = folder
        self.fsync = fsync
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, transaction_uid: str) -> Path:
        if not is_valid_uid(transaction_uid):
            raise ValueError(f"not a UID: {transaction_uid!r}")
        return self.folder / f"{transaction_uid}.json"

    def save(self, pending: PendingReport) -> None:
        data = json.dumps(_to_json(pending)).encode()
        write_atomic(self._path(pending.transaction_uid), [data], self.fsync)

    def delete(self, transaction_uid: str) -> None:
        try:
            os.unlink(self._path(transaction_uid))
        except FileNotFoundError:
            pass

    def load(self) -> list[PendingReport]:
        pending = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                pending.append(_from_json(json.loads(path.read_bytes())))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("storage commitment: %s is unreadable, skipped: %s", path, exc)
        return pending

    def close(self) -> None:
        """Nothing held open."""


_REPORTS = """CREATE TABLE IF NOT EXISTS commitment_report (
    transaction_uid TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    report TEXT NOT NULL)"""


class DatabaseReportStore:
    """Pending storage commitment reports as rows of `commitment_report` in the index's
    PostgreSQL database (at `url`), each with the node that owes it: a node resends its
    own when it starts again, as with a folder of its own. `OSError` when the database
    cannot be reached."""

    def __init__(self, url: str, node: str) -> None:
        self._db = SharedConnection(url)
        self.node = node
        try:
            with self._db.use() as conn, conn.transaction():  # nodes starting at once
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                conn.execute(_REPORTS)
        except self._db.error as exc:
            raise OSError(f"storage commitment reports: {exc}") from None

    def _run(self, sql: str, params: tuple[object, ...]) -> list[tuple[str]]:
        try:
            with self._db.use() as conn:
                cursor = conn.execute(sql, params)
                return list(cursor.fetchall()) if cursor.description else []
        except self._db.error as exc:
            raise OSError(f"storage commitment reports: {exc}") from None

    def save(self, pending: PendingReport) -> None:
        self._run(
            "INSERT INTO commitment_report VALUES (%s, %s, %s) ON CONFLICT (transaction_uid)"
            " DO UPDATE SET node = EXCLUDED.node, report = EXCLUDED.report",
            (pending.transaction_uid, self.node, json.dumps(_to_json(pending))),
        )

    def delete(self, transaction_uid: str) -> None:
        self._run("DELETE FROM commitment_report WHERE transaction_uid = %s", (transaction_uid,))

    def load(self) -> list[PendingReport]:
        pending = []
        rows = self._run(
            "SELECT report FROM commitment_report WHERE node = %s ORDER BY transaction_uid",
            (self.node,),
        )
        for (report,) in rows:
            try:
                pending.append(_from_json(json.loads(report)))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("storage commitment: a report is unreadable, skipped: %s", exc)
        return pending

    def close(self) -> None:
        self._db.close()
