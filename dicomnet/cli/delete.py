"""`dicomnet delete`: remove a patient, study or series from a storage folder of `serve`
(its files and index rows, in one transaction; safe while `serve` runs on the folder)."""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from dicomnet.cli.common import UsageError

__all__ = ["BENCH_PATIENT_ID", "add_parser", "run"]

log = logging.getLogger("dicomnet")

#: The Patient ID of the instances `dicomnet bench --op store` generates.
BENCH_PATIENT_ID = "DICOMNET-BENCH"


def add_parser(sub: Any) -> None:
    delete = sub.add_parser(
        "delete",
        help="remove a patient, study or series from a storage folder of `dicomnet serve`",
        description="Remove every instance of a patient, study or series from the storage "
        "folder of `dicomnet serve`: the files and their index rows, in one transaction "
        "(safe while serve runs on the folder). Selectors given together must all hold.",
    )
    delete.add_argument(
        "--storage", required=True, metavar="DIR", help="the folder `dicomnet serve` stores to"
    )
    delete.add_argument(
        "--index",
        metavar="URL",
        help="the index is in PostgreSQL (postgresql://...), as for `serve --index`",
    )
    delete.add_argument("--patient-id", metavar="ID", help="the patient's Patient ID")
    delete.add_argument("--study-uid", metavar="UID", help="the Study Instance UID")
    delete.add_argument("--series-uid", metavar="UID", help="the Series Instance UID")
    delete.add_argument(
        "--bench",
        action="store_true",
        help=f"the instances `dicomnet bench --op store` generated (Patient ID "
        f"{BENCH_PATIENT_ID}); with --study-uid, one bench run",
    )
    delete.add_argument(
        "--dry-run", action="store_true", help="list what would be removed, remove nothing"
    )
    delete.add_argument("-v", "--verbose", action="store_true", help="list each file removed")
    delete.add_argument("--debug", action="store_true", help="log in detail")
    delete.set_defaults(run=run)


def _plural(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def _selection(args: argparse.Namespace) -> Any:
    from dicomnet.pacs.delete import Selection

    patient_id = args.patient_id
    if args.bench:
        if patient_id is not None and patient_id != BENCH_PATIENT_ID:
            raise UsageError("--bench is --patient-id " + BENCH_PATIENT_ID)
        patient_id = BENCH_PATIENT_ID
    values = (patient_id, args.study_uid, args.series_uid)
    if any(value is not None and not value.strip() for value in values):
        raise UsageError("an empty --patient-id, --study-uid or --series-uid selects nothing")
    if not any(values):
        raise UsageError("say what to delete: --patient-id, --study-uid, --series-uid or --bench")
    return Selection(patient_id, args.study_uid, args.series_uid)


def _check_index(database: Path) -> None:
    """The folder's index exists and is of this version (opening `Index` on another would
    recreate it empty)."""
    from dicomnet.pacs.index import SCHEMA_VERSION

    if not database.is_file():
        raise UsageError(
            f"{database.parent} has no index ({database.name}): not a storage folder of "
            "dicomnet serve"
        )
    conn = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()
    if version != SCHEMA_VERSION:
        raise UsageError(
            f"the index of {database.parent} is of version {version}, not {SCHEMA_VERSION}: "
            f"let `dicomnet serve` or `dicomnet index {database.parent}` rebuild it first"
        )


def _check_database(url: str) -> None:
    """The same check, for an index in PostgreSQL."""
    import psycopg

    from dicomnet.database import redacted
    from dicomnet.pacs.index import SCHEMA_VERSION

    with psycopg.connect(url, autocommit=True) as conn:
        (kept,) = conn.execute("SELECT to_regclass('dicomnet_schema')").fetchall()
        row = conn.execute("SELECT version FROM dicomnet_schema").fetchone() if kept[0] else None
    if row is None or row[0] != SCHEMA_VERSION:
        raise UsageError(
            f"{redacted(url)} holds no index of version {SCHEMA_VERSION}: let `dicomnet serve` "
            "or `dicomnet index --index URL` build it first"
        )


def _database_errors() -> tuple[type[Exception], ...]:
    try:
        import psycopg
    except ImportError:
        return (OSError, sqlite3.Error)
    return (OSError, sqlite3.Error, psycopg.Error)


async def run(args: argparse.Namespace) -> int:
    from dicomnet.pacs.delete import delete
    from dicomnet.pacs.index import INDEX_FILE_NAME, Index

    selection = _selection(args)
    storage = Path(args.storage)
    if not storage.is_dir():
        raise UsageError(f"{storage} is not a folder")
    location: str | Path
    try:
        if args.index:
            _check_database(args.index)
            location = args.index
        else:
            location = storage / INDEX_FILE_NAME
            _check_index(location)
    except _database_errors() as exc:
        print(f"dicomnet delete: nothing removed: {exc}", file=sys.stderr)
        return 1

    def remove() -> Any:
        with Index(location, root=storage) as index:
            return delete(index, selection, dry_run=args.dry_run)

    try:
        result = await anyio.to_thread.run_sync(remove)
    except _database_errors() as exc:
        print(f"dicomnet delete: nothing removed: {exc}", file=sys.stderr)
        return 1
    if not result.instances:
        print(
            f"dicomnet delete: nothing matched {selection.describe()} in {storage}",
            file=sys.stderr,
        )
        return 1
    what = (
        f"{_plural(result.patients, 'patient')}, {_plural(result.studies, 'study', 'studies')}, "
        f"{_plural(result.series, 'series', 'series')}, {_plural(result.instances, 'instance')} "
        f"({result.bytes / 1e6:.1f} MB)"
    )
    if result.dry_run:
        print(f"would remove {what} from {storage}:")
        for series in result.by_series:
            print(
                f"  patient {series.patient_id or '(no ID)'}  study {series.study_instance_uid}"
                f"  series {series.series_instance_uid}: "
                f"{_plural(series.instances, 'instance')}"
            )
        if args.verbose:
            for path in result.files:
                print(f"  {path}")
        return 0
    if args.verbose:
        for path in result.files:
            print(f"removed {path}")
    gone = f" ({len(result.missing)} of them had no file any more)" if result.missing else ""
    print(f"removed {what} from {storage}{gone}")
    return 0
