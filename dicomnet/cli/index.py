"""`dicomnet index`: rebuild the query/retrieve index of a storage folder."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

__all__ = ["add_parser", "run"]

log = logging.getLogger("dicomnet")


def add_parser(sub: Any) -> None:
    index = sub.add_parser("index", help="rebuild the query/retrieve index of a storage folder")
    index.add_argument("storage", metavar="DIR", help="the folder `dicomnet serve` stores to")
    index.add_argument(
        "--index",
        metavar="URL",
        help="build the index in PostgreSQL (postgresql://...) instead of the SQLite file in DIR",
    )
    index.add_argument("-v", "--verbose", action="store_true", help="log progress")
    index.add_argument("--debug", action="store_true", help="log in detail")
    index.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    from dicomnet.pacs.index import INDEX_FILE_NAME, Index

    storage = Path(args.storage)
    if not storage.is_dir():
        print(f"dicomnet index: {storage} is not a folder", file=sys.stderr)
        return 2

    def rebuild() -> int:
        with Index(args.index or storage / INDEX_FILE_NAME, root=storage) as index:
            return index.rebuild(storage)

    count = await anyio.to_thread.run_sync(rebuild)
    print(f"indexed {count} instance(s) in {storage}")
    return 0
